#include "model/hf.h"

#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
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
};

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

std::string hf_name(const std::string& brigade_name) {
  return brigade_name == "lm_head.weight" ? brigade_name : "model." + brigade_name;
}

}  // namespace

std::string family_name(HfFamily family) { return info(family).model_type; }

HfFamily family_of(const TransformerOptions& o) {
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
  json j;
  try {
    j = json::parse(read_file(config_json));
  } catch (const json::exception& e) {
    BRIGADE_FAIL(where, ": not valid JSON: ", e.what());
  }
  BRIGADE_CHECK(j.is_object(), where, ": expected a JSON object");
  ConfigReader r(j, where);
  HfConfig c;
  const std::string model_type = r.text("model_type", "");
  bool known = false;
  for (const auto& f : kFamilies)
    if (model_type == f.model_type) c.family = f.family, known = true;
  BRIGADE_CHECK(known, where, ": model_type '", model_type, "' is not supported (supported: llama, qwen2, qwen3, qwen3_moe",
                model_type == "deepseek_v3" || model_type == "deepseek_v2"
                    ? "; DeepSeek's multi-head latent attention is not in brigade yet"
                    : "",
                ")");
  const std::string act = r.text("hidden_act", "silu");
  BRIGADE_CHECK(act == "silu", where, ": field 'hidden_act' is '", act, "'; brigade's MLP is SwiGLU (silu)");
  auto& o = c.options;
  o.vocab_size = r.integer("vocab_size");
  o.d_model = r.integer("hidden_size");
  o.n_layers = r.integer("num_hidden_layers");
  o.n_heads = r.integer("num_attention_heads");
  o.n_kv_heads = r.integer("num_key_value_heads", o.n_heads);
  BRIGADE_CHECK(o.n_heads > 0, where, ": field 'num_attention_heads' must be positive");
  o.head_dim = r.integer("head_dim", c.family == HfFamily::kLlama || c.family == HfFamily::kQwen2
                                         ? o.d_model / o.n_heads : 128);
  if (o.head_dim * o.n_heads == o.d_model) o.head_dim = 0;  // brigade's default says the same
  o.d_ff = r.integer("intermediate_size");
  o.max_seq_len = r.integer("max_position_embeddings", 2048);
  o.norm_eps = r.real("rms_norm_eps", 1e-6);
  o.tie_embeddings = r.boolean("tie_word_embeddings", false);
  o.qkv_bias = c.family == HfFamily::kQwen2;
  o.qk_norm = c.family == HfFamily::kQwen3 || c.family == HfFamily::kQwen3Moe;
  if (c.family == HfFamily::kQwen3Moe) read_qwen3_moe(r, j, where, o);
  o.init_std = r.real("initializer_range", 0.02);
  if (c.family != HfFamily::kQwen2) r.require_false("attention_bias", "attention biases on llama/qwen3 (o_proj has none)");
  r.require_false("mlp_bias", "MLP biases");
  r.require_false("use_sliding_window", "sliding-window attention");
  // RoPE: transformers 5 writes rope_parameters, earlier versions rope_theta/rope_scaling.
  o.rope_theta = r.real("rope_theta", 10000.0);
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    if (!r.has(key)) continue;
    const json& rope = r.node(key);
    BRIGADE_CHECK(rope.is_object(), where, ": field '", key, "' must be an object, got ", rope.dump());
    const std::string type = rope.value("rope_type", rope.value("type", std::string("default")));
    BRIGADE_CHECK(type == "default", where, ": field '", key, ".rope_type' is '", type,
                  "'; brigade implements plain RoPE (default) only");
    if (rope.contains("rope_theta")) {
      BRIGADE_CHECK(rope["rope_theta"].is_number(), where, ": field '", key, ".rope_theta' must be a number");
      o.rope_theta = rope["rope_theta"].get<double>();
    }
  }
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
  j["num_key_value_heads"] = o.kv_heads();
  j["head_dim"] = o.head_size();
  j["hidden_act"] = "silu";
  j["max_position_embeddings"] = o.max_seq_len;
  j["rms_norm_eps"] = o.norm_eps;
  j["initializer_range"] = o.init_std;
  j["tie_word_embeddings"] = o.tie_embeddings;
  // Both spellings: transformers 5 reads rope_parameters, 4.x rope_theta.
  j["rope_theta"] = o.rope_theta;
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", o.rope_theta}};
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
  if (c.family != HfFamily::kLlama) j["use_sliding_window"] = false;
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

NamedTensors hf_state_dict(const TransformerImpl& model) {
  NamedTensors out;
  for (const auto& [name, tensor] : model.state_dict()) {
    // The aux-loss-free selection bias has no place in qwen3_moe; a checkpoint whose
    // bias moved is refused by save_hf_checkpoint.
    if (name.ends_with(".e_score_correction_bias")) continue;
    add_unfused(out, hf_name(name), tensor);
  }
  return out;
}

void load_hf_weights(TransformerImpl& model, const std::filesystem::path& dir) {
  SafetensorsFile file = load_safetensors_dir(dir);
  const std::string where = "Hugging Face checkpoint " + dir.string();
  // transformers 5 keeps experts fused in memory, the Hub one per expert: accept both.
  NamedTensors unfused;
  for (const auto& [name, tensor] : file.tensors) add_unfused(unfused, name, tensor);
  file.tensors = std::map<std::string, torch::Tensor>(unfused.begin(), unfused.end());
  torch::NoGradGuard no_grad;
  std::set<std::string> expected;
  const NamedTensors target = hf_state_dict(model);
  for (const auto& [name, tensor] : target) {
    expected.insert(name);
    auto it = file.tensors.find(name);
    BRIGADE_CHECK(it != file.tensors.end(), where, ": no tensor '", name, "' (config.json describes a model that has it)");
    BRIGADE_CHECK(it->second.sizes() == tensor.sizes(), where, ": tensor '", name, "' has shape ", it->second.sizes(),
                  " but config.json implies ", tensor.sizes());
    BRIGADE_CHECK(it->second.is_floating_point(), where, ": tensor '", name, "' has dtype ",
                  c10::toString(it->second.scalar_type()), "; expected floating point weights");
  }
  for (const auto& [name, tensor] : file.tensors) {
    if (expected.contains(name) || name.ends_with("rotary_emb.inv_freq")) continue;
    if (name == "lm_head.weight" && model.options().tie_embeddings) continue;
    BRIGADE_FAIL(where, ": unexpected tensor '", name, "' (config.json describes a model without it)");
  }
  // Copy only after every check passed, so a rejected checkpoint leaves the model as it was.
  for (const auto& [name, tensor] : target) tensor.copy_(file.tensors.at(name));
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
  for (const auto& [name, tensor] : model.state_dict())
    BRIGADE_CHECK(!name.ends_with(".e_score_correction_bias") || tensor.abs().max().item<double>() == 0.0,
                  "Hugging Face export: ", name, " is not zero (aux-loss-free balancing moved it), and qwen3_moe "
                  "routes without a selection bias; train with model.moe.bias_update_rate=0 to export");
  NamedTensors tensors;
  for (const auto& [name, tensor] : hf_state_dict(model)) tensors.emplace_back(name, tensor.detach().to(torch::kCPU, type));
  save_safetensors_sharded(dir, tensors, max_shard_bytes, {{"format", "pt"}});
  write_file_atomic(dir / "config.json", hf_config_text(config));
}

}  // namespace brigade::model
