// The decoder-only transformer: RMSNorm, RoPE (with linear, llama3 or YaRN scaling),
// grouped-query causal attention (LibTorch's scaled_dot_product_attention) or
// multi-head latent attention (model/mla.h), SwiGLU MLP, optional tied embeddings,
// optional QKV bias (Qwen2) and q/k norm (Qwen3), and DeepSeekMoE feed-forward
// layers after the first model.moe.first_k_dense blocks when model.moe.num_experts > 0.
//
// Parameter names follow the Hugging Face Llama/Qwen layout ("layers.3.self_attn.q_proj.weight")
// so checkpoint import/export is a prefix mapping, not a rename table.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>

#include "model/kv_cache.h"
#include "model/mla.h"
#include "model/norm.h"
#include "model/rope.h"
#include "model/safetensors.h"
#include "precision/linear.h"
#include "core/recompute.h"
#include "moe/layer.h"
#include "moe/swiglu.h"

namespace brigade::model {

enum class AttentionKind {
  kGqa,  // grouped-query attention (multi-head when n_kv_heads = n_heads)
  kMla,  // multi-head latent attention (DeepSeek-V2/V3), sized by TransformerOptions::mla
};
std::string to_string(AttentionKind kind);
AttentionKind parse_attention_kind(const std::string& name);

// Multi-token prediction (DeepSeek-V3 section 2.2): `depth` sequential modules, the
// k-th predicting the token k + 1 positions ahead from the previous depth's hidden
// state and the embedding of the token k ahead, keeping the causal chain. Training
// only: generation and evaluation run the main model alone.
struct MtpOptions {
  int64_t depth = 0;          // D; 0 = off (DeepSeek-V3: 1)
  double loss_weight = 0.3;   // lambda: the modules' mean loss is added times this (DeepSeek-V3: 0.3, later 0.1)
  bool enabled() const { return depth > 0; }
};

struct TransformerOptions {
  int64_t vocab_size = 264;
  int64_t d_model = 128;
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  int64_t n_kv_heads = 0;   // 0: same as n_heads (plain multi-head attention)
  int64_t head_dim = 0;     // 0: d_model / n_heads
  int64_t d_ff = 0;         // 0: 8/3 d_model rounded up to a multiple of 64
  int64_t max_seq_len = 256;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;  // context extension of the rotary frequencies; none by default
  AttentionKind attention = AttentionKind::kGqa;
  MlaOptions mla;            // attention = mla only; n_kv_heads, head_dim, qkv_bias and qk_norm are GQA's
  double norm_eps = 1e-5;
  bool tie_embeddings = true;
  bool qkv_bias = false;    // Qwen2
  bool qk_norm = false;     // Qwen3: RMSNorm over head_dim on q and k before RoPE
  double init_std = 0.02;
  // A Hugging Face checkpoint directory whose config.json gives the architecture and
  // whose weights replace the random init (recipes/build.cpp); empty: none. Not part
  // of the architecture: checkpoints do not depend on it.
  std::string init_from;
  moe::MoEOptions moe;      // num_experts = 0: every block is dense
  MtpOptions mtp;           // depth 0: no multi-token prediction modules

  // Derived sizes with the 0 defaults resolved.
  int64_t kv_heads() const { return n_kv_heads > 0 ? n_kv_heads : n_heads; }
  int64_t head_size() const { return head_dim > 0 ? head_dim : d_model / n_heads; }
  int64_t ff_size() const;
  bool is_mla() const { return attention == AttentionKind::kMla; }
  // The rotary dimension: the head size, or MLA's qk_rope_head_dim.
  int64_t rope_dim() const { return is_mla() ? mla.qk_rope_head_dim : head_size(); }
  bool is_moe_layer(int64_t layer) const { return moe.enabled() && layer >= moe.first_k_dense; }
  // Throws an Error naming the key ("model.n_heads ...") when a cross-field rule fails.
  void validate() const;
};

class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const TransformerOptions& options);
  // x: [batch, seq, d_model]; cos/sin: [seq, head_dim] for the positions of x.
  // mask: [batch, 1, seq, seq] bool (true: may attend) replacing the causal mask
  // (packed documents); undefined: causal. Not with a cache.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        KVCache* cache, int64_t layer, const torch::Tensor& mask = {});

  precision::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  RMSNorm q_norm{nullptr}, k_norm{nullptr};
  // Selective activation checkpointing: the attention core is recomputed in backward.
  bool checkpoint_core = false;

 private:
  int64_t n_heads_, n_kv_heads_, head_dim_;
};
TORCH_MODULE(Attention);

class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(const TransformerOptions& options, int64_t layer);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        KVCache* cache, int64_t layer, const torch::Tensor& mask = {});
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  // Exactly one attention is set; either is registered under the name "self_attn".
  Attention self_attn{nullptr};  // GQA
  MLAttention mla{nullptr};      // MLA
  // Exactly one feed-forward is set; either is registered under the name "mlp".
  moe::SwiGLU mlp{nullptr};     // dense layers
  moe::MoELayer moe{nullptr};   // MoE layers
};
TORCH_MODULE(Block);

// One multi-token-prediction module (names as DeepSeek's checkpoints): the embedding
// of the token k ahead (enorm) and the previous depth's hidden state (hnorm) are
// concatenated in that order, projected back to d_model (eh_proj) and run through one
// block (an MoE block when the main model's later layers are); `norm` precedes the
// output head shared with the main model. The embedding is shared too.
class MtpModuleImpl : public torch::nn::Module {
 public:
  MtpModuleImpl(const TransformerOptions& options, int64_t layer);
  RMSNorm enorm{nullptr}, hnorm{nullptr}, norm{nullptr};
  precision::Linear eh_proj{nullptr};
  Block block{nullptr};
};
TORCH_MODULE(MtpModule);

struct ParameterCount {
  int64_t total = 0;          // every parameter once (tied weights counted once)
  int64_t activated = 0;      // parameters one token uses: total minus the routed experts it skips
  int64_t embedding = 0;      // the token embedding table
  int64_t matmul = 0;         // weights one token uses in matmuls, the LM head included
  int64_t routed = 0;         // the routed experts' weights, every expert (what expert parallelism splits)
  // Training FLOPs per token: 6 * matmul + 6 * layers * seq_len * n_heads * (qk_dim + v_dim)
  // (forward + backward, attention scores counted in full; the PaLM convention, which
  // is 12 * layers * seq_len * n_heads * head_dim when q, k and v heads have one size).
  double train_flops_per_token(const TransformerOptions& options, int64_t seq_len) const;
};

// The same counts as TransformerImpl::parameter_count() computed from the options
// alone, without building the model (a 671B recipe can be sized on a laptop).
ParameterCount count_parameters(const TransformerOptions& options);

// Called around every use of a unit of parameters in a forward (training,
// evaluation and cached decoding). ZeRO-3 (parallel/zero3.h) gathers a unit's
// parameters in before() and frees them after the use, arranging for them to be
// gathered again where backward needs them. Units are numbered as BlockHooks
// numbers: the main model's blocks 0..n_layers-1, the MTP modules' blocks
// (n_layers + k - 1 for module k), then the outer units (hook_unit()).
class BlockHooks {
 public:
  virtual ~BlockHooks() = default;
  virtual void before(int64_t unit) = 0;
  // After a use whose backward needs the unit again: `output` (returned, possibly
  // with an autograd hook) is where backward reaches it.
  virtual torch::Tensor after(int64_t unit, torch::Tensor output) = 0;
  // After a use whose backward reads none of the unit's values (the embedding lookup).
  virtual void done(int64_t unit) = 0;
  // `input` of a use whose backward is the unit's last this step: once its gradient
  // is made, the unit's values are not needed again until the next forward.
  virtual torch::Tensor release_in_backward(int64_t unit, torch::Tensor input) = 0;
};

// The units outside the blocks: the embedding table (the head too when tied), the
// untied output head, and the rest (final norm, the MTP modules' norms and
// projections), each used at both ends of the model.
enum class OuterUnit : int64_t { kEmbedding = 0, kHead = 1, kRest = 2 };
inline int64_t hook_unit(const TransformerOptions& o, OuterUnit unit) {
  return o.n_layers + o.mtp.depth + static_cast<int64_t>(unit);
}
// The BlockHooks number of the unit holding parameter `name` (-1: not a model parameter name).
int64_t hook_unit_of(const TransformerOptions& o, const std::string& name);

class TransformerImpl : public torch::nn::Module {
 public:
  // Parameters are initialised from the current torch RNG (seed it first).
  explicit TransformerImpl(TransformerOptions options);

  // tokens: [batch, seq] int64 -> logits [batch, seq, vocab] (float32 unless autocast).
  // With a cache, positions continue from cache->length and the cache is extended.
  // segments: [batch, seq] document index of each position (packed documents,
  // data::Batch::segments): a position attends only to earlier positions of its
  // own document. RoPE depends on relative positions only, so a document reads as
  // it would alone. Not with a cache.
  torch::Tensor forward(const torch::Tensor& tokens, KVCache* cache = nullptr, const torch::Tensor& segments = {});

  // A pipeline stage's part of forward() (parallel/pipeline.h): blocks [first, last).
  // `input` is the tokens [batch, seq] when first == 0 (the embedding runs first),
  // else the previous stage's hidden state [batch, seq, d_model] (float32). Returns
  // the hidden state after the last block, or the logits when last == n_layers.
  // The composition of stages is forward() exactly; the last stage keeps what
  // mtp_logits() needs (`tokens`: the batch's input tokens) as forward() does.
  torch::Tensor forward_stage(const torch::Tensor& input, int64_t first, int64_t last,
                              const torch::Tensor& segments = {}, const torch::Tensor& tokens = {});

  // Multi-token prediction on the last training forward (model.mtp.depth > 0, grad
  // mode, no cache; otherwise empty): for k = 1..depth the logits
  // [batch, seq - k, vocab] of module k, whose position i predicts targets[:, i + k]
  // (token i + k + 1). Consumes what that forward kept; call once after it.
  std::vector<torch::Tensor> mtp_logits();

  // An empty cache for `batch` sequences of up to `capacity` positions.
  KVCache make_cache(int64_t batch, int64_t capacity) const;

  // Incremental decoding in pieces, for speculative decoding (model/speculative.h).
  // decode_hidden: forward() with a cache, stopping at the last block's output
  // [batch, seq, d_model]; decode_logits(h) finishes it (forward() = both).
  torch::Tensor decode_hidden(const torch::Tensor& tokens, KVCache& cache);
  torch::Tensor decode_logits(const torch::Tensor& hidden);
  // MTP module k (1..mtp.depth) at positions cache.length.. of its own sequence, as
  // in training (mtp_logits): `previous` [batch, seq, d_model] is depth k-1's hidden
  // state there (the main model's for k = 1), `ahead` [batch, seq] the tokens k
  // positions later. Returns module k's hidden state; mtp_decode_logits gives its
  // logits (predicting the tokens k + 1 later). `cache` comes from make_mtp_cache.
  torch::Tensor mtp_decode_hidden(int64_t k, const torch::Tensor& previous, const torch::Tensor& ahead, KVCache& cache);
  torch::Tensor mtp_decode_logits(int64_t k, const torch::Tensor& hidden);
  // A one-block cache for an MTP module's block.
  KVCache make_mtp_cache(int64_t batch, int64_t capacity) const;

  const TransformerOptions& options() const { return options_; }
  ParameterCount parameter_count() const;

  // Parameters plus training-state buffers (MoE expert biases), by name: what a
  // checkpoint stores. The tensors alias the model's.
  NamedTensors state_dict() const;
  // The MoE layers' feed-forwards, in layer order (empty for a dense model).
  std::vector<moe::MoELayer> moe_layers() const;
  // Sum of the MoE auxiliary losses of the last training forward; undefined when none.
  torch::Tensor aux_loss() const;
  // The same over blocks [first, last) (and the MTP modules' when last is n_layers):
  // a pipeline chunk's, whose other blocks may hold an earlier forward's.
  torch::Tensor aux_loss(int64_t first, int64_t last) const;
  // Closing an optimizer step in every MoE layer, in two halves so the statistics
  // join the step's one host read: moe_step_stats() combines the layers' counters
  // over `group` ([MoE layers, 5] float64 on the device, MoELayerImpl::step_stats();
  // undefined for a dense model), moe_stats_from() turns a host copy into per-layer
  // statistics, and end_moe_step() moves the expert biases (when `update_bias`) and
  // resets the counters.
  torch::Tensor moe_step_stats(parallel::Communicator* group = nullptr);
  static std::vector<moe::LayerStepStats> moe_stats_from(const torch::Tensor& host);
  void end_moe_step(bool update_bias);

  // Expert parallelism over `ep` in every MoE layer (MoELayerImpl::set_expert_parallel:
  // null or a group of 1 is off). Call once, after the weights are initialised
  // identically on every rank and before an optimizer captures the parameters.
  void set_expert_parallel(parallel::Communicator* ep, bool fp8_dispatch);
  // state_dict() names of the tensors sharded on dim 0 over the expert-parallel group
  // (each rank holds its experts' rows); empty when expert parallelism is off.
  std::vector<std::string> expert_parallel_parameters() const;

  // Runs the GEMMs of the module kinds `options.modules` lists in FP8 (no-op when
  // the recipe is none). Call once, after construction.
  void enable_fp8(const precision::Fp8Options& options);
  // FP8 scaling state (delayed-scaling amax histories) by name, for checkpoints.
  NamedTensors fp8_state() const;
  void load_fp8_state(const std::map<std::string, torch::Tensor>& tensors, const std::string& source);

  // trainer.activation_checkpointing (core/recompute.h): applies in training
  // forwards with grad mode on; evaluation and generation are unchanged.
  void set_checkpointing(Checkpointing mode);
  Checkpointing checkpointing() const { return checkpointing_; }
  // Hooks around every block (null: none).
  void set_block_hooks(std::shared_ptr<BlockHooks> hooks) { block_hooks_ = std::move(hooks); }
  // Split backwards (DualPipe-V's W steps): every Linear of the model defers its
  // weight gradients to `queue` while it is deferring (null: never).
  void set_weight_grad_queue(const std::shared_ptr<precision::WeightGradQueue>& queue);

  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  torch::nn::ModuleList mtp{nullptr};  // MtpModule per depth; null without MTP
  RMSNorm norm{nullptr};
  precision::Linear lm_head{nullptr};  // null when embeddings are tied

 private:
  void init_weights();
  KVCache cache_of(int64_t batch, int64_t capacity, int64_t layers) const;
  MtpModuleImpl& mtp_module(int64_t k);
  // Every FP8 GEMM site with its checkpoint name prefix.
  std::vector<std::pair<std::string, precision::Fp8GemmState*>> fp8_sites() const;
  TransformerOptions options_;
  Checkpointing checkpointing_ = Checkpointing::kNone;
  std::shared_ptr<BlockHooks> block_hooks_;
  // block.forward with a cache, between the block hooks.
  torch::Tensor decode_block(BlockImpl& block, const torch::Tensor& h, const torch::Tensor& cos,
                             const torch::Tensor& sin, KVCache& cache, int64_t cache_layer, int64_t block_index);
  torch::Tensor head(const torch::Tensor& normed);
  // The embedding lookup and norm + head with the outer units' hooks around them.
  torch::Tensor embed(const torch::Tensor& tokens);
  torch::Tensor norm_and_head(RMSNorm& final_norm, const torch::Tensor& h);
  void before_unit(OuterUnit unit);
  // The main model's blocks, then the MTP modules' (MoE layers, FP8, checkpointing).
  std::vector<BlockImpl*> blocks() const;
  // A block of a forward without cache (checkpointed when activation checkpointing says so).
  torch::Tensor run_block(BlockImpl& block, const torch::Tensor& h, const torch::Tensor& cos, const torch::Tensor& sin,
                          int64_t layer, const torch::Tensor& mask);
  // What the last training forward leaves for mtp_logits().
  torch::Tensor mtp_hidden_, mtp_tokens_, mtp_segments_;
  std::unique_ptr<precision::Fp8GemmState> tied_head_fp8_;  // the tied output head's FP8 state
  torch::Tensor rope_cos_;  // [max_seq_len, rope_dim()] (buffer, not a parameter)
  torch::Tensor rope_sin_;  // sign-folded: [-sin, sin] over the two halves (see apply_rope)
};
TORCH_MODULE(Transformer);

}  // namespace brigade::model
