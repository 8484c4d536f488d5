// Multi-head latent attention (DeepSeek-V2 section 2.1, DeepSeek-V3 section 2.1.1).
//
// Keys and values come from one low-rank latent per token: c = RMSNorm(x W_dkv)
// of kv_lora_rank values, expanded per head by kv_b_proj into a key part without
// position (qk_nope_head_dim) and a value (v_head_dim). Position enters through a
// decoupled rotary key of qk_rope_head_dim values shared by all heads, made from x
// directly (kv_a_proj_with_mqa makes both). Queries are projected directly (q_proj)
// or through their own latent (q_a_proj, RMSNorm, q_b_proj) when q_lora_rank > 0.
// Parameter names are Hugging Face's deepseek_v2/v3 names.
//
// Training runs the naive form (keys and values expanded per head). Generation
// caches only c and the rotated rope key (kv_lora_rank + qk_rope_head_dim values per
// position and layer: 576 for DeepSeek-V3) and attends in the absorbed form: the
// key up-projection W_uk is folded into the query (q_nope W_uk scores against c
// directly) and the value up-projection W_uv applied after attention, so per-head
// keys and values are never built. Both forms compute the same function.
#pragma once

#include <cstdint>

#include <torch/nn/module.h>

#include "core/recompute.h"
#include "model/kv_cache.h"
#include "model/norm.h"
#include "precision/linear.h"

namespace brigade::model {

struct MlaOptions {
  int64_t q_lora_rank = 0;        // query latent size; 0: queries projected directly (DeepSeek-V2-Lite)
  int64_t kv_lora_rank = 64;      // KV latent size (DeepSeek-V3: 512)
  int64_t qk_nope_head_dim = 32;  // per-head query/key part without position (DeepSeek-V3: 128)
  int64_t qk_rope_head_dim = 16;  // per-head rotary query part and the shared rotary key (DeepSeek-V3: 64)
  int64_t v_head_dim = 32;        // per-head value size (DeepSeek-V3: 128)

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  // Values the generation cache keeps per position and layer.
  int64_t cache_width() const { return kv_lora_rank + qk_rope_head_dim; }
  // Throws an Error naming the key ("model.mla.kv_lora_rank ...") when a rule fails.
  void validate() const;
};

// DeepSeek's latent RMSNorms use a fixed epsilon, not rms_norm_eps (transformers agrees).
constexpr double kLatentNormEps = 1e-6;

class MLAttentionImpl : public torch::nn::Module {
 public:
  // softmax_scale: qk_head_dim^-0.5 times YaRN's mscale^2 (RopeScaling::softmax_scale_factor).
  MLAttentionImpl(int64_t d_model, int64_t n_heads, const MlaOptions& options, double softmax_scale);
  // As AttentionImpl::forward; cos/sin: [seq, qk_rope_head_dim]. With a cache the
  // absorbed form runs and cache->keys[layer] ([batch, 1, capacity, cache_width]) is
  // extended.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        KVCache* cache, int64_t layer, const torch::Tensor& mask = {});

  precision::Linear q_proj{nullptr};                                   // q_lora_rank == 0
  precision::Linear q_a_proj{nullptr}, q_b_proj{nullptr};              // q_lora_rank > 0
  RMSNorm q_a_layernorm{nullptr};
  precision::Linear kv_a_proj_with_mqa{nullptr}, kv_b_proj{nullptr}, o_proj{nullptr};
  RMSNorm kv_a_layernorm{nullptr};
  bool checkpoint_core = false;  // as AttentionImpl::checkpoint_core

  const MlaOptions& options() const { return options_; }
  // Every projection with its parameter name, for init and FP8.
  std::vector<std::pair<precision::Linear*, const char*>> projections();

 private:
  torch::Tensor absorbed(const torch::Tensor& q_nope, const torch::Tensor& q_rope, KVCache& cache, int64_t layer);
  int64_t n_heads_;
  MlaOptions options_;
  double scale_;
};
TORCH_MODULE(MLAttention);

}  // namespace brigade::model
