// The per-layer cache of incremental decoding. Grouped-query attention keeps keys
// and values per kv head; multi-head latent attention keeps one latent row per
// position (the normalised KV latent followed by the rotated shared rope key) in
// `keys` and no `values` (model/mla.h).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include <torch/types.h>

namespace brigade::model {

struct KVCache {
  std::vector<torch::Tensor> keys;    // per layer [batch, kv_heads, capacity, head_dim] (MLA: [batch, 1, capacity, latent])
  std::vector<torch::Tensor> values;  // per layer [batch, kv_heads, capacity, head_dim]; empty for MLA
  // [batch, capacity] bool, false at left padding (batched prompts of different
  // lengths); undefined: every position is real. Padding is never attended to,
  // and RoPE makes attention depend on relative positions only, so a left-padded
  // prompt continues as it would alone.
  torch::Tensor valid;
  int64_t length = 0;                 // positions filled so far
  int64_t capacity() const { return keys.empty() ? 0 : keys[0].size(2); }
  // Cached values per position and layer (keys and values together).
  int64_t values_per_position() const;
};

// The attention mask of `seq` new queries against every cached position (their own
// included), [batch or 1, 1, seq, length + seq] bool; nullopt when plain causal
// attention over the whole cache is the same (one query, no padding).
std::optional<torch::Tensor> cache_attention_mask(const KVCache& cache, int64_t seq, const torch::Device& device);

}  // namespace brigade::model
