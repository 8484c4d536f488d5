// Text generation with a KV cache: greedy, temperature, top-k and top-p sampling.
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
  void validate() const;
};

struct Generation {
  std::vector<int64_t> tokens;  // new tokens only (the stop token included if hit)
  bool stopped = false;         // ended on a stop id (false: hit max_new_tokens or the context)
};

// Samples a continuation of `prompt`, one sequence. Runs in inference mode; the
// model's training state is left as it was.
Generation generate(Transformer& model, const std::vector<int64_t>& prompt,
                    const SamplingOptions& options);

// The next-token choice for logits [vocab] under `options` (exposed for tests).
int64_t sample_token(const torch::Tensor& logits, const SamplingOptions& options,
                     torch::Generator& generator);

}  // namespace brigade::model
