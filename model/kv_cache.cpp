#include "model/kv_cache.h"

namespace brigade::model {

int64_t KVCache::values_per_position() const {
  if (keys.empty()) return 0;
  int64_t n = keys[0].size(1) * keys[0].size(3);
  if (!values.empty()) n += values[0].size(1) * values[0].size(3);
  return n;
}

std::optional<torch::Tensor> cache_attention_mask(const KVCache& cache, int64_t seq, const torch::Device& device) {
  if (seq == 1 && !cache.valid.defined()) return std::nullopt;
  const int64_t past = cache.length;
  // Query i (absolute position past+i) sees keys 0..past+i ...
  auto index = torch::TensorOptions().dtype(torch::kLong).device(device);
  auto qpos = torch::arange(past, past + seq, index).unsqueeze(1);
  auto kpos = torch::arange(0, past + seq, index).unsqueeze(0);
  auto causal = kpos <= qpos;  // [seq, keys]
  if (!cache.valid.defined()) return causal;
  // ... except padding; a padding query sees itself (its output is unused, but a
  // row with no key at all would be NaN).
  auto keys_ok = cache.valid.narrow(1, 0, past + seq).to(device).unsqueeze(1);  // [batch, 1, keys]
  return ((causal.unsqueeze(0) & keys_ok) | (kpos == qpos).unsqueeze(0)).unsqueeze(1);  // [batch, 1, seq, keys]
}

}  // namespace brigade::model
