#include "model/transformer.h"

#include <cmath>

#include <ATen/ops/scaled_dot_product_attention.h>
#include <torch/nn/init.h>

#include "core/error.h"

namespace brigade::model {

std::string to_string(AttentionKind kind) { return kind == AttentionKind::kMla ? "mla" : "gqa"; }

AttentionKind parse_attention_kind(const std::string& name) {
  if (name == "gqa") return AttentionKind::kGqa;
  if (name == "mla") return AttentionKind::kMla;
  BRIGADE_FAIL("model.attention '", name, "' is not one of gqa, mla");
}

int64_t TransformerOptions::ff_size() const {
  if (d_ff > 0) return d_ff;
  int64_t raw = (8 * d_model + 2) / 3;
  return (raw + 63) / 64 * 64;
}

void TransformerOptions::validate() const {
  BRIGADE_CHECK(vocab_size > 0, "model.vocab_size must be positive, got ", vocab_size);
  BRIGADE_CHECK(d_model > 0, "model.d_model must be positive, got ", d_model);
  BRIGADE_CHECK(n_layers > 0, "model.n_layers must be positive, got ", n_layers);
  BRIGADE_CHECK(n_heads > 0, "model.n_heads must be positive, got ", n_heads);
  BRIGADE_CHECK(n_kv_heads >= 0, "model.n_kv_heads must be >= 0 (0 = n_heads), got ", n_kv_heads);
  if (is_mla()) {
    mla.validate();
    // MLA sizes its heads by model.mla.*; GQA-only keys left at a value would be silently ignored.
    BRIGADE_CHECK(!qkv_bias && !qk_norm, "model.qkv_bias and model.qk_norm are grouped-query attention options; "
                  "multi-head latent attention (model.attention: mla) has neither");
    BRIGADE_CHECK(n_kv_heads == 0 || n_kv_heads == n_heads, "model.n_kv_heads (", n_kv_heads,
                  ") applies to grouped-query attention only; with model.attention: mla leave it 0");
  } else {
    BRIGADE_CHECK(head_dim > 0 || d_model % n_heads == 0, "model.n_heads (", n_heads,
                  ") must divide model.d_model (", d_model, ") unless model.head_dim is set");
    BRIGADE_CHECK(n_heads % kv_heads() == 0, "model.n_kv_heads (", kv_heads(),
                  ") must divide model.n_heads (", n_heads, ")");
    BRIGADE_CHECK(head_size() % 2 == 0, "the head dimension (", head_size(),
                  ") must be even for rotary embeddings");
  }
  rope_scaling.validate();
  BRIGADE_CHECK(max_seq_len > 0, "model.max_seq_len must be positive, got ", max_seq_len);
  BRIGADE_CHECK(rope_theta > 0, "model.rope_theta must be positive, got ", rope_theta);
  BRIGADE_CHECK(norm_eps > 0, "model.norm_eps must be positive, got ", norm_eps);
  BRIGADE_CHECK(init_std > 0, "model.init_std must be positive, got ", init_std);
  moe.validate(n_layers);
  BRIGADE_CHECK(mtp.depth >= 0, "model.mtp.depth must be >= 0 (0 = off), got ", mtp.depth);
  BRIGADE_CHECK(mtp.loss_weight >= 0, "model.mtp.loss_weight must be >= 0, got ", mtp.loss_weight);
}

// ---------------------------------------------------------------------------------
// ---------------------------------------------------------------------------------
namespace {

precision::Linear make_linear(int64_t in, int64_t out, bool bias) { return precision::Linear(in, out, bias); }

// [batch, 1, seq, seq] bool: causal, and within a position's own document.
torch::Tensor document_mask(const torch::Tensor& segments) {
  const int64_t n = segments.size(1);
  auto pos = torch::arange(n, torch::TensorOptions().dtype(torch::kLong).device(segments.device()));
  auto causal = (pos.unsqueeze(1) >= pos.unsqueeze(0)).unsqueeze(0);  // [1, q, k]
  return (causal & (segments.unsqueeze(2) == segments.unsqueeze(1))).unsqueeze(1);
}

}  // namespace

AttentionImpl::AttentionImpl(const TransformerOptions& o)
    : n_heads_(o.n_heads), n_kv_heads_(o.kv_heads()), head_dim_(o.head_size()) {
  q_proj = register_module("q_proj", make_linear(o.d_model, n_heads_ * head_dim_, o.qkv_bias));
  k_proj = register_module("k_proj", make_linear(o.d_model, n_kv_heads_ * head_dim_, o.qkv_bias));
  v_proj = register_module("v_proj", make_linear(o.d_model, n_kv_heads_ * head_dim_, o.qkv_bias));
  o_proj = register_module("o_proj", make_linear(n_heads_ * head_dim_, o.d_model, false));
  if (o.qk_norm) {
    q_norm = register_module("q_norm", RMSNorm(head_dim_, o.norm_eps));
    k_norm = register_module("k_norm", RMSNorm(head_dim_, o.norm_eps));
  }
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                     const torch::Tensor& sin, KVCache* cache, int64_t layer,
                                     const torch::Tensor& mask) {
  const int64_t batch = x.size(0), seq = x.size(1);
  // [batch, seq, heads*hd] -> [batch, heads, seq, hd]
  auto q = q_proj(x).view({batch, seq, n_heads_, head_dim_});
  auto k = k_proj(x).view({batch, seq, n_kv_heads_, head_dim_});
  auto v = v_proj(x).view({batch, seq, n_kv_heads_, head_dim_}).transpose(1, 2);
  if (q_norm) {
    q = q_norm(q);
    k = k_norm(k);
  }
  q = apply_rope(q.transpose(1, 2), cos, sin);
  k = apply_rope(k.transpose(1, 2), cos, sin);

  torch::Tensor out;
  if (cache == nullptr) {
    const bool gqa = n_kv_heads_ != n_heads_;
    auto core = [mask, gqa](const std::vector<torch::Tensor>& in) {
      return mask.defined() ? at::scaled_dot_product_attention(in[0], in[1], in[2], mask, 0.0, /*is_causal=*/false,
                                                               std::nullopt, gqa)
                            : at::scaled_dot_product_attention(in[0], in[1], in[2], {}, 0.0, /*is_causal=*/true,
                                                               std::nullopt, gqa);
    };
    out = checkpoint_core && is_training() ? checkpointed(core, {q, k, v}) : core({q, k, v});
  } else {
    const int64_t past = cache->length;
    BRIGADE_CHECK(past + seq <= cache->capacity(), "KV cache full: ", past, " + ", seq,
                  " positions exceed its capacity ", cache->capacity());
    cache->keys[layer].narrow(2, past, seq).copy_(k);
    cache->values[layer].narrow(2, past, seq).copy_(v);
    auto keys = cache->keys[layer].narrow(2, 0, past + seq);
    auto values = cache->values[layer].narrow(2, 0, past + seq);
    auto decode_mask = cache_attention_mask(*cache, seq, q.device());
    out = at::scaled_dot_product_attention(q, keys.to(q.scalar_type()), values.to(q.scalar_type()),
                                           decode_mask, 0.0, false, std::nullopt,
                                           n_kv_heads_ != n_heads_);
  }
  out = out.transpose(1, 2).reshape({batch, seq, n_heads_ * head_dim_});
  return o_proj(out);
}

// ---------------------------------------------------------------------------------
BlockImpl::BlockImpl(const TransformerOptions& o, int64_t layer) {
  input_layernorm = register_module("input_layernorm", RMSNorm(o.d_model, o.norm_eps));
  if (o.is_mla()) {
    const double scale = o.rope_scaling.softmax_scale_factor() / std::sqrt(static_cast<double>(o.mla.qk_head_dim()));
    mla = register_module("self_attn", MLAttention(o.d_model, o.n_heads, o.mla, scale));
  } else {
    self_attn = register_module("self_attn", Attention(o));
  }
  post_attention_layernorm =
      register_module("post_attention_layernorm", RMSNorm(o.d_model, o.norm_eps));
  if (o.is_moe_layer(layer)) {
    moe = register_module("mlp", moe::MoELayer(o.d_model, o.ff_size(), o.moe));
  } else {
    mlp = register_module("mlp", moe::SwiGLU(o.d_model, o.ff_size()));
  }
}

MtpModuleImpl::MtpModuleImpl(const TransformerOptions& o, int64_t layer) {
  enorm = register_module("enorm", RMSNorm(o.d_model, o.norm_eps));
  hnorm = register_module("hnorm", RMSNorm(o.d_model, o.norm_eps));
  eh_proj = register_module("eh_proj", make_linear(2 * o.d_model, o.d_model, false));
  block = register_module("block", Block(o, layer));
  norm = register_module("norm", RMSNorm(o.d_model, o.norm_eps));
}

torch::Tensor BlockImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                 const torch::Tensor& sin, KVCache* cache, int64_t layer,
                                 const torch::Tensor& mask) {
  auto normed_in = input_layernorm(x);
  auto h = x + (mla ? mla(normed_in, cos, sin, cache, layer, mask) : self_attn(normed_in, cos, sin, cache, layer, mask));
  auto normed = post_attention_layernorm(h);
  return h + (mlp ? mlp(normed) : moe(normed));
}

// ---------------------------------------------------------------------------------
TransformerImpl::TransformerImpl(TransformerOptions options) : options_(std::move(options)) {
  options_.validate();
  const auto& o = options_;
  embed_tokens = register_module("embed_tokens", torch::nn::Embedding(o.vocab_size, o.d_model));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < o.n_layers; ++i) layers->push_back(Block(o, i));
  norm = register_module("norm", RMSNorm(o.d_model, o.norm_eps));
  if (!o.tie_embeddings) lm_head = register_module("lm_head", make_linear(o.d_model, o.vocab_size, false));
  if (o.mtp.enabled()) {
    mtp = register_module("mtp", torch::nn::ModuleList());
    for (int64_t k = 0; k < o.mtp.depth; ++k) mtp->push_back(MtpModule(o, o.n_layers + k));
  }

  auto rope = rope_tables(o.rope_dim(), o.max_seq_len, o.rope_theta, o.rope_scaling, o.max_seq_len);
  rope_cos_ = register_buffer("rope_cos", rope.cos);
  rope_sin_ = register_buffer("rope_sin", rope.sin_signed);
  init_weights();
}

void TransformerImpl::init_weights() {
  torch::NoGradGuard no_grad;
  const double std = options_.init_std;
  // Residual-branch output projections are scaled down with depth (GPT-2) so the
  // residual stream's variance does not grow with the layer count.
  const double out_std = std / std::sqrt(2.0 * static_cast<double>(options_.n_layers));
  auto init_swiglu = [&](moe::SwiGLUImpl& f) {
    f.gate_proj->weight.normal_(0.0, std);
    f.up_proj->weight.normal_(0.0, std);
    f.down_proj->weight.normal_(0.0, out_std);
  };
  embed_tokens->weight.normal_(0.0, std);
  for (auto* block : blocks()) {
    if (block->mla) {
      for (auto [lin, name] : block->mla->projections()) (*lin)->weight.normal_(0.0, lin == &block->mla->o_proj ? out_std : std);
    } else {
      for (auto* lin : {&block->self_attn->q_proj, &block->self_attn->k_proj, &block->self_attn->v_proj}) {
        (*lin)->weight.normal_(0.0, std);
        if ((*lin)->bias.defined()) (*lin)->bias.zero_();
      }
      block->self_attn->o_proj->weight.normal_(0.0, out_std);
    }
    if (block->mlp) {
      init_swiglu(*block->mlp);
      continue;
    }
    auto& ffn = *block->moe;
    ffn.gate->weight.normal_(0.0, std);
    auto& experts = *ffn.experts->as<moe::GroupedExpertsImpl>();
    experts.gate_up_proj.normal_(0.0, std);
    experts.down_proj.normal_(0.0, out_std);
    if (ffn.shared_experts) init_swiglu(*ffn.shared_experts);
  }
  if (mtp) {
    for (const auto& m : *mtp) m->as<MtpModuleImpl>()->eh_proj->weight.normal_(0.0, std);
  }
  if (lm_head) lm_head->weight.normal_(0.0, std);
}

torch::Tensor TransformerImpl::decode_hidden(const torch::Tensor& tokens, KVCache& cache) {
  BRIGADE_CHECK(tokens.dim() == 2, "tokens must be [batch, seq], got ", tokens.sizes());
  const int64_t seq = tokens.size(1), start = cache.length;
  BRIGADE_CHECK(start + seq <= options_.max_seq_len, "sequence of ", start + seq,
                " positions exceeds model.max_seq_len ", options_.max_seq_len);
  auto cos = rope_cos_.narrow(0, start, seq), sin = rope_sin_.narrow(0, start, seq);
  auto h = embed(tokens);
  int64_t index = 0;
  for (const auto& layer : *layers) {
    h = decode_block(*layer->as<BlockImpl>(), h, cos, sin, cache, index, index);
    ++index;
  }
  cache.length += seq;
  return h;
}

torch::Tensor TransformerImpl::decode_block(BlockImpl& block, const torch::Tensor& h, const torch::Tensor& cos,
                                            const torch::Tensor& sin, KVCache& cache, int64_t cache_layer,
                                            int64_t block_index) {
  if (!block_hooks_) return block.forward(h, cos, sin, &cache, cache_layer);
  block_hooks_->before(block_index);
  return block_hooks_->after(block_index, block.forward(h, cos, sin, &cache, cache_layer));
}

torch::Tensor TransformerImpl::decode_logits(const torch::Tensor& hidden) { return norm_and_head(norm, hidden); }

MtpModuleImpl& TransformerImpl::mtp_module(int64_t k) {
  BRIGADE_CHECK(mtp && k >= 1 && k <= options_.mtp.depth, "MTP module ", k, " does not exist (model.mtp.depth is ",
                options_.mtp.depth, ")");
  return *mtp[k - 1]->as<MtpModuleImpl>();
}

torch::Tensor TransformerImpl::mtp_decode_hidden(int64_t k, const torch::Tensor& previous, const torch::Tensor& ahead,
                                                 KVCache& cache) {
  auto& m = mtp_module(k);
  const int64_t seq = ahead.size(1), start = cache.length;
  BRIGADE_CHECK(previous.dim() == 3 && previous.size(1) == seq, "MTP module ", k, ": hidden ", previous.sizes(),
                " and tokens ", ahead.sizes(), " disagree");
  before_unit(OuterUnit::kRest);
  auto x = m.eh_proj(torch::cat({m.enorm(embed(ahead)), m.hnorm(previous)}, -1));
  if (block_hooks_) block_hooks_->done(hook_unit(options_, OuterUnit::kRest));
  auto h = decode_block(*m.block, x, rope_cos_.narrow(0, start, seq), rope_sin_.narrow(0, start, seq), cache, 0,
                        options_.n_layers + k - 1);
  cache.length += seq;
  return h;
}

torch::Tensor TransformerImpl::mtp_decode_logits(int64_t k, const torch::Tensor& hidden) {
  return norm_and_head(mtp_module(k).norm, hidden);
}

torch::Tensor TransformerImpl::forward(const torch::Tensor& tokens, KVCache* cache, const torch::Tensor& segments) {
  BRIGADE_CHECK(tokens.dim() == 2, "tokens must be [batch, seq], got ", tokens.sizes());
  mtp_hidden_ = mtp_tokens_ = mtp_segments_ = torch::Tensor();
  if (cache != nullptr) {
    BRIGADE_CHECK(!segments.defined(), "segments come without a KV cache");
    return decode_logits(decode_hidden(tokens, *cache));
  }
  return forward_stage(tokens, 0, options_.n_layers, segments);  // every block: one stage
}

torch::Tensor TransformerImpl::forward_stage(const torch::Tensor& input, int64_t first, int64_t last,
                                            const torch::Tensor& segments, const torch::Tensor& tokens) {
  BRIGADE_CHECK(0 <= first && first < last && last <= options_.n_layers, "pipeline stage of blocks [", first, ", ",
                last, ") of a model with ", options_.n_layers, " layers");
  mtp_hidden_ = mtp_tokens_ = mtp_segments_ = torch::Tensor();
  const int64_t seq = input.size(1);
  BRIGADE_CHECK(seq <= options_.max_seq_len, "sequence of ", seq, " positions exceeds model.max_seq_len ",
                options_.max_seq_len);
  torch::Tensor mask;
  if (segments.defined()) {
    BRIGADE_CHECK(segments.dim() == 2 && segments.size(0) == input.size(0) && segments.size(1) == seq,
                  "segments ", segments.sizes(), " must match tokens ", input.sizes().slice(0, 2));
    mask = document_mask(segments.to(input.device()));
  }
  auto cos = rope_cos_.narrow(0, 0, seq), sin = rope_sin_.narrow(0, 0, seq);
  auto h = first == 0 ? embed(input) : input;
  for (int64_t j = first; j < last; ++j) h = run_block(*layers[j]->as<BlockImpl>(), h, cos, sin, j, mask);
  if (last < options_.n_layers) return h;
  if (mtp && is_training() && torch::GradMode::is_enabled()) {
    const auto& t = first == 0 ? input : tokens;
    BRIGADE_CHECK(t.defined() && t.dim() == 2, "the last pipeline stage needs the batch's tokens for MTP");
    mtp_hidden_ = h, mtp_tokens_ = t, mtp_segments_ = segments.defined() ? segments.to(t.device()) : segments;
  }
  return norm_and_head(norm, h);
}

torch::Tensor TransformerImpl::run_block(BlockImpl& block, const torch::Tensor& h, const torch::Tensor& cos,
                                         const torch::Tensor& sin, int64_t layer, const torch::Tensor& mask) {
  if (block_hooks_) block_hooks_->before(layer);
  torch::Tensor out;
  if (checkpointing_ == Checkpointing::kFull && is_training()) {
    // Only the block's input is kept; the block runs again in backward.
    auto* b = &block;
    out = checkpointed([b, cos, sin, mask, layer](const std::vector<torch::Tensor>& in) {
      return b->forward(in[0], cos, sin, nullptr, layer, mask);
    }, {h});
  } else {
    out = block.forward(h, cos, sin, nullptr, layer, mask);
  }
  return block_hooks_ ? block_hooks_->after(layer, std::move(out)) : out;
}

int64_t hook_unit_of(const TransformerOptions& o, const std::string& name) {
  auto number_after = [&](size_t from) { return std::stoll(name.substr(from, name.find('.', from) - from)); };
  if (name.starts_with("layers.")) return number_after(7);
  if (name.starts_with("mtp.")) {
    const int64_t k = number_after(4);
    const auto prefix = "mtp." + std::to_string(k) + ".block.";
    return name.starts_with(prefix) ? o.n_layers + k : hook_unit(o, OuterUnit::kRest);
  }
  if (name.starts_with("embed_tokens.")) return hook_unit(o, OuterUnit::kEmbedding);
  if (name.starts_with("lm_head.")) return hook_unit(o, OuterUnit::kHead);
  if (name.starts_with("norm.")) return hook_unit(o, OuterUnit::kRest);
  return -1;
}

void TransformerImpl::set_weight_grad_queue(const std::shared_ptr<precision::WeightGradQueue>& queue) {
  for (const auto& module : modules(/*include_self=*/false)) {
    if (auto* linear = dynamic_cast<precision::LinearImpl*>(module.get())) linear->set_weight_grad_queue(queue);
  }
}

void TransformerImpl::before_unit(OuterUnit unit) {
  if (block_hooks_) block_hooks_->before(hook_unit(options_, unit));
}

torch::Tensor TransformerImpl::embed(const torch::Tensor& tokens) {
  if (!block_hooks_) return embed_tokens(tokens);
  const int64_t unit = hook_unit(options_, OuterUnit::kEmbedding);
  block_hooks_->before(unit);
  auto h = embed_tokens(tokens);
  block_hooks_->done(unit);  // a lookup's backward needs only the indices
  return h;
}

// The rest (the norm) is gathered by the caller or here; it and the head's weights
// are gathered again when backward reaches the logits. The head's weights (the table
// when tied) are freed once the head's backward has made its input's gradient:
// nothing before it in backward reads them.
torch::Tensor TransformerImpl::norm_and_head(RMSNorm& final_norm, const torch::Tensor& h) {
  if (!block_hooks_) return head(final_norm(h));
  const int64_t rest = hook_unit(options_, OuterUnit::kRest);
  const int64_t weights = hook_unit(options_, lm_head ? OuterUnit::kHead : OuterUnit::kEmbedding);
  block_hooks_->before(rest);
  block_hooks_->before(weights);
  auto normed = block_hooks_->release_in_backward(weights, final_norm(h));
  auto logits = block_hooks_->after(weights, head(normed));
  return block_hooks_->after(rest, std::move(logits));
}

torch::Tensor TransformerImpl::head(const torch::Tensor& normed) {
  if (lm_head) return lm_head->forward(normed);
  if (tied_head_fp8_) return precision::fp8_linear(normed, embed_tokens->weight, {}, *tied_head_fp8_);
  return torch::nn::functional::linear(normed, embed_tokens->weight);
}

// Module k sees positions 0..seq-k-1: hidden state i of depth k-1 with the embedding
// of token i + k, so its position i predicts token i + k + 1 (DeepSeek-V3 eq. 21-23).
std::vector<torch::Tensor> TransformerImpl::mtp_logits() {
  std::vector<torch::Tensor> out;
  if (!mtp_hidden_.defined()) return out;
  auto h = std::move(mtp_hidden_);
  const auto tokens = std::move(mtp_tokens_), segments = std::move(mtp_segments_);
  mtp_hidden_ = mtp_tokens_ = mtp_segments_ = torch::Tensor();
  const int64_t seq = tokens.size(1);
  for (int64_t k = 1; k <= options_.mtp.depth && k < seq; ++k) {
    auto& m = *mtp[k - 1]->as<MtpModuleImpl>();
    const int64_t n = seq - k;
    before_unit(OuterUnit::kRest);  // the module's norms and projection (norm_and_head frees it)
    auto embedded = m.enorm(embed(tokens.narrow(1, k, n)));
    auto x = m.eh_proj(torch::cat({embedded, m.hnorm(h.narrow(1, 0, n))}, -1));
    const auto mask = segments.defined() ? document_mask(segments.narrow(1, 0, n)) : torch::Tensor();
    h = run_block(*m.block, x, rope_cos_.narrow(0, 0, n), rope_sin_.narrow(0, 0, n), options_.n_layers + k - 1, mask);
    out.push_back(norm_and_head(m.norm, h));
  }
  return out;
}

std::vector<BlockImpl*> TransformerImpl::blocks() const {
  std::vector<BlockImpl*> out;
  for (const auto& layer : *layers) out.push_back(layer->as<BlockImpl>());
  if (mtp) {
    for (const auto& m : *mtp) out.push_back(m->as<MtpModuleImpl>()->block.get());
  }
  return out;
}

void TransformerImpl::set_checkpointing(Checkpointing mode) {
  checkpointing_ = mode;
  for (auto* block : blocks()) {
    (block->mla ? block->mla->checkpoint_core : block->self_attn->checkpoint_core) = mode == Checkpointing::kSelective;
  }
}

KVCache TransformerImpl::make_cache(int64_t batch, int64_t capacity) const {
  return cache_of(batch, capacity, options_.n_layers);
}

KVCache TransformerImpl::make_mtp_cache(int64_t batch, int64_t capacity) const {
  BRIGADE_CHECK(mtp, "the model has no MTP modules (model.mtp.depth is 0)");
  return cache_of(batch, capacity, 1);
}

KVCache TransformerImpl::cache_of(int64_t batch, int64_t capacity, int64_t layers) const {
  BRIGADE_CHECK(capacity <= options_.max_seq_len, "KV cache capacity ", capacity,
                " exceeds model.max_seq_len ", options_.max_seq_len);
  KVCache cache;
  const auto dtype = embed_tokens->weight.options();
  for (int64_t i = 0; i < layers; ++i) {
    if (options_.is_mla()) {  // one latent row per position, no values (model/mla.h)
      cache.keys.push_back(torch::zeros({batch, 1, capacity, options_.mla.cache_width()}, dtype));
      continue;
    }
    auto shape = std::vector<int64_t>{batch, options_.kv_heads(), capacity, options_.head_size()};
    cache.keys.push_back(torch::zeros(shape, dtype));
    cache.values.push_back(torch::zeros(shape, dtype));
  }
  return cache;
}

ParameterCount TransformerImpl::parameter_count() const {
  ParameterCount count;
  for (const auto& p : parameters()) count.total += p.numel();
  count.embedding = embed_tokens->weight.numel();
  count.matmul = count.total - count.embedding;
  // Norm weights and biases do no matmul work; the head always does, tied or not.
  for (const auto& item : named_parameters()) {
    if (item.value().dim() < 2 && item.key() != "embed_tokens.weight") count.matmul -= item.value().numel();
  }
  count.matmul += options_.vocab_size * options_.d_model;
  if (lm_head) count.matmul -= lm_head->weight.numel();  // already counted in total
  // Under expert parallelism a rank holds a slice of each layer's experts: count
  // the model, not the slice.
  for (const auto& layer : moe_layers()) {
    const int64_t elsewhere = layer->options().num_experts - layer->experts->num_experts();
    count.total += elsewhere * layer->experts->parameters_per_expert();
    count.matmul += elsewhere * layer->experts->parameters_per_expert();
  }
  // A token skips all but top_k routed experts of each MoE layer.
  count.activated = count.total;
  for (const auto& layer : moe_layers()) {
    const auto& o = layer->options();
    count.routed += o.num_experts * layer->experts->parameters_per_expert();
    const int64_t skipped = (o.num_experts - o.top_k) * layer->experts->parameters_per_expert();
    count.activated -= skipped;
    count.matmul -= skipped;
  }
  return count;
}

NamedTensors TransformerImpl::state_dict() const {
  NamedTensors out;
  for (const auto& item : named_parameters()) out.emplace_back(item.key(), item.value());
  for (const auto& item : named_buffers()) {
    // RoPE tables are derived from the options; expert biases are learned state.
    if (item.key().ends_with(".e_score_correction_bias")) out.emplace_back(item.key(), item.value());
  }
  return out;
}

void TransformerImpl::enable_fp8(const precision::Fp8Options& options) {
  if (!options.enabled()) return;
  const auto all = blocks();
  for (size_t index = 0; index < all.size(); ++index) {
    auto* block = all[index];
    const auto i = static_cast<int64_t>(index);
    const std::string prefix =
        i < options_.n_layers ? "layers." + std::to_string(i) : "mtp." + std::to_string(i - options_.n_layers) + ".block";
    if (block->mla && options.covers("attention")) {
      for (auto [lin, name] : block->mla->projections()) (*lin)->enable_fp8(options, prefix + ".self_attn." + name);
    } else if (options.covers("attention")) {
      auto& a = *block->self_attn;
      for (auto [lin, name] : {std::pair{&a.q_proj, "q_proj"}, {&a.k_proj, "k_proj"}, {&a.v_proj, "v_proj"},
                               {&a.o_proj, "o_proj"}}) {
        (*lin)->enable_fp8(options, prefix + ".self_attn." + name);
      }
    }
    if (block->mlp && options.covers("mlp")) block->mlp->enable_fp8(options, prefix + ".mlp");
    if (block->moe) {
      if (block->moe->shared_experts && options.covers("mlp")) {
        block->moe->shared_experts->enable_fp8(options, prefix + ".mlp.shared_experts");
      }
      if (options.covers("experts")) block->moe->experts->enable_fp8(options, prefix + ".mlp.experts");
    }
  }
  if (mtp && options.covers("mlp")) {  // eh_proj: a projection like the MLP's (DeepSeek-V3 runs it in FP8)
    for (size_t k = 0; k < mtp->size(); ++k)
      mtp[k]->as<MtpModuleImpl>()->eh_proj->enable_fp8(options, "mtp." + std::to_string(k) + ".eh_proj");
  }
  if (options.covers("lm_head")) {
    if (lm_head) lm_head->enable_fp8(options, "lm_head");
    else tied_head_fp8_ = std::make_unique<precision::Fp8GemmState>(options, "lm_head");
  }
}

std::vector<std::pair<std::string, precision::Fp8GemmState*>> TransformerImpl::fp8_sites() const {
  std::vector<std::pair<std::string, precision::Fp8GemmState*>> sites;
  for (const auto& item : named_modules()) {
    if (auto* lin = item.value()->as<precision::LinearImpl>(); lin && lin->fp8()) sites.emplace_back(item.key(), lin->fp8());
    if (auto* ex = item.value()->as<moe::ExpertsImpl>(); ex && ex->fp8()) sites.emplace_back(item.key(), ex->fp8());
  }
  if (tied_head_fp8_) sites.emplace_back("lm_head", tied_head_fp8_.get());
  return sites;
}

NamedTensors TransformerImpl::fp8_state() const {
  NamedTensors out;
  for (const auto& [name, site] : fp8_sites()) {
    for (auto& [slot, tensor] : site->state()) out.emplace_back(name + "." + slot, tensor);
  }
  return out;
}

void TransformerImpl::load_fp8_state(const std::map<std::string, torch::Tensor>& tensors, const std::string& source) {
  for (const auto& [name, site] : fp8_sites()) site->load_state(tensors, name + ".", source);
}

void TransformerImpl::set_expert_parallel(parallel::Communicator* ep, bool fp8_dispatch) {
  for (auto& layer : moe_layers()) layer->set_expert_parallel(ep, fp8_dispatch);
}

std::vector<std::string> TransformerImpl::expert_parallel_parameters() const {
  std::vector<std::string> names;
  for (const auto& item : named_modules()) {
    auto* layer = item.value()->as<moe::MoELayerImpl>();
    if (layer == nullptr || layer->expert_parallel() == nullptr) continue;
    for (const auto& p : layer->experts->named_parameters()) names.push_back(item.key() + ".experts." + p.key());
  }
  return names;
}

std::vector<moe::MoELayer> TransformerImpl::moe_layers() const {
  std::vector<moe::MoELayer> out;
  for (auto* block : blocks()) {
    if (block->moe) out.push_back(block->moe);
  }
  return out;
}

torch::Tensor TransformerImpl::aux_loss() const { return aux_loss(0, options_.n_layers); }

torch::Tensor TransformerImpl::aux_loss(int64_t first, int64_t last) const {
  const auto all = blocks();  // the main blocks, then the MTP modules'
  const auto end = last == options_.n_layers ? static_cast<int64_t>(all.size()) : last;
  torch::Tensor total;
  for (int64_t j = first; j < end; ++j) {
    if (!all[static_cast<size_t>(j)]->moe) continue;
    auto loss = all[static_cast<size_t>(j)]->moe->aux_loss();
    if (loss.defined()) total = total.defined() ? total + loss : loss;
  }
  return total;
}

torch::Tensor TransformerImpl::moe_step_stats(parallel::Communicator* group) {
  std::vector<torch::Tensor> rows;
  for (auto& layer : moe_layers()) rows.push_back(layer->step_stats(group));
  return rows.empty() ? torch::Tensor() : torch::stack(rows);
}

std::vector<moe::LayerStepStats> TransformerImpl::moe_stats_from(const torch::Tensor& host) {
  std::vector<moe::LayerStepStats> stats;
  if (!host.defined()) return stats;
  for (int64_t i = 0; i < host.size(0); ++i) stats.push_back(moe::MoELayerImpl::stats_from(host[i]));
  return stats;
}

void TransformerImpl::end_moe_step(bool update_bias) {
  for (auto& layer : moe_layers()) layer->finish_step(update_bias);
}

ParameterCount count_parameters(const TransformerOptions& o) {
  const int64_t d = o.d_model, heads = o.n_heads;
  int64_t vectors = 0, matrices = 0, skipped = 0, routed = 0;  // 1-D, matmul, skipped by a token, routed experts
  auto swiglu = [&](int64_t ff) { matrices += 3 * d * ff; };
  auto block = [&](int64_t layer) {
    vectors += 2 * d;  // input and post-attention norms
    if (o.is_mla()) {
      const auto& a = o.mla;
      if (a.q_lora_rank > 0) matrices += d * a.q_lora_rank + a.q_lora_rank * heads * a.qk_head_dim(), vectors += a.q_lora_rank;
      else matrices += d * heads * a.qk_head_dim();
      matrices += d * a.cache_width() + a.kv_lora_rank * heads * (a.qk_nope_head_dim + a.v_head_dim) +
                  heads * a.v_head_dim * d;
      vectors += a.kv_lora_rank;
    } else {
      const int64_t hd = o.head_size(), kv = o.kv_heads();
      matrices += d * heads * hd + 2 * d * kv * hd + heads * hd * d;
      if (o.qkv_bias) vectors += (heads + 2 * kv) * hd;
      if (o.qk_norm) vectors += 2 * hd;
    }
    if (!o.is_moe_layer(layer)) return swiglu(o.ff_size());
    const auto& m = o.moe;
    const int64_t per_expert = 3 * d * m.expert_size(o.ff_size());
    matrices += m.num_experts * d + m.num_experts * per_expert;  // router, routed experts
    if (m.num_shared_experts > 0) swiglu(m.shared_size(o.ff_size()));
    skipped += (m.num_experts - m.top_k) * per_expert;
    routed += m.num_experts * per_expert;
  };
  for (int64_t i = 0; i < o.n_layers; ++i) block(i);
  for (int64_t k = 0; k < o.mtp.depth; ++k) {
    vectors += 3 * d;       // enorm, hnorm, norm
    matrices += 2 * d * d;  // eh_proj
    block(o.n_layers + k);
  }
  vectors += d;  // final norm
  const int64_t head = o.vocab_size * d;
  if (!o.tie_embeddings) matrices += head;
  ParameterCount c;
  c.embedding = head;
  c.total = head + matrices + vectors;
  c.activated = c.total - skipped;
  c.matmul = matrices + (o.tie_embeddings ? head : 0) - skipped;
  c.routed = routed;
  return c;
}

double ParameterCount::train_flops_per_token(const TransformerOptions& o, int64_t seq_len) const {
  const int64_t qk = o.is_mla() ? o.mla.qk_head_dim() : o.head_size();
  const int64_t v = o.is_mla() ? o.mla.v_head_dim : o.head_size();
  return 6.0 * static_cast<double>(matmul) + 6.0 * static_cast<double>(o.n_layers * seq_len * o.n_heads * (qk + v));
}

}  // namespace brigade::model
