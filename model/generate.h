// Text generation with a KV cache: greedy, temperature, top-k and top-p sampling,
// one sequence or a batch (prompts of different lengths are left-padded; each row
// has its own random stream, so a row's tokens do not depend on its batch), with
// the model's top-k log-probabilities per generated token when asked (the
// teacher's distribution for logit distillation).
#pragma once

#include <cstdint>
#include <vector>

#include "model/transformer.h"

namespace brigade::model {

struct SamplingOptions {
  int64_t max_new_tokens = 128;
  double temperature = 0.0;  // 0: greedy (argmax)
  int64_t top_k = 0;         // 0: no top-k filter
  double top_p = 1.0;        // 1: no nucleus filter
  uint64_t seed = 0;
  std::vector<int64_t> stop_ids;  // generation ends after emitting one of these
  int64_t logprobs = 0;      // > 0: keep the top-k log-probabilities (temperature 1, no filters) per new token
  int64_t vocab_limit = 0;   // > 0: only ids below it exist (the tokenizer's vocabulary when model.vocab_size is padded)
  void validate() const;
};

struct Generation {
  std::vector<int64_t> tokens;  // new tokens only (the stop token included if hit)
  bool stopped = false;         // ended on a stop id (false: hit max_new_tokens or the context)
  torch::Tensor topk_ids;       // [tokens, logprobs] int32 when SamplingOptions::logprobs > 0
  torch::Tensor topk_logprobs;  // [tokens, logprobs] float32, each row descending
};

// Samples a continuation of `prompt`, one sequence. Runs in inference mode; the
// model's training state is left as it was.
Generation generate(Transformer& model, const std::vector<int64_t>& prompt,
                    const SamplingOptions& options);

// One continuation per prompt, decoded together: row i samples from its own
// generator seeded with seeds[i] (options.seed is unused). Finished rows leave the
// batch, so the cost follows the rows still running.
std::vector<Generation> generate_batch(Transformer& model, const std::vector<std::vector<int64_t>>& prompts,
                                       const SamplingOptions& options, const std::vector<uint64_t>& seeds);

// The next-token choice for logits [vocab] under `options` (exposed for tests).
int64_t sample_token(const torch::Tensor& logits, const SamplingOptions& options,
                     torch::Generator& generator);

}  // namespace brigade::model
