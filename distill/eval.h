// Evaluation: the eval stage of `brigade distill` and `brigade eval`.
//
// The eval stage scores pass@1 (greedy) and pass@k (k samples at a temperature)
// on held-out prompts with reference answers. `brigade eval` scores a checkpoint or
// a remote model on a JSONL problem set with n samples per problem and reports
// pass@k for every requested k <= n with the unbiased estimator of Chen et al.
// (2021). Both grade with grade_completion (distill/verify.h): the answer after
// the reasoning, found and matched per VerifyOptions::answer_pattern.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/tokenizer.h"
#include "distill/options.h"
#include "distill/prompts.h"
#include "model/transformer.h"

namespace brigade::distill {

struct PassAtK {
  int64_t problems = 0;
  int64_t k = 1;
  double pass1 = 0.0;  // fraction solved by the greedy sample
  double passk = 0.0;  // fraction with at least one of k sampled completions correct
  nlohmann::json to_json() const;
};

// `prompts` must all carry answers (an Error names the first that does not).
PassAtK evaluate_pass_at_k(model::Transformer& model, const data::Tokenizer& tokenizer,
                           const std::vector<Prompt>& prompts, const EvalOptions& options,
                           const VerifyOptions& verify, int64_t max_new_tokens, int64_t batch_size,
                           const std::string& label);

// The unbiased pass@k estimator: the chance that k of the n samples, drawn without
// replacement, include at least one of the c correct ones, 1 - C(n-c, k) / C(n, k),
// computed as a product (no large binomials). Needs 0 <= c <= n and 1 <= k <= n.
double pass_at_k(int64_t n, int64_t c, int64_t k);

// Problem sets (JSONL, one object per line), by their keys:
//
//   gsm8k   {"question": "...", "answer": "... #### 72"}: the reference is what
//           follows the last "####" (GSM8K); graded with answer_pattern "gsm8k"
//   math    {"problem": "...", "solution": "... \boxed{\frac{1}{2}} ..."} (the
//           reference is the solution's last \boxed{}) or {"problem", "answer"};
//           graded with answer_pattern "boxed" and MATH normalisation
//   prompt  {"prompt": "...", "answer": "..."} (brigade's prompts format):
//           graded with answer_pattern "exact"
//
// An optional "id" (string or integer) names a problem; otherwise its 1-based line
// number does. `format` "auto" takes the format from the first problem's keys, and
// every line must then have that format's keys. The text sent to the model is
// `prompt_template` with "{problem}" replaced by the question. A malformed line,
// an empty file or a line of another format is an Error naming file and line.
struct ProblemSet {
  std::string format;            // gsm8k | math | prompt
  std::vector<Prompt> problems;  // prompt: the templated text; answer: the reference
};
ProblemSet read_problem_set(const std::filesystem::path& file, const std::string& format,
                            const std::string& prompt_template = "{problem}");

// The grading rule a problem format defaults to (see above).
std::string default_answer_pattern(const std::string& format);

// Scores of n samples per problem.
struct ProblemSetScore {
  int64_t problems = 0;
  int64_t samples = 0;                             // per problem (n)
  std::vector<std::pair<int64_t, double>> pass;    // (k, mean pass@k over problems), k ascending
  int64_t no_answer = 0;                           // samples where no answer was found
  int64_t truncated = 0;                           // samples cut at the token limit
  int64_t failed = 0;                              // samples the model call failed for
  std::vector<int64_t> correct;                    // per problem: correct samples
  nlohmann::json to_json() const;
  // | model | problems | samples | pass@1 | ... | as one Markdown table row set
  std::string markdown(const std::string& label) const;
};

// Grades the samples 0..n-1 of every problem in the trace store at `traces_dir`
// (a failed or missing sample counts as wrong). Writes one line per sample to
// `samples_out` (JSONL: prompt_id, sample, answer, reference, correct, finish_reason)
// when it is not empty. Every k in `ks` must be in 1..n.
ProblemSetScore score_trace_store(const std::filesystem::path& traces_dir, const std::vector<Prompt>& problems,
                                  int64_t n, const std::vector<int64_t>& ks, const VerifyOptions& grading,
                                  const std::filesystem::path& samples_out = {});

}  // namespace brigade::distill
