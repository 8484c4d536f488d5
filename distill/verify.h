// Verification: which teacher samples become training data (rejection sampling).
//
// A sample is checked in this order; the first rule it breaks is its reason:
//
//   error           the teacher call failed (finish_reason "error")
//   truncated       cut at the token limit (finish_reason "length")
//   too_long        more than max_chars characters or max_tokens completion tokens
//   no_think        require_think and no "<think>" (in the completion, or at the
//                   end of the prompt, as chat templates that open the block do)
//   unclosed_think  require_think and no "</think>" after the "<think>"
//   no_answer       no answer found: the pattern does not match, or matches only
//                   an empty answer, after the last "</think>" (the whole text
//                   when there is no "</think>")
//   wrong_answer    the prompt has a reference answer and the extracted one does
//                   not match it (answers_match)
//   duplicate       an earlier accepted sample of the same prompt has the same text
//                   (after trimming and collapsing whitespace)
//   accepted        none of the above
//
// run_verify also rejects a trace whose prompt id is not among the prompts as
// "unknown_prompt". A prompt without a reference answer is verified by format
// alone; the statistics count those samples under "verified_by_format_only".
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <unordered_set>
#include <vector>

#include "distill/prompts.h"
#include "distill/traces.h"

namespace brigade::distill {

struct VerifyOptions {
  // How the final answer is found (the one grader of the verify stage, the eval
  // stage, the demo and `brigade eval`):
  //   "boxed"   the last \boxed{...} with balanced braces (nested braces allowed)
  //   "gsm8k"   the text after the last "####" up to the end of its line, else
  //             the last number in the text (GSM8K's reference format)
  //   "exact"   the whole text, compared as a string (whitespace collapsed)
  // Anything else is an ECMAScript regex with at least one capture group: the
  // first group of its last match.
  std::string answer_pattern = "boxed";
  bool require_think = true;       // "<think>" ... "</think>", the answer after it
  int64_t max_chars = 0;           // completion characters (bytes), 0: no limit
  int64_t max_tokens = 0;          // completion tokens, 0: no limit
  double numeric_tolerance = 1e-6; // relative, see answers_match
};

// Throws an Error naming the field when an option is out of range or the pattern
// is not a valid regex with a capture group.
void validate(const VerifyOptions& options);

// The answer in `text` per options.answer_pattern, trimmed; nullopt if none or
// empty. Searches the whole text: the "after </think>" rule is Verifier's.
std::optional<std::string> extract_answer(const std::string& text, const VerifyOptions& options);

// True when `got` equals `reference` after trimming and collapsing whitespace, or
// after MATH-style normalisation (normalise_math_answer) of both, or when both
// are numbers and |got - reference| <= tolerance * max(1, |reference|).
// Numbers: an optional sign, digits with optional thousands separators ("1,234"),
// an optional decimal part (".5", "2.50"), an optional trailing period ("12."),
// or a fraction of two such integers: "3/4", "-3/4", "\frac{3}{4}", "\dfrac{3}{4}".
bool answers_match(const std::string& got, const std::string& reference, double tolerance);

// A LaTeX answer in a canonical spelling, as MATH graders compare them: no
// spacing commands (\, \! \; \: "\ "), \left/\right, $ signs, degree signs,
// percent signs or \text{...} units after a value; \dfrac/\tfrac as \frac,
// \frac12 as \frac{1}{2}, \sqrt2 as \sqrt{2}; a leading "x =" dropped; a trailing
// period dropped; ".5" as "0.5"; a plain unit word after a number dropped
// ("10 cm" -> "10"); no spaces.
std::string normalise_math_answer(const std::string& answer);

// The one grading rule: the answer found after the last "</think>" of
// `completion` (the whole text when there is none) per options.answer_pattern,
// matched against `reference` ("exact": as strings; otherwise answers_match).
struct Grade {
  std::optional<std::string> answer;  // nullopt: no answer found
  bool correct = false;
};
Grade grade_completion(const std::string& completion, const std::string& reference, const VerifyOptions& options);

struct Verdict {
  bool accepted = false;
  // "accepted", "error", "truncated", "too_long", "no_think", "unclosed_think",
  // "no_answer", "wrong_answer", "duplicate" or "unknown_prompt"
  std::string reason;
  std::optional<std::string> answer;  // the extracted answer, when one was found
};

// Checks samples one at a time and keeps the statistics. Remembers accepted texts
// per prompt to reject duplicates, so check each sample once.
class Verifier {
 public:
  explicit Verifier(VerifyOptions options);

  const VerifyOptions& options() const { return options_; }

  // `prompt` must be the trace's prompt (same id).
  Verdict check(const Trace& trace, const Prompt& prompt);
  // Records a trace whose prompt is not known as rejected ("unknown_prompt").
  Verdict reject_unknown_prompt(const Trace& trace);

  // {"total", "accepted", "acceptance_rate", "reasons": {reason: count, ...},
  //  "prompts": prompts seen, "prompts_with_accepted",
  //  "verified_by_format_only": {"samples", "accepted_samples", "prompts", "note"}}
  // where verified_by_format_only counts samples and prompts without a reference
  // answer (accepted on format alone).
  nlohmann::json statistics() const;

 private:
  Verdict decide(const Trace& trace, const Prompt& prompt);
  void count(const std::string& reason);

  VerifyOptions options_;
  std::optional<std::regex> pattern_;  // set unless answer_pattern is "boxed"
  std::unordered_set<std::string> accepted_texts_;  // prompt id + '\0' + normalised text
  std::map<std::string, int64_t> reasons_;
  int64_t total_ = 0;
  std::set<std::string> prompts_seen_;
  std::set<std::string> prompts_accepted_;
  std::set<std::string> format_only_prompts_;
  int64_t format_only_samples_ = 0;
  int64_t format_only_accepted_ = 0;
};

// The verify stage: checks every sample of the trace store in `traces_dir` against
// `prompts` and writes, into `out_dir`:
//
//   accepted.jsonl  one line per accepted sample, in store order:
//                   {"prompt_id", "sample", "prompt", "completion", "answer"}, plus
//                   "conversation" (Prompt::conversation) for a chat prompt, plus
//                   "topk": {"offset", "positions"} copied from the trace store
//                   when the sample has top-k logprobs (records in
//                   traces_dir/traces.topk.bin)
//   stats.json      Verifier::statistics() plus "trace_store" (the directory),
//                   "topk_k" (0 without logprobs) and "options"
//
// Each file is written to a temporary and renamed into place; stats.json is removed
// first and written last, so its presence means the stage completed.
// Returns the statistics written to stats.json.
nlohmann::json run_verify(const std::filesystem::path& traces_dir, const std::vector<Prompt>& prompts,
                          const VerifyOptions& options, const std::filesystem::path& out_dir);

}  // namespace brigade::distill
