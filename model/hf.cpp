#include "model/hf.h"

#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "model/safetensors.h"

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

std::string hf_name(const std::string& brigade_name) {
  return brigade_name == "lm_head.weight" ? brigade_name : "model." + brigade_name;
}

}  // namespace

std::string family_name(HfFamily family) { return info(family).model_type; }

HfFamily family_of(const TransformerOptions& o) {
  BRIGADE_CHECK(!o.moe.enabled(), "Mixture-of-Experts models have no Hugging Face export yet (brigade's "
                "DeepSeekMoE layers with standard attention match no transformers architecture); dense models only");
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
  BRIGADE_CHECK(known, where, ": model_type '", model_type, "' is not supported (supported: llama, qwen2, qwen3",
                model_type == "qwen3_moe" || model_type == "deepseek_v3" || model_type == "qwen2_moe"
                    ? "; Mixture-of-Experts checkpoints cannot be imported yet"
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
  o.head_dim = r.integer("head_dim", c.family == HfFamily::kQwen3 ? 128 : o.d_model / o.n_heads);
  if (o.head_dim * o.n_heads == o.d_model) o.head_dim = 0;  // brigade's default says the same
  o.d_ff = r.integer("intermediate_size");
  o.max_seq_len = r.integer("max_position_embeddings", 2048);
  o.norm_eps = r.real("rms_norm_eps", 1e-6);
  o.tie_embeddings = r.boolean("tie_word_embeddings", false);
  o.qkv_bias = c.family == HfFamily::kQwen2;
  o.qk_norm = c.family == HfFamily::kQwen3;
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
  if (c.family != HfFamily::kQwen2) j["attention_bias"] = false;
  if (c.family == HfFamily::kLlama) j["mlp_bias"] = false;
  if (c.family != HfFamily::kLlama) j["use_sliding_window"] = false;
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_id >= 0) j["eos_token_id"] = c.eos_token_id;
  j["dtype"] = c.torch_dtype;
  j["use_cache"] = true;
  return j.dump(2) + "\n";
}

NamedTensors hf_state_dict(const TransformerImpl& model) {
  NamedTensors out;
  for (const auto& [name, tensor] : model.state_dict()) out.emplace_back(hf_name(name), tensor);
  return out;
}

void load_hf_weights(TransformerImpl& model, const std::filesystem::path& dir) {
  const SafetensorsFile file = load_safetensors_dir(dir);
  const std::string where = "Hugging Face checkpoint " + dir.string();
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
  NamedTensors tensors;
  for (const auto& [name, tensor] : hf_state_dict(model)) tensors.emplace_back(name, tensor.detach().to(torch::kCPU, type));
  save_safetensors_sharded(dir, tensors, max_shard_bytes, {{"format", "pt"}});
  write_file_atomic(dir / "config.json", hf_config_text(config));
}

}  // namespace brigade::model
