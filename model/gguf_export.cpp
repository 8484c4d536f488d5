#include "model/gguf_export.h"

#include <map>
#include <regex>

#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "data/spm.h"
#include "model/gguf_mix.h"
#include "moe/options.h"

namespace brigade::model {
namespace {

using gguf::GgmlType;
using gguf::Scalar;
using gguf::Value;
using gguf::ValueType;

// llama.cpp's llama_ftype for general.file_type.
uint32_t file_type(GgufQuant quant) {
  switch (quant) {
    case GgufQuant::kF32: return 0;   // ALL_F32
    case GgufQuant::kF16: return 1;   // MOSTLY_F16
    case GgufQuant::kQ4_0: return 2;  // MOSTLY_Q4_0
    case GgufQuant::kQ8_0: return 7;  // MOSTLY_Q8_0
    case GgufQuant::kQ6_K: return gguf::quant_mix_file_type(gguf::QuantMix::kQ6_K);
    case GgufQuant::kQ5_K_M: return gguf::quant_mix_file_type(gguf::QuantMix::kQ5_K_M);
    case GgufQuant::kQ4_K_M: return gguf::quant_mix_file_type(gguf::QuantMix::kQ4_K_M);
  }
  BRIGADE_ASSERT(false, "unknown GgufQuant");
}

// The storage type of one tensor under q8_0 / q4_0 / f16 / f32: norms, biases and the MoE router (ffn_gate_inp)
// stay F32, as llama.cpp's converter and quantizer keep them (routing flips on small
// perturbations of the router logits); rows that do not fill whole 32-value blocks fall
// back to F16. 3-D expert tensors are quantized along their innermost dimension, like
// 2-D ones.
GgmlType storage_type(const std::string& gguf_name, const torch::Tensor& tensor, GgufQuant quant,
                      const gguf::MixModel& model) {
  const std::optional<gguf::QuantMix> mix = quant == GgufQuant::kQ6_K     ? gguf::QuantMix::kQ6_K
                                            : quant == GgufQuant::kQ5_K_M ? gguf::QuantMix::kQ5_K_M
                                            : quant == GgufQuant::kQ4_K_M ? gguf::QuantMix::kQ4_K_M
                                                                          : std::optional<gguf::QuantMix>();
  if (mix) {  // llama.cpp's per-tensor choice for the mix (model/gguf_mix.h)
    const std::vector<int64_t> ne(tensor.sizes().rbegin(), tensor.sizes().rend());
    return gguf::mix_tensor_type(*mix, gguf_name, ne, model);
  }
  if (tensor.dim() < 2 || quant == GgufQuant::kF32 || gguf_name.ends_with("ffn_gate_inp.weight"))
    return GgmlType::kF32;
  if (quant == GgufQuant::kF16) return GgmlType::kF16;
  if (tensor.size(-1) % gguf::kBlockSize != 0) return GgmlType::kF16;
  return quant == GgufQuant::kQ8_0 ? GgmlType::kQ8_0 : GgmlType::kQ4_0;
}

// llama.cpp's tokenizer.ggml.pre name for a BpeTokenizer::pre_tokenizer() family.
std::string llama_cpp_pre(const std::string& family) {
  if (family == "gpt2") return "gpt-2";
  if (family == "llama-bpe" || family == "qwen2") return family;
  BRIGADE_FAIL("GGUF export: tokenizer pre-tokenizer '", family,
               "' has no llama.cpp equivalent (gpt2, llama-bpe, qwen2 are supported)");
}

// llama.cpp's general.architecture (the same names as HF's model_type; spelled out
// here so the export needs nothing from the HF config code).
std::string architecture(HfFamily family) {
  switch (family) {
    case HfFamily::kLlama: return "llama";
    case HfFamily::kQwen2: return "qwen2";
    case HfFamily::kQwen3: return "qwen3";
    case HfFamily::kQwen3Moe: return "qwen3moe";
    case HfFamily::kDeepseekV2:
    case HfFamily::kDeepseekV3: return "deepseek2";
  }
  BRIGADE_ASSERT(false, "unknown HfFamily");
}

// llama.cpp's qwen3moe (src/models/qwen3moe.cpp) is Qwen3 attention with every
// layer's MLP replaced by softmax top-k routing over SwiGLU experts: the top-k
// weights are always renormalised to sum 1 (norm_w = true, no metadata key turns it
// off), there are no shared experts, no expert groups, no selection bias, no
// dense layers (ffn_gate_inp / *_exps are required in every block), and no weight
// scaling. Anything else would load and silently compute another function.
void check_qwen3moe(const TransformerOptions& o) {
  const auto& m = o.moe;
  BRIGADE_CHECK(m.enabled(), "GGUF export as qwen3moe: the model has no MoE layers (model.moe.num_experts = 0); "
                "export dense models as llama, qwen2 or qwen3");
  const char* why = nullptr;
  if (!o.qk_norm || o.qkv_bias) why = "the attention is not Qwen3's (q/k norm, no QKV bias)";
  else if (m.score_function != moe::ScoreFunction::kSoftmax) why = "model.moe.score_function is not softmax";
  else if (m.num_shared_experts > 0) why = "model.moe.num_shared_experts > 0 (qwen3moe has no shared experts)";
  else if (m.num_groups != 1) why = "model.moe.num_groups != 1 (qwen3moe has no group-limited routing)";
  else if (m.routed_scaling != 1.0) why = "model.moe.routed_scaling != 1";
  else if (!m.normalize_topk)
    why = "model.moe.normalize_topk is false, but llama.cpp's qwen3moe always renormalises the top-k weights";
  else if (m.first_k_dense > 0)
    why = "model.moe.first_k_dense > 0, but llama.cpp's qwen3moe has MoE in every layer (no dense "
          "layers / mlp_only_layers)";
  BRIGADE_CHECK(why == nullptr, "GGUF export as qwen3moe: ", why);
}

// llama.cpp's deepseek2 (src/models/deepseek2.cpp): multi-head latent attention
// over a latent cache (attn_k_b / attn_v_b), dense leading layers, then shared +
// routed experts with softmax or sigmoid scores, the selection bias exp_probs_b,
// groups ranked by the sum of their two best scores, optional renormalisation and a
// routed scaling. What it cannot express is refused here.
void check_deepseek2(const TransformerOptions& o) {
  BRIGADE_CHECK(o.is_mla(), "GGUF export as deepseek2: the model has no multi-head latent attention (model.attention)");
  // llama.cpp takes 26/27-layer models (and 48 layers with a 128256 vocabulary) for
  // DeepSeek-V2-Lite and then ignores q_lora_rank.
  const bool lite = o.n_layers == 26 || o.n_layers == 27 || (o.n_layers == 48 && o.vocab_size == 128256);
  BRIGADE_CHECK(!lite || o.mla.q_lora_rank == 0, "GGUF export as deepseek2: llama.cpp treats a model of ", o.n_layers,
                " layers as DeepSeek-V2-Lite and ignores its query compression (model.mla.q_lora_rank = ",
                o.mla.q_lora_rank, "), so it would not load the file");
  const auto& m = o.moe;
  if (m.enabled() && m.num_groups > 1 && m.topk_group < m.num_groups) {
    BRIGADE_CHECK(m.group_score == moe::GroupScore::kTopTwoSum,
                  "GGUF export as deepseek2: llama.cpp ranks expert groups by the sum of their two best scores "
                  "(model.moe.group_score: top2_sum); group_score max (deepseek_v2's group_limited_greedy) has no "
                  "GGUF form");
  }
}

uint32_t u32(int64_t v, const char* what) {
  BRIGADE_CHECK(v >= 0 && v <= static_cast<int64_t>(UINT32_MAX), "GGUF export: ", what, " = ", v,
                " does not fit a uint32");
  return static_cast<uint32_t>(v);
}

// The RoPE scaling llama.cpp's rope.scaling.* keys express as brigade computes it:
// linear, and yarn with transformers' defaults for the rest (truncated correction
// range, no explicit attention factor). llama.cpp scales cos/sin by 0.1 ln(factor) + 1
// except for deepseek2, which instead scales the softmax by mscale(factor,
// mscale_all_dim)^2 (yarn_log_multiplier): DeepSeek's configs, mscale = mscale_all_dim.
void check_rope_scaling(const TransformerOptions& o) {
  const auto& s = o.rope_scaling;
  if (!s.enabled()) return;
  const char* why = nullptr;
  if (s.type == RopeScalingType::kLlama3) why = "llama3 scaling (llama.cpp keeps it in a rope_freqs tensor brigade does not write yet)";
  else if (s.type == RopeScalingType::kYarn && (!s.truncate || s.attention_factor > 0))
    why = "yarn with truncate false or an explicit attention_factor";
  else if (s.type == RopeScalingType::kYarn && o.is_mla() && !(s.mscale > 0 && s.mscale == s.mscale_all_dim))
    why = "yarn on multi-head latent attention without mscale = mscale_all_dim (DeepSeek's form, which llama.cpp assumes)";
  else if (s.type == RopeScalingType::kYarn && !o.is_mla() && (s.mscale > 0 || s.mscale_all_dim > 0))
    why = "yarn with mscale or mscale_all_dim on grouped-query attention";
  BRIGADE_CHECK(why == nullptr, "GGUF export: model.rope_scaling has no llama.cpp equivalent: ", why,
                "; export it to Hugging Face instead");
}

void add_rope_scaling(GgufWriter& writer, const std::string& arch, const TransformerOptions& o) {
  const auto& s = o.rope_scaling;
  if (!s.enabled()) return;
  const std::string key = arch + ".rope.scaling.";
  const bool yarn = s.type == RopeScalingType::kYarn;
  writer.set(key + "type", Scalar(std::string(yarn ? "yarn" : "linear")));
  writer.set(key + "factor", Scalar(static_cast<float>(s.factor)));
  if (!yarn) return;
  const int64_t original = s.original_max_seq_len > 0 ? s.original_max_seq_len : o.max_seq_len;
  writer.set(key + "original_context_length", Scalar(u32(original, "rope_scaling.original_max_seq_len")));
  writer.set(key + "yarn_beta_fast", Scalar(static_cast<float>(s.beta_fast)));
  writer.set(key + "yarn_beta_slow", Scalar(static_cast<float>(s.beta_slow)));
  // llama.cpp's convention (convert_hf_to_gguf): 0.1 * mscale_all_dim.
  if (o.is_mla()) writer.set(key + "yarn_log_multiplier", Scalar(static_cast<float>(0.1 * s.mscale_all_dim)));
}

void check_family(const TransformerOptions& o, HfFamily family) {
  const std::string name = architecture(family);
  check_rope_scaling(o);
  if (family == HfFamily::kDeepseekV2 || family == HfFamily::kDeepseekV3) {
    check_deepseek2(o);
    return;
  }
  BRIGADE_CHECK(!o.is_mla(), "GGUF export as ", name, ": the model has multi-head latent attention, which exports "
                "as deepseek2");
  if (family == HfFamily::kQwen3Moe) {
    check_qwen3moe(o);
    return;
  }
  BRIGADE_CHECK(!o.moe.enabled(), "GGUF export covers dense llama/qwen2/qwen3 models only (MoE models export as deepseek2 or "
                "qwen3moe); exporting as ", name, " a model with ", o.moe.num_experts, " routed experts (MoE)");
  switch (family) {
    case HfFamily::kLlama:
      BRIGADE_CHECK(!o.qk_norm && !o.qkv_bias, "GGUF export as ", name,
                    ": the model has ", o.qk_norm ? "q/k norm (a qwen3 feature)" : "QKV bias (a qwen2 feature)");
      break;
    case HfFamily::kQwen2:
      BRIGADE_CHECK(o.qkv_bias && !o.qk_norm, "GGUF export as ", name,
                    ": qwen2 has QKV bias and no q/k norm; the model has qkv_bias=", o.qkv_bias,
                    " qk_norm=", o.qk_norm);
      break;
    case HfFamily::kQwen3:
      BRIGADE_CHECK(o.qk_norm && !o.qkv_bias, "GGUF export as ", name,
                    ": qwen3 has q/k norm and no QKV bias; the model has qkv_bias=", o.qkv_bias,
                    " qk_norm=", o.qk_norm);
      break;
    case HfFamily::kQwen3Moe:
    case HfFamily::kDeepseekV2:
    case HfFamily::kDeepseekV3: break;  // handled above
  }
}

// deepseek2's keys (llama.cpp reads them in llama_model_deepseek2::load_arch_hparams):
// the latent cache is one "kv head" of kv_lora_rank + qk_rope_head_dim keys and
// kv_lora_rank values; the _mla lengths are the per-head query/key and value sizes.
void add_deepseek2_metadata(GgufWriter& writer, const TransformerOptions& o) {
  const std::string arch = "deepseek2";
  const auto& a = o.mla;
  const auto& m = o.moe;
  writer.set(arch + ".attention.head_count_kv", Scalar(uint32_t{1}));
  writer.set(arch + ".attention.key_length", Scalar(u32(a.cache_width(), "kv_lora_rank + qk_rope_head_dim")));
  writer.set(arch + ".attention.value_length", Scalar(u32(a.kv_lora_rank, "mla.kv_lora_rank")));
  writer.set(arch + ".attention.key_length_mla", Scalar(u32(a.qk_head_dim(), "qk_nope_head_dim + qk_rope_head_dim")));
  writer.set(arch + ".attention.value_length_mla", Scalar(u32(a.v_head_dim, "mla.v_head_dim")));
  writer.set(arch + ".attention.q_lora_rank", Scalar(u32(a.q_lora_rank, "mla.q_lora_rank")));
  writer.set(arch + ".attention.kv_lora_rank", Scalar(u32(a.kv_lora_rank, "mla.kv_lora_rank")));
  writer.set(arch + ".rope.dimension_count", Scalar(u32(a.qk_rope_head_dim, "mla.qk_rope_head_dim")));
  // A dense model is every layer dense; llama.cpp still requires the expert sizes.
  writer.set(arch + ".leading_dense_block_count", Scalar(u32(m.enabled() ? m.first_k_dense : o.n_layers, "first_k_dense")));
  writer.set(arch + ".expert_feed_forward_length",
             Scalar(u32(m.enabled() ? m.expert_size(o.ff_size()) : o.ff_size(), "moe.expert_d_ff")));
  writer.set(arch + ".expert_shared_count", Scalar(u32(m.enabled() ? m.num_shared_experts : 0, "moe.num_shared_experts")));
  if (!m.enabled()) return;
  writer.set(arch + ".expert_weights_scale", Scalar(static_cast<float>(m.routed_scaling)));
  writer.set(arch + ".expert_weights_norm", Scalar(m.normalize_topk));
  const bool sigmoid = m.score_function == moe::ScoreFunction::kSigmoid;
  writer.set(arch + ".expert_gating_func", Scalar(uint32_t{sigmoid ? 2u : 1u}));  // llama.cpp: 1 softmax, 2 sigmoid
  // Groups that all stay selected route like no groups (llama.cpp asserts used < count).
  if (m.num_groups > 1 && m.topk_group < m.num_groups) {
    writer.set(arch + ".expert_group_count", Scalar(u32(m.num_groups, "moe.num_groups")));
    writer.set(arch + ".expert_group_used_count", Scalar(u32(m.topk_group, "moe.topk_group")));
  }
}

}  // namespace

std::string gguf_tensor_name(const std::string& name) {
  static const std::map<std::string, std::string> kGlobal = {
      {"embed_tokens.weight", "token_embd.weight"},
      {"norm.weight", "output_norm.weight"},
      {"lm_head.weight", "output.weight"},
  };
  static const std::map<std::string, std::string> kLayer = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.q_proj.bias", "attn_q.bias"},
      {"self_attn.k_proj.bias", "attn_k.bias"},
      {"self_attn.v_proj.bias", "attn_v.bias"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"self_attn.q_norm.weight", "attn_q_norm.weight"},
      {"self_attn.k_norm.weight", "attn_k_norm.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"},
      {"mlp.gate.weight", "ffn_gate_inp.weight"},
      {"mlp.experts.down_proj", "ffn_down_exps.weight"},
      {"mlp.gate.e_score_correction_bias", "exp_probs_b.bias"},
      {"mlp.shared_experts.gate_proj.weight", "ffn_gate_shexp.weight"},
      {"mlp.shared_experts.up_proj.weight", "ffn_up_shexp.weight"},
      {"mlp.shared_experts.down_proj.weight", "ffn_down_shexp.weight"},
      {"self_attn.q_a_proj.weight", "attn_q_a.weight"},
      {"self_attn.q_a_layernorm.weight", "attn_q_a_norm.weight"},
      {"self_attn.q_b_proj.weight", "attn_q_b.weight"},
      {"self_attn.kv_a_proj_with_mqa.weight", "attn_kv_a_mqa.weight"},
      {"self_attn.kv_a_layernorm.weight", "attn_kv_a_norm.weight"},
  };
  if (auto it = kGlobal.find(name); it != kGlobal.end()) return it->second;
  static const std::regex kLayerName(R"(layers\.(\d+)\.(.+))");
  std::smatch m;
  if (std::regex_match(name, m, kLayerName)) {
    if (auto it = kLayer.find(m[2].str()); it != kLayer.end()) return "blk." + m[1].str() + "." + it->second;
  }
  BRIGADE_FAIL("GGUF export: no llama.cpp tensor name for '", name, "'");
}

torch::Tensor permute_for_interleaved_rope(const torch::Tensor& weight, int64_t heads, bool inverse) {
  const int64_t rows = weight.size(0);
  BRIGADE_ASSERT(rows % (2 * heads) == 0, "q/k rows ", rows, " do not split into ", heads, " heads of pairs");
  std::vector<int64_t> shape = {heads, inverse ? rows / heads / 2 : 2, inverse ? 2 : rows / heads / 2};
  for (int64_t d = 1; d < weight.dim(); ++d) shape.push_back(weight.size(d));
  return weight.reshape(shape).transpose(1, 2).reshape(weight.sizes()).contiguous();
}

namespace {

// The vocabulary keys: a byte-level BPE as tokenizer.ggml.model "gpt2" (tokens,
// types, merges, pre-tokenizer), a SentencePiece one as "llama" (tokens, scores,
// types, add_space_prefix); both padded to the embedding's rows with unused
// placeholders (llama.cpp requires one token per row).
void write_vocabulary(GgufWriter& writer, const data::Tokenizer& tokenizer, int64_t vocab_size) {
  const auto pad_name = [](int64_t id) { return "[PAD" + std::to_string(id) + "]"; };
  if (const auto* spm = dynamic_cast<const data::SpmTokenizer*>(&tokenizer)) {
    const data::SpmVocabulary& v = spm->vocabulary();
    const auto n_tokens = static_cast<int64_t>(v.tokens.size());
    BRIGADE_CHECK(n_tokens <= vocab_size, "GGUF export: the tokenizer has ", n_tokens, " tokens but the model only ",
                  vocab_size, " embedding rows (model.vocab_size)");
    std::vector<Scalar> tokens, scores, types;
    for (int64_t id = 0; id < vocab_size; ++id) {
      const bool real = id < n_tokens;
      tokens.emplace_back(real ? v.tokens[static_cast<size_t>(id)] : pad_name(id));
      scores.emplace_back(real ? v.scores[static_cast<size_t>(id)] : -1e9f);
      types.emplace_back(real ? v.types[static_cast<size_t>(id)] : int32_t{5});
    }
    writer.set("tokenizer.ggml.model", Scalar(std::string("llama")));
    writer.set("tokenizer.ggml.tokens", Value::array(ValueType::kString, std::move(tokens)));
    writer.set("tokenizer.ggml.scores", Value::array(ValueType::kFloat32, std::move(scores)));
    writer.set("tokenizer.ggml.token_type", Value::array(ValueType::kInt32, std::move(types)));
    writer.set("tokenizer.ggml.add_space_prefix", Scalar(v.add_space_prefix));
    for (const auto& [id, key] : {std::pair{v.bos, "tokenizer.ggml.bos_token_id"}, {v.eos, "tokenizer.ggml.eos_token_id"},
                                  {v.unk, "tokenizer.ggml.unknown_token_id"}, {v.pad, "tokenizer.ggml.padding_token_id"}}) {
      if (id) writer.set(key, Scalar(u32(*id, key)));
    }
    writer.set("tokenizer.ggml.add_bos_token", Scalar(spm->add_bos()));
    writer.set("tokenizer.ggml.add_eos_token", Scalar(false));
    if (!spm->chat_template().empty()) writer.set("tokenizer.chat_template", Scalar(spm->chat_template()));
    return;
  }
  const auto* bpe_ptr = dynamic_cast<const data::BpeTokenizer*>(&tokenizer);
  BRIGADE_CHECK(bpe_ptr != nullptr, "GGUF export: tokenizer '", tokenizer.name(),
                "' is neither a byte-level BPE nor a SentencePiece vocabulary");
  const data::BpeTokenizer& bpe = *bpe_ptr;
  // Vocabulary: the tokenizer's tokens, padded to the embedding's rows with unused
  // placeholders (llama.cpp requires one token per row).
  const std::vector<std::string>& tokenizer_tokens = bpe.tokens();
  const auto n_tokens = static_cast<int64_t>(tokenizer_tokens.size());
  BRIGADE_CHECK(n_tokens <= vocab_size, "GGUF export: the tokenizer has ", n_tokens,
                " tokens but the model only ", vocab_size, " embedding rows (model.vocab_size)");
  std::vector<Scalar> tokens;
  std::vector<Scalar> token_types;
  tokens.reserve(vocab_size);
  token_types.reserve(vocab_size);
  for (int64_t id = 0; id < vocab_size; ++id) {
    int32_t type = 5;  // unused
    if (id < n_tokens) {
      tokens.emplace_back(tokenizer_tokens[id]);
      type = bpe.is_special(id) ? 3 : bpe.is_added(id) ? 4 : 1;  // control, user-defined, normal
    } else {
      tokens.emplace_back(pad_name(id));
    }
    token_types.emplace_back(type);
  }
  writer.set("tokenizer.ggml.model", Scalar(std::string("gpt2")));
  writer.set("tokenizer.ggml.pre", Scalar(llama_cpp_pre(bpe.pre_tokenizer())));
  writer.set("tokenizer.ggml.tokens", Value::array(ValueType::kString, std::move(tokens)));
  writer.set("tokenizer.ggml.token_type", Value::array(ValueType::kInt32, std::move(token_types)));
  writer.set("tokenizer.ggml.merges", Value::strings(bpe.merges()));
  const std::pair<std::string_view, const char*> roles[] = {
      {data::kBosToken, "tokenizer.ggml.bos_token_id"},
      {data::kEosToken, "tokenizer.ggml.eos_token_id"},
      {data::kPadToken, "tokenizer.ggml.padding_token_id"},
  };
  for (const auto& [token, key] : roles) {
    if (std::optional<int64_t> id = tokenizer.special_id(token)) writer.set(key, Scalar(u32(*id, key)));
  }
  // The end of a chat turn (ChatML's <|im_end|>, Llama 3's <|eot_id|>) and Llama 3.1's
  // end of a tool message: llama.cpp stops generation on them.
  if (std::optional<int64_t> id = tokenizer.special_id(data::kImEndToken))
    writer.set("tokenizer.ggml.eot_token_id", Scalar(u32(*id, "tokenizer.ggml.eot_token_id")));
  if (std::optional<int64_t> id = tokenizer.special_id("<|eom_id|>"))
    writer.set("tokenizer.ggml.eom_token_id", Scalar(u32(*id, "tokenizer.ggml.eom_token_id")));
  // The model's BOS convention (data::Tokenizer::add_bos: brigade's byte tokenizer and
  // Llama-style vocabularies start sequences with BOS, Qwen-style ones do not), so
  // llama.cpp frames prompts as training did; and the model's chat template.
  writer.set("tokenizer.ggml.add_bos_token", Scalar(bpe.special_id(data::kBosToken).has_value() && bpe.add_bos()));
  if (!bpe.chat_template().empty()) writer.set("tokenizer.chat_template", Scalar(bpe.chat_template()));
  writer.set("tokenizer.ggml.add_eos_token", Scalar(false));

}

}  // namespace

void export_gguf(const Transformer& model, HfFamily family, const data::Tokenizer& tokenizer,
                 GgufQuant quant, const std::filesystem::path& out, const std::string& model_name) {
  const TransformerOptions& o = model->options();
  check_family(o, family);
  const std::string arch = architecture(family);

  GgufWriter writer;
  writer.set("general.architecture", Scalar(arch));
  writer.set("general.name", Scalar(model_name));
  writer.set("general.file_type", Scalar(file_type(quant)));
  writer.set("general.quantization_version", Scalar(uint32_t{2}));
  writer.set("general.alignment", Scalar(static_cast<uint32_t>(gguf::kDefaultAlignment)));
  writer.set(arch + ".vocab_size", Scalar(u32(o.vocab_size, "vocab_size")));
  writer.set(arch + ".context_length", Scalar(u32(o.max_seq_len, "max_seq_len")));
  writer.set(arch + ".embedding_length", Scalar(u32(o.d_model, "d_model")));
  writer.set(arch + ".block_count", Scalar(u32(o.n_layers, "n_layers")));
  writer.set(arch + ".feed_forward_length", Scalar(u32(o.ff_size(), "d_ff")));
  writer.set(arch + ".attention.head_count", Scalar(u32(o.n_heads, "n_heads")));
  writer.set(arch + ".attention.layer_norm_rms_epsilon", Scalar(static_cast<float>(o.norm_eps)));
  writer.set(arch + ".rope.freq_base", Scalar(static_cast<float>(o.rope_theta)));
  add_rope_scaling(writer, arch, o);
  if (o.is_mla()) {
    add_deepseek2_metadata(writer, o);
  } else {
    writer.set(arch + ".attention.head_count_kv", Scalar(u32(o.kv_heads(), "n_kv_heads")));
    writer.set(arch + ".attention.key_length", Scalar(u32(o.head_size(), "head_dim")));
    writer.set(arch + ".attention.value_length", Scalar(u32(o.head_size(), "head_dim")));
    writer.set(arch + ".rope.dimension_count", Scalar(u32(o.head_size(), "head_dim")));
  }
  if (o.moe.enabled()) {
    writer.set(arch + ".expert_count", Scalar(u32(o.moe.num_experts, "moe.num_experts")));
    writer.set(arch + ".expert_used_count", Scalar(u32(o.moe.top_k, "moe.top_k")));
    writer.set(arch + ".expert_feed_forward_length",
               Scalar(u32(o.moe.expert_size(o.ff_size()), "moe.expert_d_ff")));
  }

  write_vocabulary(writer, tokenizer, o.vocab_size);
  const gguf::MixModel mix_model{.architecture = arch,
                                 .n_layers = o.n_layers,
                                 .n_heads = o.n_heads,
                                 .n_kv_heads = o.is_mla() ? o.n_heads : o.kv_heads(),
                                 .n_experts = o.moe.enabled() ? o.moe.num_experts : 0,
                                 .has_output = !o.tie_embeddings};

  // Weights, in llama.cpp's order: embedding, then each block, then the output head.
  std::map<std::string, torch::Tensor> state;
  for (const auto& [name, tensor] : model->state_dict()) {
    if (!name.starts_with("mtp.")) state.emplace(name, tensor);  // llama.cpp runs no MTP modules (docs/models.md)
  }
  torch::NoGradGuard no_grad;
  // Quantizing the weights is the long part: a bar over the model's tensors.
  const auto tensors_total = static_cast<int64_t>(state.size());
  Progress bar("export gguf (tensors)", tensors_total, stderr_is_terminal(), /*quiet_seconds=*/2.0);
  auto take = [&](const std::string& name) {
    auto it = state.find(name);
    BRIGADE_ASSERT(it != state.end(), "state_dict has no ", name);
    bar.tick(tensors_total - static_cast<int64_t>(state.size()), gguf_quant_name(quant));
    torch::Tensor t = it->second.detach().to(torch::kCPU, torch::kFloat32);
    state.erase(it);
    return t;
  };
  auto put = [&](const std::string& gguf_name, const torch::Tensor& t) {
    writer.add_tensor(gguf_name, t, storage_type(gguf_name, t, quant, mix_model));
  };
  auto add = [&](const std::string& name) {
    torch::Tensor t = take(name);
    if (family == HfFamily::kLlama) {
      if (name.ends_with("self_attn.q_proj.weight")) t = permute_for_interleaved_rope(t, o.n_heads);
      if (name.ends_with("self_attn.k_proj.weight")) t = permute_for_interleaved_rope(t, o.kv_heads());
    }
    // deepseek2 rotates interleaved pairs ("normal" RoPE), as DeepSeek's checkpoints store them.
    if (o.is_mla()) t = convert_rope_rows(name, t, o, /*to_interleaved=*/true).contiguous();
    put(gguf_tensor_name(name), t);
  };
  // Multi-head latent attention as deepseek2 reads it: kv_b_proj [heads * (dn + dv), kv_lora]
  // split per head into attn_k_b [heads, kv_lora, dn] (transposed) and attn_v_b [heads, dv, kv_lora].
  auto add_mla = [&](const std::string& p, const std::string& blk) {
    const auto& a = o.mla;
    if (a.q_lora_rank > 0) {
      for (const char* name : {"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"}) add(p + "self_attn." + name);
    } else {
      add(p + "self_attn.q_proj.weight");
    }
    add(p + "self_attn.kv_a_proj_with_mqa.weight");
    add(p + "self_attn.kv_a_layernorm.weight");
    const torch::Tensor kv_b =
        take(p + "self_attn.kv_b_proj.weight").view({o.n_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank});
    put(blk + "attn_k_b.weight", kv_b.narrow(1, 0, a.qk_nope_head_dim).transpose(1, 2).contiguous());
    put(blk + "attn_v_b.weight", kv_b.narrow(1, a.qk_nope_head_dim, a.v_head_dim).contiguous());
  };
  add("embed_tokens.weight");
  for (int64_t layer = 0; layer < o.n_layers; ++layer) {
    const std::string p = "layers." + std::to_string(layer) + ".";
    const std::string blk = "blk." + std::to_string(layer) + ".";
    add(p + "input_layernorm.weight");
    if (o.is_mla()) {
      add_mla(p, blk);
    } else {
      for (const char* proj : {"q_proj", "k_proj", "v_proj"}) {
        add(p + "self_attn." + proj + ".weight");
        if (o.qkv_bias) add(p + "self_attn." + proj + ".bias");
      }
    }
    if (o.qk_norm) {
      add(p + "self_attn.q_norm.weight");
      add(p + "self_attn.k_norm.weight");
    }
    add(p + "self_attn.o_proj.weight");
    add(p + "post_attention_layernorm.weight");
    if (o.is_moe_layer(layer)) {
      if (o.moe.score_function == moe::ScoreFunction::kSigmoid && o.is_mla()) {
        add(p + "mlp.gate.e_score_correction_bias");  // deepseek2's exp_probs_b: selection only, as brigade
      } else {
        // qwen3moe and softmax deepseek2 have no selection bias; a bias moved by
        // aux-loss-free balancing changes which experts brigade picks, so dropping it
        // would change the model.
        const torch::Tensor bias = take(p + "mlp.gate.e_score_correction_bias");  // [E]
        BRIGADE_CHECK(bias.abs().max().item<double>() == 0.0, "GGUF export: ", p,
                      "mlp.gate.e_score_correction_bias is not zero (aux-loss-free balancing moved it), and ", arch,
                      " with softmax scores routes without a selection bias; train with "
                      "model.moe.bias_update_rate=0 to export");
      }
      add(p + "mlp.gate.weight");  // [E, D] -> ffn_gate_inp, ne [D, E]
      // gate_up_proj [E, 2F, D] holds each expert's gate rows, then its up rows;
      // llama.cpp wants them as two tensors of ne [D, F, E].
      const torch::Tensor gate_up = take(p + "mlp.experts.gate_up_proj");
      const int64_t ff = gate_up.size(1) / 2;
      put(blk + "ffn_gate_exps.weight", gate_up.narrow(1, 0, ff).contiguous());
      put(blk + "ffn_up_exps.weight", gate_up.narrow(1, ff, ff).contiguous());
      add(p + "mlp.experts.down_proj");  // [E, D, F] -> ffn_down_exps, ne [F, D, E]
      if (o.moe.num_shared_experts > 0) {
        for (const char* proj : {"gate_proj", "up_proj", "down_proj"}) add(p + "mlp.shared_experts." + proj + ".weight");
      }
    } else {
      add(p + "mlp.gate_proj.weight");
      add(p + "mlp.up_proj.weight");
      add(p + "mlp.down_proj.weight");
    }
  }
  add("norm.weight");
  if (!o.tie_embeddings) add("lm_head.weight");
  // Anything left is a parameter this exporter does not know: losing it silently
  // would write a model that computes something else.
  if (!state.empty()) BRIGADE_FAIL("GGUF export: unexpected tensor '", state.begin()->first, "' in the model");
  bar.tick(tensors_total, "writing");
  bar.finish();
  writer.write(out);
}

}  // namespace brigade::model
