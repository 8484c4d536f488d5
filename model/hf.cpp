#include "model/hf.h"

#include <array>
#include <optional>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/progress.h"
#include "model/safetensors.h"
#include "moe/options.h"

namespace brigade::model {
namespace {

using nlohmann::json;

struct FamilyInfo {
  HfFamily family;
  const char* model_type;
  const char* architecture;
};
constexpr FamilyInfo kFamilies[] = {
    {HfFamily::kLlama, "llama", "LlamaForCausalLM"},
    {HfFamily::kQwen2, "qwen2", "Qwen2ForCausalLM"},
    {HfFamily::kQwen3, "qwen3", "Qwen3ForCausalLM"},
    {HfFamily::kQwen3Moe, "qwen3_moe", "Qwen3MoeForCausalLM"},
    {HfFamily::kDeepseekV2, "deepseek_v2", "DeepseekV2ForCausalLM"},
    {HfFamily::kDeepseekV3, "deepseek_v3", "DeepseekV3ForCausalLM"},
};

bool is_deepseek(HfFamily f) { return f == HfFamily::kDeepseekV2 || f == HfFamily::kDeepseekV3; }

// config.json as a JSON object; anything else is an Error naming the file.
json read_config_object(const std::filesystem::path& config_json) {
  const std::string where = config_json.string();
  json j;
  try {
    j = json::parse(read_file(config_json));
  } catch (const json::exception& e) {
    BRIGADE_FAIL(where, ": not valid JSON: ", e.what());
  }
  BRIGADE_CHECK(j.is_object(), where, ": expected a JSON object");
  return j;
}

const FamilyInfo& info(HfFamily family) {
  for (const auto& f : kFamilies)
    if (f.family == family) return f;
  BRIGADE_ASSERT(false, "unknown HfFamily");
  return kFamilies[0];
}

// Reads config.json fields with the file and field in every error.
class ConfigReader {
 public:
  ConfigReader(const json& j, std::string where) : j_(j), where_(std::move(where)) {}
  bool has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }
  int64_t integer(const char* key, std::optional<int64_t> fallback = std::nullopt) const {
    if (!has(key)) {
      BRIGADE_CHECK(fallback.has_value(), where_, ": missing field '", key, "'");
      return *fallback;
    }
    BRIGADE_CHECK(j_[key].is_number_integer() && j_[key].get<int64_t>() >= 0, where_, ": field '", key,
                  "' must be a non-negative integer, got ", j_[key].dump());
    return j_[key].get<int64_t>();
  }
  double real(const char* key, std::optional<double> fallback = std::nullopt) const {
    if (!has(key)) {
      BRIGADE_CHECK(fallback.has_value(), where_, ": missing field '", key, "'");
      return *fallback;
    }
    BRIGADE_CHECK(j_[key].is_number(), where_, ": field '", key, "' must be a number, got ", j_[key].dump());
    return j_[key].get<double>();
  }
  bool boolean(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    BRIGADE_CHECK(j_[key].is_boolean(), where_, ": field '", key, "' must be true or false, got ", j_[key].dump());
    return j_[key].get<bool>();
  }
  std::string text(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    BRIGADE_CHECK(j_[key].is_string(), where_, ": field '", key, "' must be a string, got ", j_[key].dump());
    return j_[key].get<std::string>();
  }
  // Features brigade does not implement must be off.
  void require_false(const char* key, const char* why) const {
    BRIGADE_CHECK(!boolean(key, false), where_, ": field '", key, "' is true, but brigade has no ", why);
  }
  const json& node(const char* key) const { return j_[key]; }

 private:
  const json& j_;
  std::string where_;
};

// qwen3_moe: softmax top-k routing over fused experts, no shared experts; the
// layers in mlp_only_layers (which must be the first k) keep a dense MLP.
void read_qwen3_moe(const ConfigReader& r, const json& j, const std::string& where, TransformerOptions& o) {
  auto& m = o.moe;
  m.num_experts = r.has("num_experts") ? r.integer("num_experts") : r.integer("num_local_experts");
  BRIGADE_CHECK(m.num_experts > 0, where, ": field 'num_experts' must be positive");
  m.top_k = r.integer("num_experts_per_tok");
  m.expert_d_ff = r.integer("moe_intermediate_size");
  m.num_shared_experts = 0;
  m.score_function = moe::ScoreFunction::kSoftmax;
  m.num_groups = 1;
  m.topk_group = 1;
  m.normalize_topk = r.boolean("norm_topk_prob", false);
  m.routed_scaling = 1.0;
  m.bias_update_rate = 0.0;  // qwen3_moe has no selection bias to learn
  m.batch_aux_loss = r.real("router_aux_loss_coef", 0.0);
  m.dropless = true;
  BRIGADE_CHECK(r.integer("decoder_sparse_step", 1) == 1, where,
                ": field 'decoder_sparse_step' must be 1 (brigade's MoE layers are every layer after the first dense ones)");
  m.first_k_dense = 0;
  if (r.has("mlp_only_layers")) {
    const json& dense = j["mlp_only_layers"];
    BRIGADE_CHECK(dense.is_array(), where, ": field 'mlp_only_layers' must be a list of layer indices");
    for (size_t i = 0; i < dense.size(); ++i)
      BRIGADE_CHECK(dense[i].is_number_integer() && dense[i].get<int64_t>() == static_cast<int64_t>(i), where,
                    ": field 'mlp_only_layers' is ", dense.dump(), "; brigade keeps dense MLPs in the first layers only ([0, 1, ..., k-1])");
    m.first_k_dense = static_cast<int64_t>(dense.size());
  }
}

// The rotary base and scaling: rope_parameters (transformers 5) or rope_scaling
// (earlier; it replaces rope_parameters when both are there and it is not empty, as
// in transformers 5), resolved as transformers' standardize_rope_params and rope init
// functions do.
void read_rope(const ConfigReader& r, const std::string& where, TransformerOptions& o) {
  o.rope_theta = r.real("rope_theta", 10000.0);
  const int64_t max_pos = r.integer("max_position_embeddings", 2048);
  const bool legacy = r.has("rope_scaling") && !(r.node("rope_scaling").is_object() && r.node("rope_scaling").empty());
  const char* key = legacy ? "rope_scaling" : "rope_parameters";
  if (!r.has(key)) return;
  const json& rope = r.node(key);
  BRIGADE_CHECK(rope.is_object(), where, ": field '", key, "' must be an object, got ", rope.dump());
  const ConfigReader p(rope, where + ": field '" + key + "'");
  const std::string type = p.text("rope_type", p.text("type", "default"));
  if (p.has("rope_theta")) o.rope_theta = p.real("rope_theta");
  auto& s = o.rope_scaling;
  s = RopeScaling{};
  // A top-level original_max_position_embeddings takes priority (as transformers has it).
  const int64_t original = r.has("original_max_position_embeddings")
                               ? r.integer("original_max_position_embeddings")
                               : p.integer("original_max_position_embeddings", max_pos);
  if (type == "default") return;
  if (type == "linear") {
    s.type = RopeScalingType::kLinear;
    s.factor = p.real("factor");
  } else if (type == "llama3") {
    s.type = RopeScalingType::kLlama3;
    s.factor = p.real("factor");
    s.low_freq_factor = p.real("low_freq_factor");
    s.high_freq_factor = p.real("high_freq_factor");
    s.original_max_seq_len = p.integer("original_max_position_embeddings");
  } else if (type == "yarn") {
    s.type = RopeScalingType::kYarn;
    s.original_max_seq_len = original;
    s.factor = p.has("factor") ? p.real("factor") : static_cast<double>(max_pos) / static_cast<double>(original);
    // 0 or null mean the default in transformers (`or 32`, `or 1`), and "unset" for the mscales.
    s.beta_fast = p.real("beta_fast", 0.0) != 0.0 ? p.real("beta_fast") : 32.0;
    s.beta_slow = p.real("beta_slow", 0.0) != 0.0 ? p.real("beta_slow") : 1.0;
    s.mscale = p.real("mscale", 0.0);
    s.mscale_all_dim = p.real("mscale_all_dim", 0.0);
    s.attention_factor = p.real("attention_factor", 0.0);
    s.truncate = p.boolean("truncate", true);
  } else {
    BRIGADE_FAIL(where, ": field '", key, ".rope_type' is '", type,
                 "'; brigade implements default, linear, llama3 and yarn RoPE");
  }
  try {
    s.validate();
  } catch (const Error& e) {
    BRIGADE_FAIL(where, ": field '", key, "': ", e.message());
  }
}

// deepseek_v2 / deepseek_v3: multi-head latent attention; MoE after the first
// first_k_dense_replace layers (none: a dense model), routed as the family does.
// Fallbacks are transformers' config defaults.
void read_deepseek(const ConfigReader& r, const json& j, const std::string& where, HfConfig& c) {
  auto& o = c.options;
  const bool v3 = c.family == HfFamily::kDeepseekV3;
  o.attention = AttentionKind::kMla;
  o.head_dim = 0;
  BRIGADE_CHECK(o.n_kv_heads == o.n_heads, where, ": field 'num_key_value_heads' (", o.n_kv_heads,
                ") must equal num_attention_heads (", o.n_heads, ") for multi-head latent attention");
  o.n_kv_heads = 0;
  auto& a = o.mla;
  a.q_lora_rank = j.contains("q_lora_rank") ? (j["q_lora_rank"].is_null() ? 0 : r.integer("q_lora_rank")) : 1536;
  a.kv_lora_rank = r.integer("kv_lora_rank", 512);
  a.qk_nope_head_dim = r.integer("qk_nope_head_dim", 128);
  a.qk_rope_head_dim = r.integer("qk_rope_head_dim", 64);
  a.v_head_dim = r.integer("v_head_dim", 128);
  r.require_false("attention_bias", "attention biases in multi-head latent attention");
  c.rope_interleaved = !v3 || r.boolean("rope_interleave", true);
  c.mtp_layers = v3 ? r.integer("num_nextn_predict_layers", r.integer("num_mtp_layers", 0)) : 0;
  o.mtp.depth = c.mtp_layers;

  auto& m = o.moe;
  const int64_t routed = r.integer("n_routed_experts", v3 ? 256 : 64);
  const int64_t first_dense = r.integer("first_k_dense_replace", v3 ? 3 : 0);
  if (routed == 0 || first_dense >= o.n_layers) {
    m.num_experts = 0;  // every layer dense
    return;
  }
  m.num_experts = routed;
  m.top_k = r.integer("num_experts_per_tok", v3 ? 8 : 6);
  m.expert_d_ff = r.integer("moe_intermediate_size", v3 ? 2048 : 1407);
  m.num_shared_experts = r.integer("n_shared_experts", v3 ? 1 : 2);
  m.shared_d_ff = 0;
  m.first_k_dense = first_dense;
  m.routed_scaling = r.real("routed_scaling_factor", v3 ? 2.5 : 1.0);
  m.dropless = true;
  if (v3) {  // noaux_tc: sigmoid scores, the selection bias, groups ranked by top-2 sums
    m.score_function = moe::ScoreFunction::kSigmoid;
    m.num_groups = r.integer("n_group", 8);
    m.topk_group = r.integer("topk_group", 4);
    m.group_score = moe::GroupScore::kTopTwoSum;
    m.normalize_topk = r.boolean("norm_topk_prob", true);
    return;
  }
  // deepseek_v2: softmax scores, no selection bias; transformers ignores norm_topk_prob.
  m.score_function = moe::ScoreFunction::kSoftmax;
  m.normalize_topk = false;
  m.bias_update_rate = 0.0;
  const std::string method = r.text("topk_method", "greedy");
  if (method == "greedy") {
    m.num_groups = m.topk_group = 1;
  } else if (method == "group_limited_greedy") {
    m.num_groups = r.integer("n_group");
    m.topk_group = r.integer("topk_group");
    m.group_score = moe::GroupScore::kMax;
  } else {
    BRIGADE_FAIL(where, ": field 'topk_method' is '", method, "'; deepseek_v2 routes greedy or group_limited_greedy");
  }
}

// Rows of a DeepSeek projection that feed RoPE: per head the last qk_rope_head_dim
// of each query head, and the shared rope key after the KV latent.
struct RopeRows {
  int64_t blocks = 0, stride = 0, offset = 0;
};
std::optional<RopeRows> rope_rows(const std::string& name, const TransformerOptions& o) {
  if (!o.is_mla()) return std::nullopt;
  const auto& a = o.mla;
  if (name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.q_b_proj.weight"))
    return RopeRows{o.n_heads, a.qk_head_dim(), a.qk_nope_head_dim};
  if (name.ends_with("self_attn.kv_a_proj_with_mqa.weight")) return RopeRows{1, a.cache_width(), a.kv_lora_rank};
  return std::nullopt;
}

std::string hf_name(const std::string& brigade_name) {
  return brigade_name == "lm_head.weight" ? brigade_name : "model." + brigade_name;
}

}  // namespace

// Interleaved rotary rows (pairs 2i, 2i+1) <-> rotate-half rows (brigade's: first the
// even, then the odd members).
torch::Tensor convert_rope_rows(const std::string& name, const torch::Tensor& t, const TransformerOptions& o,
                                bool to_interleaved) {
  const auto rows = rope_rows(name, o);
  if (!rows) return t;
  const int64_t dr = o.mla.qk_rope_head_dim;
  auto out = t.clone();
  for (int64_t b = 0; b < rows->blocks; ++b) {
    auto block = t.narrow(0, b * rows->stride + rows->offset, dr);
    auto moved = to_interleaved ? block.reshape({2, dr / 2, -1}).transpose(0, 1) : block.reshape({dr / 2, 2, -1}).transpose(0, 1);
    out.narrow(0, b * rows->stride + rows->offset, dr).copy_(moved.reshape(block.sizes()));
  }
  return out;
}

std::string family_name(HfFamily family) { return info(family).model_type; }

HfFamily family_of(const TransformerOptions& o) {
  if (o.is_mla()) {
    const auto& m = o.moe;
    if (!m.enabled()) return HfFamily::kDeepseekV3;
    const bool sigmoid = m.score_function == moe::ScoreFunction::kSigmoid;
    const int64_t ff = o.ff_size();
    const char* why = nullptr;
    if (m.num_shared_experts == 0) why = "model.moe.num_shared_experts is 0 (deepseek_v2/v3 always have shared experts)";
    else if (m.shared_size(ff) != m.expert_size(ff) * m.num_shared_experts)
      why = "model.moe.shared_d_ff is not expert_d_ff * num_shared_experts";
    else if (sigmoid && m.num_groups > 1 && m.group_score != moe::GroupScore::kTopTwoSum)
      why = "model.moe.group_score is max with sigmoid scores (deepseek_v3 ranks groups by their top-2 sums)";
    else if (sigmoid && m.num_groups > 1 && m.num_experts / m.num_groups < 2)
      why = "groups of one expert (deepseek_v3 sums each group's two best scores)";
    else if (!sigmoid && m.normalize_topk) why = "model.moe.normalize_topk with softmax scores (deepseek_v2 does not renormalise)";
    else if (!sigmoid && m.num_groups > 1 && m.group_score != moe::GroupScore::kMax)
      why = "model.moe.group_score is top2_sum with softmax scores (deepseek_v2 ranks groups by their best score)";
    BRIGADE_CHECK(why == nullptr, "this multi-head latent attention MoE model has no Hugging Face equivalent: ", why);
    return sigmoid ? HfFamily::kDeepseekV3 : HfFamily::kDeepseekV2;
  }
  if (o.moe.enabled()) {
    const auto& m = o.moe;
    const char* why = nullptr;
    if (m.score_function != moe::ScoreFunction::kSoftmax) why = "model.moe.score_function is not softmax";
    else if (m.num_shared_experts > 0) why = "model.moe.num_shared_experts > 0";
    else if (m.num_groups != 1) why = "model.moe.num_groups != 1";
    else if (m.routed_scaling != 1.0) why = "model.moe.routed_scaling != 1";
    else if (!o.qk_norm || o.qkv_bias) why = "the attention is not Qwen3's (q/k norm, no bias)";
    BRIGADE_CHECK(why == nullptr, "this Mixture-of-Experts model has no Hugging Face equivalent: ", why,
                  " (exportable MoE models route like qwen3_moe: softmax scores, no shared experts, no groups, "
                  "no scaling, Qwen3 attention)");
    return HfFamily::kQwen3Moe;
  }
  if (o.qk_norm) {
    BRIGADE_CHECK(!o.qkv_bias, "a model with both q/k norm and QKV bias matches no Hugging Face family "
                  "(qwen3 has q/k norm without bias, qwen2 bias without norm)");
    return HfFamily::kQwen3;
  }
  return o.qkv_bias ? HfFamily::kQwen2 : HfFamily::kLlama;
}

HfConfig read_hf_config(const std::filesystem::path& config_json) {
  const std::string where = config_json.string();
  const json j = read_config_object(config_json);
  ConfigReader r(j, where);
  HfConfig c;
  const std::string model_type = r.text("model_type", "");
  bool known = false;
  for (const auto& f : kFamilies)
    if (model_type == f.model_type) c.family = f.family, known = true;
  BRIGADE_CHECK(known, where, ": model_type '", model_type,
                "' is not supported (supported: llama, qwen2, qwen3, qwen3_moe, deepseek_v2, deepseek_v3)");
  const std::string act = r.text("hidden_act", "silu");
  BRIGADE_CHECK(act == "silu", where, ": field 'hidden_act' is '", act, "'; brigade's MLP is SwiGLU (silu)");
  auto& o = c.options;
  o.vocab_size = r.integer("vocab_size");
  o.d_model = r.integer("hidden_size");
  o.n_layers = r.integer("num_hidden_layers");
  o.n_heads = r.integer("num_attention_heads");
  o.n_kv_heads = r.integer("num_key_value_heads", o.n_heads);
  BRIGADE_CHECK(o.n_heads > 0, where, ": field 'num_attention_heads' must be positive");
  // deepseek configs carry head_dim = qk_rope_head_dim; MLA sizes its heads by the mla fields.
  o.head_dim = is_deepseek(c.family) ? 0
               : r.integer("head_dim", c.family == HfFamily::kLlama || c.family == HfFamily::kQwen2
                                           ? o.d_model / o.n_heads : 128);
  if (o.head_dim * o.n_heads == o.d_model) o.head_dim = 0;  // brigade's default says the same
  o.d_ff = r.integer("intermediate_size");
  o.max_seq_len = r.integer("max_position_embeddings", 2048);
  o.norm_eps = r.real("rms_norm_eps", 1e-6);
  o.tie_embeddings = r.boolean("tie_word_embeddings", false);
  o.qkv_bias = c.family == HfFamily::kQwen2;
  o.qk_norm = c.family == HfFamily::kQwen3 || c.family == HfFamily::kQwen3Moe;
  if (c.family == HfFamily::kQwen3Moe) read_qwen3_moe(r, j, where, o);
  if (is_deepseek(c.family)) read_deepseek(r, j, where, c);
  o.init_std = r.real("initializer_range", 0.02);
  if (c.family != HfFamily::kQwen2) r.require_false("attention_bias", "attention biases on llama/qwen3 (o_proj has none)");
  r.require_false("mlp_bias", "MLP biases");
  r.require_false("use_sliding_window", "sliding-window attention");
  // RoPE: transformers 5 writes rope_parameters, earlier versions rope_theta/rope_scaling.
  read_rope(r, where, o);
  c.torch_dtype = r.text("dtype", r.text("torch_dtype", "float32"));
  if (r.has("bos_token_id") && j["bos_token_id"].is_number_integer()) c.bos_token_id = j["bos_token_id"].get<int64_t>();
  if (r.has("eos_token_id") && j["eos_token_id"].is_number_integer()) c.eos_token_id = j["eos_token_id"].get<int64_t>();
  try {
    o.validate();
  } catch (const Error& e) {
    BRIGADE_FAIL(where, ": ", e.message());
  }
  return c;
}

HfConfig hf_config_for(const TransformerOptions& options) {
  HfConfig c;
  c.family = family_of(options);
  c.options = options;
  return c;
}

namespace {

nlohmann::ordered_json rope_parameters_json(const TransformerOptions& o) {
  const auto& s = o.rope_scaling;
  nlohmann::ordered_json rope;
  rope["rope_type"] = s.enabled() ? to_string(s.type) : "default";
  rope["rope_theta"] = o.rope_theta;
  if (!s.enabled()) return rope;
  rope["factor"] = s.factor;
  const int64_t original = s.original_max_seq_len > 0 ? s.original_max_seq_len : o.max_seq_len;
  if (s.type == RopeScalingType::kLlama3) {
    rope["low_freq_factor"] = s.low_freq_factor;
    rope["high_freq_factor"] = s.high_freq_factor;
    rope["original_max_position_embeddings"] = original;
  }
  if (s.type == RopeScalingType::kYarn) {
    rope["original_max_position_embeddings"] = original;
    rope["beta_fast"] = s.beta_fast;
    rope["beta_slow"] = s.beta_slow;
    if (s.mscale > 0) rope["mscale"] = s.mscale;
    if (s.mscale_all_dim > 0) rope["mscale_all_dim"] = s.mscale_all_dim;
    if (s.attention_factor > 0) rope["attention_factor"] = s.attention_factor;
    rope["truncate"] = s.truncate;
  }
  return rope;
}

// deepseek_v2/v3 fields: MLA sizes, the MoE layout and routing; a dense model is
// written as every layer dense (first_k_dense_replace = layers).
void add_deepseek_fields(const HfConfig& c, nlohmann::ordered_json& j) {
  const auto& o = c.options;
  const auto& a = o.mla;
  const auto& m = o.moe;
  const bool v3 = c.family == HfFamily::kDeepseekV3;
  if (a.q_lora_rank > 0) j["q_lora_rank"] = a.q_lora_rank;
  else j["q_lora_rank"] = nullptr;
  j["kv_lora_rank"] = a.kv_lora_rank;
  j["qk_nope_head_dim"] = a.qk_nope_head_dim;
  j["qk_rope_head_dim"] = a.qk_rope_head_dim;
  j["v_head_dim"] = a.v_head_dim;
  if (v3) j["rope_interleave"] = true;  // save_hf_checkpoint writes the rotary rows interleaved
  if (m.enabled()) {
    j["n_routed_experts"] = m.num_experts;
    j["num_experts_per_tok"] = m.top_k;
    j["moe_intermediate_size"] = m.expert_size(o.ff_size());
    j["n_shared_experts"] = m.num_shared_experts;
    j["first_k_dense_replace"] = m.first_k_dense;
    j["n_group"] = m.num_groups;
    j["topk_group"] = m.topk_group;
    j["routed_scaling_factor"] = m.routed_scaling;
    j["norm_topk_prob"] = m.normalize_topk;
    j["topk_method"] = v3 ? "noaux_tc" : (m.num_groups > 1 ? "group_limited_greedy" : "greedy");
  } else {
    // No layer builds an MoE, so these only have to be valid.
    j["n_routed_experts"] = 1;
    j["num_experts_per_tok"] = 1;
    j["moe_intermediate_size"] = o.ff_size();
    j["n_shared_experts"] = 1;
    j["first_k_dense_replace"] = o.n_layers;
    j["n_group"] = 1;
    j["topk_group"] = 1;
  }
  if (v3) j["num_nextn_predict_layers"] = o.mtp.depth;
}

}  // namespace

std::string hf_config_text(const HfConfig& c) {
  const auto& o = c.options;
  const auto& f = info(c.family);
  nlohmann::ordered_json j;
  j["architectures"] = {f.architecture};
  j["model_type"] = f.model_type;
  j["vocab_size"] = o.vocab_size;
  j["hidden_size"] = o.d_model;
  j["intermediate_size"] = o.ff_size();
  j["num_hidden_layers"] = o.n_layers;
  j["num_attention_heads"] = o.n_heads;
  j["num_key_value_heads"] = o.is_mla() ? o.n_heads : o.kv_heads();
  if (!o.is_mla()) j["head_dim"] = o.head_size();
  j["hidden_act"] = "silu";
  j["max_position_embeddings"] = o.max_seq_len;
  j["rms_norm_eps"] = o.norm_eps;
  j["initializer_range"] = o.init_std;
  j["tie_word_embeddings"] = o.tie_embeddings;
  // Both spellings: transformers 5 reads rope_parameters, 4.x rope_theta.
  j["rope_theta"] = o.rope_theta;
  j["rope_parameters"] = rope_parameters_json(o);
  if (o.rope_scaling.enabled()) {  // 4.x reads scaling from rope_scaling (5.x takes it over rope_parameters: the same)
    auto legacy = j["rope_parameters"];
    legacy.erase("rope_theta");
    legacy["type"] = legacy["rope_type"];
    j["rope_scaling"] = legacy;
  }
  if (is_deepseek(c.family)) add_deepseek_fields(c, j);
  if (c.family == HfFamily::kQwen3Moe) {
    const auto& m = o.moe;
    j["num_experts"] = m.num_experts;
    j["num_experts_per_tok"] = m.top_k;
    j["moe_intermediate_size"] = m.expert_size(o.ff_size());
    j["norm_topk_prob"] = m.normalize_topk;
    j["decoder_sparse_step"] = 1;
    std::vector<int64_t> dense;
    for (int64_t i = 0; i < m.first_k_dense; ++i) dense.push_back(i);
    j["mlp_only_layers"] = dense;
    j["router_aux_loss_coef"] = m.batch_aux_loss;
  }
  if (c.family != HfFamily::kQwen2) j["attention_bias"] = false;
  if (c.family == HfFamily::kLlama) j["mlp_bias"] = false;
  if (c.family != HfFamily::kLlama && !is_deepseek(c.family)) j["use_sliding_window"] = false;
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_id >= 0) j["eos_token_id"] = c.eos_token_id;
  j["dtype"] = c.torch_dtype;
  j["use_cache"] = true;
  return j.dump(2) + "\n";
}

namespace {

// Fused expert weights as the Hub stores them, one expert at a time: views of
// gate_up_proj [E, 2F, D] -> experts.e.{gate,up}_proj.weight [F, D], and of
// down_proj [E, D, F] -> experts.e.down_proj.weight [D, F]. Other tensors pass.
void add_unfused(NamedTensors& out, const std::string& name, const torch::Tensor& tensor) {
  const std::string gate_up = "mlp.experts.gate_up_proj", down = "mlp.experts.down_proj";
  const bool is_gate_up = name.ends_with(gate_up) && tensor.dim() == 3;
  const bool is_down = name.ends_with(down) && tensor.dim() == 3;
  if (!is_gate_up && !is_down) {
    out.emplace_back(name, tensor);
    return;
  }
  const std::string prefix = name.substr(0, name.size() - (is_gate_up ? gate_up : down).size()) + "mlp.experts.";
  for (int64_t e = 0; e < tensor.size(0); ++e) {
    const std::string expert = prefix + std::to_string(e) + ".";
    if (is_down) {
      out.emplace_back(expert + "down_proj.weight", tensor[e]);
      continue;
    }
    const int64_t ff = tensor.size(1) / 2;
    out.emplace_back(expert + "gate_proj.weight", tensor[e].narrow(0, 0, ff));
    out.emplace_back(expert + "up_proj.weight", tensor[e].narrow(0, ff, ff));
  }
}

}  // namespace

namespace {

// deepseek_v3 checkpoints keep multi-token prediction module k as decoder layer
// num_hidden_layers + k: enorm, hnorm, eh_proj, shared_head.norm, the block's own
// tensors under the usual layer names, and copies of the shared embedding
// (embed_tokens) and head (shared_head.head). brigade's "mtp.k.<rest>" maps there.
std::string mtp_layer_prefix(int64_t layers, int64_t k) { return "model.layers." + std::to_string(layers + k) + "."; }

std::string mtp_hf_name(const std::string& name, int64_t layers) {
  const auto dot = name.find('.', 4);  // "mtp.<k>.<rest>"
  const int64_t k = std::stoll(name.substr(4, dot - 4));
  std::string rest = name.substr(dot + 1);
  if (rest.starts_with("block.")) rest = rest.substr(6);
  else if (rest == "norm.weight") rest = "shared_head.norm.weight";
  return mtp_layer_prefix(layers, k) + rest;
}

// The layer index of "model.layers.N.<rest>", if the name has that form.
std::optional<int64_t> layer_index(const std::string& name) {
  const std::string prefix = "model.layers.";
  if (!name.starts_with(prefix)) return std::nullopt;
  const auto end = name.find('.', prefix.size());
  if (end == std::string::npos) return std::nullopt;
  const std::string index = name.substr(prefix.size(), end - prefix.size());
  if (index.empty() || index.size() > 9 || index.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
  return std::stoll(index);
}

// An MTP layer's copy of the shared embedding or head: the main tensor it repeats.
std::optional<std::string> shared_copy_of(const std::string& name, const TransformerOptions& o) {
  const auto layer = layer_index(name);
  if (!layer || *layer < o.n_layers) return std::nullopt;
  if (name.ends_with(".embed_tokens.weight")) return "model.embed_tokens.weight";
  if (name.ends_with(".shared_head.head.weight")) return o.tie_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  return std::nullopt;
}

}  // namespace

NamedTensors hf_state_dict(const TransformerImpl& model) {
  const auto& o = model.options();
  const HfFamily family = family_of(o);
  // deepseek_v3 keeps the aux-loss-free selection bias as mlp.gate.e_score_correction_bias;
  // qwen3_moe and deepseek_v2 route without one (save_hf_checkpoint refuses a bias that moved).
  const bool keep_bias = o.moe.enabled() && family == HfFamily::kDeepseekV3;
  // Only deepseek_v3 has a place for MTP modules; other families leave them out (docs/models.md).
  const bool keep_mtp = family == HfFamily::kDeepseekV3;
  NamedTensors out;
  for (const auto& [name, tensor] : model.state_dict()) {
    if (name.ends_with(".e_score_correction_bias") && !keep_bias) continue;
    if (name.starts_with("mtp.")) {
      if (keep_mtp) add_unfused(out, mtp_hf_name(name, o.n_layers), tensor);
      continue;
    }
    add_unfused(out, hf_name(name), tensor);
  }
  for (int64_t k = 0; keep_mtp && k < o.mtp.depth; ++k) {
    const auto& head = o.tie_embeddings ? model.embed_tokens->weight : model.lm_head->weight;
    out.emplace_back(mtp_layer_prefix(o.n_layers, k) + "embed_tokens.weight", model.embed_tokens->weight);
    out.emplace_back(mtp_layer_prefix(o.n_layers, k) + "shared_head.head.weight", head);
  }
  return out;
}

namespace {

// DeepSeek's released FP8 checkpoints (quantization_config.quant_method "fp8"): an
// F8_E4M3 `X.weight` [out, in] with `X.weight_scale_inv` [ceil(out/bo), ceil(in/bi)]
// float32, one scale per bo x bi block (128 x 128); weight = fp8 * scale. Replaced here
// by the float32 weight (an FP8 recipe quantizes it again with its own scales).
void dequantize_block_fp8(std::map<std::string, torch::Tensor>& tensors, const std::string& where,
                          std::array<int64_t, 2> block) {
  const std::string suffix = ".weight_scale_inv";
  std::vector<std::string> scales;
  for (const auto& [name, t] : tensors)
    if (name.ends_with(suffix)) scales.push_back(name);
  for (const auto& scale_name : scales) {
    const std::string weight_name = scale_name.substr(0, scale_name.size() - suffix.size()) + ".weight";
    const auto it = tensors.find(weight_name);
    BRIGADE_CHECK(it != tensors.end(), where, ": tensor '", scale_name, "' has no '", weight_name, "' to scale");
    const torch::Tensor w = it->second, scale = tensors.at(scale_name);
    BRIGADE_CHECK(w.dim() == 2, where, ": tensor '", weight_name, "' has shape ", w.sizes(),
                  "; a block-scaled FP8 weight is a matrix");
    const int64_t rows = (w.size(0) + block[0] - 1) / block[0], cols = (w.size(1) + block[1] - 1) / block[1];
    BRIGADE_CHECK(scale.dim() == 2 && scale.size(0) == rows && scale.size(1) == cols, where, ": tensor '", scale_name,
                  "' has shape ", scale.sizes(), " but its weight ", w.sizes(), " in ", block[0], "x", block[1],
                  " blocks needs [", rows, ", ", cols, "]");
    BRIGADE_CHECK(scale.is_floating_point(), where, ": tensor '", scale_name, "' has dtype ",
                  c10::toString(scale.scalar_type()), "; expected floating point scales");
    it->second = dequantize_block_scaled(w, scale, block);
    tensors.erase(scale_name);
  }
}

// quantization_config.weight_block_size of an fp8 checkpoint ([128, 128] when absent);
// any other quantization method is an Error naming it.
std::optional<std::array<int64_t, 2>> fp8_block_size(const std::filesystem::path& config_json) {
  if (!std::filesystem::exists(config_json)) return std::nullopt;
  const std::string where = config_json.string();
  const json j = read_config_object(config_json);
  if (!j.contains("quantization_config") || j["quantization_config"].is_null()) return std::nullopt;
  const json& q = j["quantization_config"];
  BRIGADE_CHECK(q.is_object(), where, ": field 'quantization_config' must be an object");
  const ConfigReader r(q, where + ": field 'quantization_config'");
  const std::string method = r.text("quant_method", "");
  BRIGADE_CHECK(method == "fp8", where, ": field 'quantization_config.quant_method' is '", method,
                "'; brigade reads unquantized checkpoints and DeepSeek's block-scaled fp8");
  const std::string fmt = r.text("fmt", "e4m3");
  BRIGADE_CHECK(fmt == "e4m3", where, ": field 'quantization_config.fmt' is '", fmt, "'; brigade reads e4m3");
  std::array<int64_t, 2> block{128, 128};
  if (r.has("weight_block_size")) {
    const json& b = q["weight_block_size"];
    BRIGADE_CHECK(b.is_array() && b.size() == 2 && b[0].is_number_integer() && b[1].is_number_integer() &&
                      b[0].get<int64_t>() > 0 && b[1].get<int64_t>() > 0,
                  where, ": field 'quantization_config.weight_block_size' must be two positive integers, got ", b.dump());
    block = {b[0].get<int64_t>(), b[1].get<int64_t>()};
  }
  return block;
}

}  // namespace

torch::Tensor dequantize_block_scaled(const torch::Tensor& weight, const torch::Tensor& scale_inv,
                                      std::array<int64_t, 2> block) {
  const auto expanded = scale_inv.to(torch::kFloat32)
                            .repeat_interleave(block[0], 0)
                            .repeat_interleave(block[1], 1)
                            .narrow(0, 0, weight.size(0))
                            .narrow(1, 0, weight.size(1));
  return weight.to(torch::kFloat32) * expanded;
}

void load_hf_weights(TransformerImpl& model, const std::filesystem::path& dir) {
  SafetensorsFile file = load_safetensors_dir(dir);
  const std::string where = "Hugging Face checkpoint " + dir.string();
  const auto& options = model.options();
  // DeepSeek's rotary layout and MTP modules are described by config.json.
  HfConfig config;
  if (options.is_mla()) {
    BRIGADE_CHECK(std::filesystem::exists(dir / "config.json"), where,
                  ": no config.json (a multi-head latent attention checkpoint needs it for its rotary layout)");
    config = read_hf_config(dir / "config.json");
  }
  if (const auto block = fp8_block_size(dir / "config.json")) dequantize_block_fp8(file.tensors, where, *block);
  // MTP layers: the model's first mtp.depth come from the file where it has them;
  // the file's further ones are left out, and modules it lacks keep their
  // initialisation. (transformers runs no MTP: checkpoints it saves announce
  // num_nextn_predict_layers but hold none.)
  auto mtp_depth_of = [&](const std::string& name) -> std::optional<int64_t> {
    const auto layer = layer_index(name);
    if (!layer || *layer < options.n_layers) return std::nullopt;
    return *layer - options.n_layers;
  };
  int64_t mtp_in_file = 0;
  for (const auto& [name, tensor] : file.tensors) {
    if (const auto k = mtp_depth_of(name); k && *k < config.mtp_layers) mtp_in_file = std::max(mtp_in_file, *k + 1);
  }
  const int64_t mtp_from_file = std::min(options.mtp.depth, mtp_in_file);
  if (mtp_from_file < options.mtp.depth)
    log_info(where, ": ", options.mtp.depth - mtp_from_file, " of the model's ", options.mtp.depth,
             " MTP modules are not in the checkpoint and start from their initialisation");
  // transformers 5 keeps experts fused in memory, the Hub one per expert: accept both.
  NamedTensors unfused;
  for (const auto& [name, tensor] : file.tensors) {
    if (const auto k = mtp_depth_of(name); k && config.mtp_layers > 0 && *k >= mtp_from_file) continue;
    add_unfused(unfused, name, tensor);
  }
  file.tensors = std::map<std::string, torch::Tensor>(unfused.begin(), unfused.end());
  torch::NoGradGuard no_grad;
  std::set<std::string> expected;
  NamedTensors target;
  for (auto& [name, tensor] : hf_state_dict(model)) {
    if (const auto k = mtp_depth_of(name); k && *k >= mtp_from_file) continue;  // not in the file: stays initialised
    target.emplace_back(name, tensor);
  }
  for (const auto& [name, tensor] : target) {
    expected.insert(name);
    auto it = file.tensors.find(name);
    BRIGADE_CHECK(it != file.tensors.end(), where, ": no tensor '", name, "' (config.json describes a model that has it)");
    BRIGADE_CHECK(it->second.sizes() == tensor.sizes(), where, ": tensor '", name, "' has shape ", it->second.sizes(),
                  " but config.json implies ", tensor.sizes());
    BRIGADE_CHECK(it->second.is_floating_point(), where, ": tensor '", name, "' has dtype ",
                  c10::toString(it->second.scalar_type()), "; expected floating point weights");
    // brigade shares one embedding and head between the model and its MTP modules.
    if (const auto main = shared_copy_of(name, options)) {
      const auto m = file.tensors.find(*main);
      BRIGADE_CHECK(m != file.tensors.end() && torch::equal(m->second, it->second), where, ": tensor '", name,
                    "' is not a copy of '", *main, "'; brigade's MTP modules share the model's embedding and head "
                    "(set model.mtp.depth=0 to load without them)");
    }
  }
  for (const auto& [name, tensor] : file.tensors) {
    if (expected.contains(name) || name.ends_with("rotary_emb.inv_freq")) continue;
    if (name == "lm_head.weight" && options.tie_embeddings) continue;
    BRIGADE_FAIL(where, ": unexpected tensor '", name, "' (config.json describes a model without it)");
  }
  // Copy only after every check passed, so a rejected checkpoint leaves the model as it was.
  Progress bar("import hf (tensors)", static_cast<int64_t>(target.size()), stderr_is_terminal(), /*quiet_seconds=*/2.0);
  int64_t copied = 0;
  for (const auto& [name, tensor] : target) {
    bar.tick(copied++, "");
    if (shared_copy_of(name, options)) continue;  // the main tensor, checked equal above
    const auto& stored = file.tensors.at(name);
    tensor.copy_(config.rope_interleaved ? convert_rope_rows(name, stored, options, /*to_interleaved=*/false) : stored);
  }
  bar.tick(copied, "");
  bar.finish();
}

void save_hf_checkpoint(const TransformerImpl& model, const std::filesystem::path& dir, const std::string& dtype,
                        uint64_t max_shard_bytes, int64_t bos_token_id, int64_t eos_token_id) {
  torch::ScalarType type;
  if (dtype == "float32") type = torch::kFloat32;
  else if (dtype == "bfloat16") type = torch::kBFloat16;
  else if (dtype == "float16") type = torch::kFloat16;
  else BRIGADE_FAIL("Hugging Face export: dtype '", dtype, "' is not one of float32, bfloat16, float16");
  HfConfig config = hf_config_for(model.options());
  config.torch_dtype = dtype;
  config.bos_token_id = bos_token_id;
  config.eos_token_id = eos_token_id;
  if (config.family != HfFamily::kDeepseekV3) {
    for (const auto& [name, tensor] : model.state_dict())
      BRIGADE_CHECK(!name.ends_with(".e_score_correction_bias") || tensor.abs().max().item<double>() == 0.0,
                    "Hugging Face export: ", name, " is not zero (aux-loss-free balancing moved it), and ",
                    family_name(config.family), " routes without a selection bias; train with "
                    "model.moe.bias_update_rate=0 to export (deepseek_v3 keeps the bias)");
  }
  // DeepSeek checkpoints store the rotary rows interleaved (vLLM and DeepSeek's own
  // code assume it); config.json says so with rope_interleave.
  const bool interleave = is_deepseek(config.family);
  NamedTensors tensors;
  const NamedTensors state = hf_state_dict(model);
  Progress bar("export hf (tensors)", static_cast<int64_t>(state.size()), stderr_is_terminal(), /*quiet_seconds=*/2.0);
  for (const auto& [name, tensor] : state) {
    bar.tick(static_cast<int64_t>(tensors.size()), "");
    auto t = tensor.detach().to(torch::kCPU);
    if (interleave) t = convert_rope_rows(name, t, model.options(), /*to_interleaved=*/true);
    tensors.emplace_back(name, t.to(type));
  }
  bar.tick(static_cast<int64_t>(tensors.size()), "writing");
  bar.finish();
  save_safetensors_sharded(dir, tensors, max_shard_bytes, {{"format", "pt"}});
  write_file_atomic(dir / "config.json", hf_config_text(config));
}

}  // namespace brigade::model
