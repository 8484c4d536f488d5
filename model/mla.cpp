#include "model/mla.h"

#include <limits>

#include <ATen/ops/scaled_dot_product_attention.h>

#include "core/error.h"
#include "model/rope.h"

namespace brigade::model {

void MlaOptions::validate() const {
  BRIGADE_CHECK(q_lora_rank >= 0, "model.mla.q_lora_rank must be >= 0 (0 = no query compression), got ", q_lora_rank);
  BRIGADE_CHECK(kv_lora_rank > 0, "model.mla.kv_lora_rank must be positive, got ", kv_lora_rank);
  BRIGADE_CHECK(qk_nope_head_dim > 0, "model.mla.qk_nope_head_dim must be positive, got ", qk_nope_head_dim);
  BRIGADE_CHECK(qk_rope_head_dim > 0 && qk_rope_head_dim % 2 == 0,
                "model.mla.qk_rope_head_dim must be positive and even (rotary pairs), got ", qk_rope_head_dim);
  BRIGADE_CHECK(v_head_dim > 0, "model.mla.v_head_dim must be positive, got ", v_head_dim);
}

MLAttentionImpl::MLAttentionImpl(int64_t d_model, int64_t n_heads, const MlaOptions& o, double softmax_scale)
    : n_heads_(n_heads), options_(o), scale_(softmax_scale) {
  o.validate();
  const int64_t q_width = n_heads * o.qk_head_dim();
  if (o.q_lora_rank > 0) {
    q_a_proj = register_module("q_a_proj", precision::Linear(d_model, o.q_lora_rank, false));
    q_a_layernorm = register_module("q_a_layernorm", RMSNorm(o.q_lora_rank, kLatentNormEps));
    q_b_proj = register_module("q_b_proj", precision::Linear(o.q_lora_rank, q_width, false));
  } else {
    q_proj = register_module("q_proj", precision::Linear(d_model, q_width, false));
  }
  kv_a_proj_with_mqa = register_module("kv_a_proj_with_mqa", precision::Linear(d_model, o.cache_width(), false));
  kv_a_layernorm = register_module("kv_a_layernorm", RMSNorm(o.kv_lora_rank, kLatentNormEps));
  kv_b_proj = register_module("kv_b_proj",
                              precision::Linear(o.kv_lora_rank, n_heads * (o.qk_nope_head_dim + o.v_head_dim), false));
  o_proj = register_module("o_proj", precision::Linear(n_heads * o.v_head_dim, d_model, false));
}

std::vector<std::pair<precision::Linear*, const char*>> MLAttentionImpl::projections() {
  std::vector<std::pair<precision::Linear*, const char*>> out;
  if (q_proj) out.emplace_back(&q_proj, "q_proj");
  if (q_a_proj) out.emplace_back(&q_a_proj, "q_a_proj"), out.emplace_back(&q_b_proj, "q_b_proj");
  out.emplace_back(&kv_a_proj_with_mqa, "kv_a_proj_with_mqa");
  out.emplace_back(&kv_b_proj, "kv_b_proj");
  out.emplace_back(&o_proj, "o_proj");
  return out;
}

torch::Tensor MLAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                       KVCache* cache, int64_t layer, const torch::Tensor& mask) {
  const auto& o = options_;
  const int64_t batch = x.size(0), seq = x.size(1);
  const int64_t dn = o.qk_nope_head_dim, dr = o.qk_rope_head_dim, dv = o.v_head_dim, r = o.kv_lora_rank;
  auto q = q_proj ? q_proj(x) : q_b_proj(q_a_layernorm(q_a_proj(x)));
  q = q.view({batch, seq, n_heads_, dn + dr}).transpose(1, 2);  // [batch, heads, seq, dn + dr]
  auto q_nope = q.narrow(-1, 0, dn);
  auto q_rope = apply_rope(q.narrow(-1, dn, dr), cos, sin);
  auto kv = kv_a_proj_with_mqa(x);                              // [batch, seq, r + dr]
  auto latent = kv_a_layernorm(kv.narrow(-1, 0, r));            // [batch, seq, r]
  auto k_rope = apply_rope(kv.narrow(-1, r, dr).unsqueeze(1), cos, sin);  // [batch, 1, seq, dr]

  torch::Tensor out;  // [batch, heads, seq, dv]
  if (cache != nullptr) {
    const int64_t past = cache->length;
    BRIGADE_CHECK(past + seq <= cache->capacity(), "KV cache full: ", past, " + ", seq,
                  " positions exceed its capacity ", cache->capacity());
    auto entries = torch::cat({latent, k_rope.squeeze(1)}, -1).unsqueeze(1);  // [batch, 1, seq, r + dr]
    cache->keys[layer].narrow(2, past, seq).copy_(entries);
    out = absorbed(q_nope, q_rope, *cache, layer);
  } else {
    auto kv_heads = kv_b_proj(latent).view({batch, seq, n_heads_, dn + dv}).transpose(1, 2);
    auto k = torch::cat({kv_heads.narrow(-1, 0, dn), k_rope.expand({batch, n_heads_, seq, dr})}, -1);
    auto v = kv_heads.narrow(-1, dn, dv);
    auto qf = torch::cat({q_nope, q_rope}, -1);
    const double scale = scale_;
    auto core = [mask, scale](const std::vector<torch::Tensor>& in) {
      return at::scaled_dot_product_attention(in[0], in[1], in[2], mask.defined() ? std::optional(mask) : std::nullopt,
                                              0.0, /*is_causal=*/!mask.defined(), scale);
    };
    out = checkpoint_core && is_training() ? checkpointed(core, {qf, k, v}) : core({qf, k, v});
  }
  return o_proj(out.transpose(1, 2).reshape({batch, seq, n_heads_ * dv}));
}

// Attention over the cached latents without expanding them: with kv_b_proj's rows
// split per head into W_uk [dn, r] and W_uv [dv, r], a head's score
// q_nope . (W_uk c) + q_rope . k_rope = (q_nope W_uk) . c + q_rope . k_rope, and its
// output sum_j p_j W_uv c_j = W_uv (sum_j p_j c_j). So the queries move into latent
// space and every head attends to the one shared row [c, k_rope] per position: the
// heads' queries stack into one batched GEMM against the rows (no per-head copy of
// the cache, which SDPA's grouped-query path makes on CPU: 5-16x slower at 512-2048
// positions, bench/mla_attention.py), and W_uv is applied to the attended latent.
torch::Tensor MLAttentionImpl::absorbed(const torch::Tensor& q_nope, const torch::Tensor& q_rope, KVCache& cache,
                                        int64_t layer) {
  const auto& o = options_;
  const int64_t dn = o.qk_nope_head_dim, dv = o.v_head_dim, r = o.kv_lora_rank;
  const int64_t batch = q_nope.size(0), seq = q_nope.size(2), keys = cache.length + seq;
  auto w = kv_b_proj->weight.view({n_heads_, dn + dv, r}).to(q_nope.scalar_type());
  auto w_uk = w.narrow(1, 0, dn);   // [heads, dn, r]
  auto w_uv = w.narrow(1, dn, dv);  // [heads, dv, r]
  auto q = torch::cat({torch::matmul(q_nope, w_uk), q_rope}, -1);  // [batch, heads, seq, r + dr]
  auto rows = cache.keys[layer].narrow(2, 0, keys).squeeze(1).to(q.scalar_type());  // [batch, keys, r + dr]
  auto scores = torch::bmm(q.reshape({batch, n_heads_ * seq, -1}), rows.transpose(1, 2))
                    .view({batch, n_heads_, seq, keys}) * scale_;
  if (auto mask = cache_attention_mask(cache, seq, q.device()))
    scores = scores.masked_fill(mask->logical_not(), -std::numeric_limits<double>::infinity());
  auto probs = torch::softmax(scores, -1);
  auto context = torch::bmm(probs.view({batch, n_heads_ * seq, keys}), rows.narrow(-1, 0, r))
                     .view({batch, n_heads_, seq, r});
  return torch::matmul(context, w_uv.transpose(1, 2));  // [batch, heads, seq, dv]
}

}  // namespace brigade::model
