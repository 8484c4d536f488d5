// The eval stage: pass@1 (greedy) and pass@k (k samples at a temperature) on
// held-out prompts with reference answers. A problem counts as solved when the
// answer extracted from the completion (VerifyOptions::answer_pattern) matches the
// reference (answers_match). With n = k samples per problem, pass@k is the share of
// problems with at least one correct sample (the unbiased estimator of Chen et al.
// 2021 reduces to that when n = k).
#pragma once

#include <cstdint>
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

}  // namespace brigade::distill
