#include "recipes/schema.h"

#include <charconv>
#include <cmath>
#include <limits>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/tokenizer.h"
#include "moe/options.h"

namespace brigade::recipes {
namespace {

constexpr int64_t kMaxInt = std::numeric_limits<int64_t>::max();
constexpr double kInf = std::numeric_limits<double>::infinity();

std::string show(const YAML::Node& node) {
  if (node.IsScalar()) return "'" + node.Scalar() + "'";
  if (node.IsSequence()) return "a list";
  if (node.IsMap()) return "a mapping";
  return "nothing";
}

[[noreturn]] void type_error(const std::string& where, const std::string& path, const std::string& expected,
                             const YAML::Node& node) {
  BRIGADE_FAIL(where, ": ", path, ": expected ", expected, ", got ", show(node));
}

std::string format_double(double value) {
  if (std::isnan(value)) return ".nan";
  if (std::isinf(value)) return value > 0 ? ".inf" : "-.inf";  // YAML's spellings
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, value);
  return std::string(buf, end);
}

template <typename T, typename Ref>
Field integer(std::string path, Ref ref, std::string doc, int64_t lo = 0, int64_t hi = kMaxInt) {
  Field f;
  f.path = path;
  f.type = "int";
  f.doc = std::move(doc);
  f.set = [path, ref, lo, hi](Recipe& r, const YAML::Node& node, const std::string& where) {
    int64_t value = 0;
    if (!node.IsScalar()) type_error(where, path, "an integer", node);
    try {
      value = node.as<int64_t>();
    } catch (const YAML::Exception&) {
      type_error(where, path, "an integer", node);
    }
    BRIGADE_CHECK(value >= lo && value <= hi, where, ": ", path, " = ", value, " is out of range [", lo,
                  ", ", (hi == kMaxInt ? std::string("inf") : std::to_string(hi)), "]");
    ref(r) = static_cast<T>(value);
  };
  f.get = [ref](const Recipe& r) { return YAML::Node(std::to_string(ref(const_cast<Recipe&>(r)))); };
  return f;
}

template <typename Ref>
Field real(std::string path, Ref ref, std::string doc, double lo = 0.0, double hi = kInf) {
  Field f;
  f.path = path;
  f.type = "float";
  f.doc = std::move(doc);
  f.set = [path, ref, lo, hi](Recipe& r, const YAML::Node& node, const std::string& where) {
    double value = 0;
    if (!node.IsScalar()) type_error(where, path, "a number", node);
    try {
      value = node.as<double>();
    } catch (const YAML::Exception&) {
      type_error(where, path, "a number", node);
    }
    BRIGADE_CHECK(value >= lo && value <= hi, where, ": ", path, " = ", node.Scalar(), " is out of range [",
                  lo, ", ", hi, "]");
    ref(r) = value;
  };
  f.get = [ref](const Recipe& r) { return YAML::Node(format_double(ref(const_cast<Recipe&>(r)))); };
  return f;
}

template <typename Ref>
Field boolean(std::string path, Ref ref, std::string doc) {
  Field f;
  f.path = path;
  f.type = "bool";
  f.doc = std::move(doc);
  f.set = [path, ref](Recipe& r, const YAML::Node& node, const std::string& where) {
    if (!node.IsScalar()) type_error(where, path, "true or false", node);
    try {
      ref(r) = node.as<bool>();
    } catch (const YAML::Exception&) {
      type_error(where, path, "true or false", node);
    }
  };
  f.get = [ref](const Recipe& r) { return YAML::Node(ref(const_cast<Recipe&>(r)) ? "true" : "false"); };
  return f;
}

template <typename Ref>
Field text(std::string path, Ref ref, std::string doc) {
  Field f;
  f.path = path;
  f.type = "string";
  f.doc = std::move(doc);
  f.set = [path, ref](Recipe& r, const YAML::Node& node, const std::string& where) {
    if (!node.IsScalar()) type_error(where, path, "a string", node);
    ref(r) = node.Scalar();
  };
  f.get = [ref](const Recipe& r) { return YAML::Node(ref(const_cast<Recipe&>(r))); };
  return f;
}

// An enum stored as its C++ type, spelled as one of `choices` in YAML.
template <typename Ref, typename Parse, typename Show>
Field choice(std::string path, Ref ref, std::string doc, std::vector<std::string> choices, Parse parse,
             Show to_text) {
  Field f;
  f.path = path;
  f.doc = std::move(doc);
  for (size_t i = 0; i < choices.size(); ++i) f.type += (i ? " | " : "") + choices[i];
  f.set = [path, ref, choices, parse, type = f.type](Recipe& r, const YAML::Node& node,
                                                      const std::string& where) {
    if (!node.IsScalar()) type_error(where, path, "one of " + type, node);
    const std::string value = node.Scalar();
    BRIGADE_CHECK(std::find(choices.begin(), choices.end(), value) != choices.end(), where, ": ", path,
                  ": '", value, "' is not one of ", type);
    ref(r) = parse(value);
  };
  f.get = [ref, to_text](const Recipe& r) { return YAML::Node(to_text(ref(const_cast<Recipe&>(r)))); };
  return f;
}

// A YAML value as JSON: mappings, lists, and scalars as numbers, booleans, null or
// strings (a quoted scalar stays a string).
nlohmann::json yaml_to_json(const YAML::Node& node) {
  if (node.IsMap()) {
    nlohmann::json out = nlohmann::json::object();
    for (const auto& item : node) out[item.first.Scalar()] = yaml_to_json(item.second);
    return out;
  }
  if (node.IsSequence()) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& item : node) out.push_back(yaml_to_json(item));
    return out;
  }
  if (!node.IsScalar()) return nullptr;
  const std::string& text = node.Scalar();
  if (node.Tag() == "!") return text;  // quoted
  int64_t i = 0;
  if (YAML::convert<int64_t>::decode(node, i) && text.find_first_of(".eE") == std::string::npos) return i;
  double d = 0;
  if (YAML::convert<double>::decode(node, d)) return d;
  bool b = false;
  if (YAML::convert<bool>::decode(node, b)) return b;
  if (text == "null" || text == "~") return nullptr;
  return text;
}

// A JSON object kept as its text: written in YAML as a mapping ({repeat_penalty: 1.0})
// or as a string holding JSON; quoted scalars stay strings.
template <typename Ref>
Field json_object(std::string path, Ref ref, std::string doc) {
  Field f;
  f.path = path;
  f.type = "mapping";
  f.doc = std::move(doc);
  f.set = [path, ref](Recipe& r, const YAML::Node& node, const std::string& where) {
    if (node.IsNull() || (node.IsScalar() && node.Scalar().empty())) {
      ref(r).clear();
    } else if (node.IsMap()) {
      ref(r) = node.size() == 0 ? std::string() : yaml_to_json(node).dump();
    } else if (node.IsScalar()) {
      ref(r) = node.Scalar();  // JSON text; the module's validate() parses it
    } else {
      type_error(where, path, "a mapping", node);
    }
  };
  // Dumped as the JSON text (a string): YAML's emitter would write a string "7" in
  // a mapping as the number 7.
  f.get = [ref](const Recipe& r) { return YAML::Node(ref(const_cast<Recipe&>(r))); };
  return f;
}

template <typename Ref>
Field text_list(std::string path, Ref ref, std::string doc) {
  Field f;
  f.path = path;
  f.type = "list of strings";
  f.doc = std::move(doc);
  f.set = [path, ref](Recipe& r, const YAML::Node& node, const std::string& where) {
    std::vector<std::string> values;
    if (node.IsScalar()) {
      values.push_back(node.Scalar());
    } else if (node.IsSequence()) {
      for (const auto& item : node) {
        if (!item.IsScalar()) type_error(where, path, "a list of strings", node);
        values.push_back(item.Scalar());
      }
    } else if (!node.IsNull()) {
      type_error(where, path, "a list of strings", node);
    }
    ref(r) = values;
  };
  f.get = [ref](const Recipe& r) {
    YAML::Node list(YAML::NodeType::Sequence);
    for (const auto& v : ref(const_cast<Recipe&>(r))) list.push_back(v);
    return list;
  };
  return f;
}

// A list of integers, each at least `lo`; null or [] leaves it empty.
template <typename Ref>
Field integer_list(std::string path, Ref ref, std::string doc, int64_t lo) {
  Field f;
  f.path = path;
  f.type = "list of ints";
  f.doc = std::move(doc);
  f.set = [path, ref, lo](Recipe& r, const YAML::Node& node, const std::string& where) {
    std::vector<int64_t> values;
    if (node.IsSequence()) {
      for (const auto& item : node) {
        int64_t value = 0;
        try {
          if (!item.IsScalar()) throw YAML::Exception(YAML::Mark::null_mark(), "not a scalar");
          value = item.as<int64_t>();
        } catch (const YAML::Exception&) {
          type_error(where, path, "a list of integers", node);
        }
        BRIGADE_CHECK(value >= lo, where, ": ", path, " has ", value, "; every entry must be at least ", lo);
        values.push_back(value);
      }
    } else if (!node.IsNull()) {
      type_error(where, path, "a list of integers", node);
    }
    ref(r) = values;
  };
  f.get = [ref](const Recipe& r) {
    YAML::Node list(YAML::NodeType::Sequence);
    for (const auto v : ref(const_cast<Recipe&>(r))) list.push_back(std::to_string(v));
    return list;
  };
  return f;
}

#define REF(member) [](Recipe& r) -> auto& { return r.member; }

std::vector<Field> build_schema() {
  using data::DataSource;
  using precision::ComputeDtype;
  using trainer::NonFinitePolicy;
  std::vector<Field> s;
  s.push_back(text("name", REF(name), "Run name; the default run directory is runs/<name>. Defaults to the recipe file's name."));

  s.push_back(integer<int64_t>("model.vocab_size", REF(model.vocab_size), "Embedding rows; at least the tokenizer's vocabulary (261 for the byte tokenizer).", 1));
  s.push_back(integer<int64_t>("model.d_model", REF(model.d_model), "Hidden size.", 1));
  s.push_back(integer<int64_t>("model.n_layers", REF(model.n_layers), "Transformer blocks.", 1));
  s.push_back(integer<int64_t>("model.n_heads", REF(model.n_heads), "Query heads.", 1));
  s.push_back(integer<int64_t>("model.n_kv_heads", REF(model.n_kv_heads), "Key/value heads for grouped-query attention; must divide n_heads. 0 = n_heads."));
  s.push_back(integer<int64_t>("model.head_dim", REF(model.head_dim), "Per-head size. 0 = d_model / n_heads."));
  s.push_back(integer<int64_t>("model.d_ff", REF(model.d_ff), "SwiGLU intermediate size. 0 = 8/3 d_model rounded up to a multiple of 64."));
  s.push_back(integer<int64_t>("model.max_seq_len", REF(model.max_seq_len), "Longest sequence (RoPE table and KV cache size).", 1));
  s.push_back(real("model.rope_theta", REF(model.rope_theta), "RoPE base frequency.", 1e-9));
  s.push_back(choice("model.rope_scaling.type", REF(model.rope_scaling.type), "RoPE context extension: none, linear (positions divided by factor), llama3 (Llama 3.1's per-wavelength blend) or yarn (YaRN, DeepSeek-V2/V3), computed as transformers does.",
                     {"none", "linear", "llama3", "yarn"}, model::parse_rope_scaling_type, [](model::RopeScalingType v) { return model::to_string(v); }));
  s.push_back(real("model.rope_scaling.factor", REF(model.rope_scaling.factor), "Context extension ratio (linear, llama3, yarn; DeepSeek-V3: 40).", 1.0));
  s.push_back(integer<int64_t>("model.rope_scaling.original_max_seq_len", REF(model.rope_scaling.original_max_seq_len), "The pretraining context that llama3 and yarn scale from (DeepSeek-V3: 4096). 0 = model.max_seq_len.", 0));
  s.push_back(real("model.rope_scaling.beta_fast", REF(model.rope_scaling.beta_fast), "yarn: rotations over the original context above which frequencies are kept.", 1e-9));
  s.push_back(real("model.rope_scaling.beta_slow", REF(model.rope_scaling.beta_slow), "yarn: rotations below which frequencies are divided by factor (a linear ramp between).", 1e-9));
  s.push_back(real("model.rope_scaling.mscale", REF(model.rope_scaling.mscale), "yarn: numerator coefficient of the cos/sin attention factor, with mscale_all_dim. 0 = unset (factor 0.1 ln(factor) + 1).", 0.0));
  s.push_back(real("model.rope_scaling.mscale_all_dim", REF(model.rope_scaling.mscale_all_dim), "yarn: denominator coefficient of the cos/sin attention factor; with MLA it also multiplies the softmax scale by (0.1 mscale_all_dim ln(factor) + 1)^2 (DeepSeek-V3: 1). 0 = unset.", 0.0));
  s.push_back(real("model.rope_scaling.attention_factor", REF(model.rope_scaling.attention_factor), "yarn: multiplies cos and sin directly. 0 = derived from factor, mscale and mscale_all_dim.", 0.0));
  s.push_back(boolean("model.rope_scaling.truncate", REF(model.rope_scaling.truncate), "yarn: round the correction range to whole dimensions (transformers' default)."));
  s.push_back(real("model.rope_scaling.low_freq_factor", REF(model.rope_scaling.low_freq_factor), "llama3: wavelengths above original_max_seq_len / low_freq_factor are divided by factor.", 1e-9));
  s.push_back(real("model.rope_scaling.high_freq_factor", REF(model.rope_scaling.high_freq_factor), "llama3: wavelengths below original_max_seq_len / high_freq_factor are kept.", 1e-9));
  s.push_back(choice("model.attention", REF(model.attention), "Attention: gqa (grouped-query; n_kv_heads, head_dim, qkv_bias, qk_norm) or mla (DeepSeek-V2/V3 multi-head latent attention, sized by model.mla.*; generation caches only the latent).",
                     {"gqa", "mla"}, model::parse_attention_kind, [](model::AttentionKind v) { return model::to_string(v); }));
  s.push_back(integer<int64_t>("model.mla.q_lora_rank", REF(model.mla.q_lora_rank), "MLA query latent size (DeepSeek-V3: 1536). 0 = queries projected directly (DeepSeek-V2-Lite).", 0));
  s.push_back(integer<int64_t>("model.mla.kv_lora_rank", REF(model.mla.kv_lora_rank), "MLA key/value latent size, what generation caches with the rope key (DeepSeek-V3: 512).", 1));
  s.push_back(integer<int64_t>("model.mla.qk_nope_head_dim", REF(model.mla.qk_nope_head_dim), "MLA per-head query/key size without position (DeepSeek-V3: 128).", 1));
  s.push_back(integer<int64_t>("model.mla.qk_rope_head_dim", REF(model.mla.qk_rope_head_dim), "MLA per-head rotary query size, and the size of the one rotary key all heads share (DeepSeek-V3: 64); even.", 2));
  s.push_back(integer<int64_t>("model.mla.v_head_dim", REF(model.mla.v_head_dim), "MLA per-head value size (DeepSeek-V3: 128).", 1));
  s.push_back(real("model.norm_eps", REF(model.norm_eps), "RMSNorm epsilon.", 1e-12, 1.0));
  s.push_back(boolean("model.tie_embeddings", REF(model.tie_embeddings), "Share the token embedding with the output head."));
  s.push_back(boolean("model.qkv_bias", REF(model.qkv_bias), "Bias on the q/k/v projections (Qwen2)."));
  s.push_back(boolean("model.qk_norm", REF(model.qk_norm), "RMSNorm on each head's q and k before RoPE (Qwen3)."));
  s.push_back(real("model.init_std", REF(model.init_std), "Standard deviation of the normal weight init (output projections are scaled by 1/sqrt(2 n_layers)).", 1e-9, 10.0));
  s.push_back(integer<int64_t>("model.mtp.depth", REF(model.mtp.depth), "Multi-token prediction modules (DeepSeek-V3: 1): module k predicts the token k+1 ahead from module k-1's hidden state and the embedding of the token k ahead, through one block of its own and the shared head. Training only; generation and evaluation use the main model. 0 = off.", 0));
  s.push_back(real("model.mtp.loss_weight", REF(model.mtp.loss_weight), "lambda: the MTP modules' mean cross-entropy is added to the loss times this (DeepSeek-V3: 0.3, then 0.1). Logged as mtp_loss.", 0.0));
  s.push_back(text("model.init_from", REF(model.init_from), "A Hugging Face checkpoint directory (config.json + safetensors; llama, qwen2, qwen3, qwen3_moe, deepseek_v2, deepseek_v3) or a .gguf file (llama, qwen2, qwen3, qwen3moe) to start from: its config sets every architecture key (a key the recipe sets must agree; model.max_seq_len and the MoE training settings may differ), its weights replace the random init, and a directory's tokenizer.json becomes data.tokenizer unless that is set (a GGUF file with a BPE vocabulary needs data.tokenizer). Empty: random init."));
  s.push_back(integer<int64_t>("model.moe.num_experts", REF(model.moe.num_experts), "Routed experts per MoE layer. 0 = dense model (no MoE layers).", 0));
  s.push_back(integer<int64_t>("model.moe.top_k", REF(model.moe.top_k), "Routed experts per token; at most num_experts.", 1));
  s.push_back(integer<int64_t>("model.moe.num_shared_experts", REF(model.moe.num_shared_experts), "Always-on shared experts (computed as one SwiGLU of shared_d_ff).", 0));
  s.push_back(integer<int64_t>("model.moe.expert_d_ff", REF(model.moe.expert_d_ff), "Intermediate size of each routed expert. 0 = model.d_ff.", 0));
  s.push_back(integer<int64_t>("model.moe.shared_d_ff", REF(model.moe.shared_d_ff), "Intermediate size of the shared experts together. 0 = expert_d_ff * num_shared_experts.", 0));
  s.push_back(integer<int64_t>("model.moe.first_k_dense", REF(model.moe.first_k_dense), "The first layers keep a dense MLP of model.d_ff; MoE from this layer on.", 0));
  s.push_back(choice("model.moe.score_function", REF(model.moe.score_function), "Router scores: sigmoid (DeepSeek-V3) or softmax (DeepSeek-V2, Mixtral).",
                     {"sigmoid", "softmax"}, moe::parse_score_function, [](moe::ScoreFunction v) { return moe::to_string(v); }));
  s.push_back(integer<int64_t>("model.moe.num_groups", REF(model.moe.num_groups), "Expert groups for group-limited routing; must divide num_experts. 1 = no grouping.", 1));
  s.push_back(integer<int64_t>("model.moe.topk_group", REF(model.moe.topk_group), "Groups a token may route to, best first by model.moe.group_score.", 1));
  s.push_back(choice("model.moe.group_score", REF(model.moe.group_score), "How group-limited routing ranks a group: top2_sum (sum of its two best scores; DeepSeek-V3's noaux_tc) or max (its best score; DeepSeek-V2's group_limited_greedy).",
                     {"top2_sum", "max"}, moe::parse_group_score, [](moe::GroupScore v) { return moe::to_string(v); }));
  s.push_back(boolean("model.moe.normalize_topk", REF(model.moe.normalize_topk), "Divide the selected experts' scores by their sum before scaling."));
  s.push_back(real("model.moe.routed_scaling", REF(model.moe.routed_scaling), "Multiplies the routed experts' combine weights (DeepSeek-V3: 2.5).", 1e-9));
  s.push_back(real("model.moe.bias_update_rate", REF(model.moe.bias_update_rate), "Aux-loss-free balancing speed gamma: after each step bias += gamma * sign(mean_load - load). 0 = off.", 0.0));
  s.push_back(real("model.moe.seq_aux_loss", REF(model.moe.seq_aux_loss), "Sequence-wise balance loss coefficient alpha (DeepSeek-V3: 1e-4). 0 = off.", 0.0));
  s.push_back(real("model.moe.batch_aux_loss", REF(model.moe.batch_aux_loss), "Micro-batch balance loss coefficient (Switch/GShard style). 0 = off.", 0.0));
  s.push_back(real("model.moe.z_loss", REF(model.moe.z_loss), "Router z-loss coefficient: mean squared logsumexp of the router logits. 0 = off.", 0.0));
  s.push_back(boolean("model.moe.dropless", REF(model.moe.dropless), "Compute every routed token copy. false: each expert takes at most capacity_factor * tokens * top_k / num_experts."));
  s.push_back(real("model.moe.capacity_factor", REF(model.moe.capacity_factor), "Expert capacity multiplier when dropless is false.", 1e-9));
  s.push_back(choice("model.moe.drop_policy", REF(model.moe.drop_policy), "Which copies an over-capacity expert keeps: highest routing weight (probs) or earliest tokens (position).",
                     {"probs", "position"}, moe::parse_drop_policy, [](moe::DropPolicy v) { return moe::to_string(v); }));

  s.push_back(text("data.tokenizer", REF(data.tokenizer), "Tokenizer: byte (byte-level with special tokens), or the path of a Hugging Face byte-level BPE tokenizer.json (or of a directory holding one, with its tokenizer_config.json)."));
  s.push_back(integer<int64_t>("data.seq_len", REF(data.seq_len), "Tokens per training sequence; at most model.max_seq_len.", 1));
  s.push_back(choice("data.source", REF(data.source), "Training corpus: the built-in arithmetic reasoning generator, or token shards.",
                     {"synthetic", "shards"}, data::parse_data_source, [](DataSource v) { return data::to_string(v); }));
  s.push_back(text_list("data.shards", REF(data.shards), "Token shard files from `brigade data prepare` (source: shards)."));
  s.push_back(real("data.eval_fraction", REF(data.eval_fraction), "Tail fraction of the shard corpus held out for eval (source: shards).", 0.0, 0.5));
  s.push_back(text("data.kd_file", REF(data.kd_file), "The teacher's top-k per shard token (the distill build stage's kd.safetensors), read when distill.kd.loss is not none (source: shards, packed); empty: none. Set by brigade distill."));
  s.push_back(boolean("data.packed", REF(data.packed), "The shards hold packed rows of data.seq_len + 1 tokens of whole documents (the distill build stage): whole rows are sampled, attention stays inside each document (source: shards)."));
  s.push_back(integer<int64_t>("data.synthetic.num_problems", REF(data.synthetic.num_problems), "Training problems generated.", 1));
  s.push_back(integer<int64_t>("data.synthetic.eval_problems", REF(data.synthetic.eval_problems), "Held-out problems (disjoint from training)."));
  s.push_back(integer<int>("data.synthetic.min_digits", REF(data.synthetic.min_digits), "Fewest digits per operand.", 1, 9));
  s.push_back(integer<int>("data.synthetic.max_digits", REF(data.synthetic.max_digits), "Most digits per operand.", 1, 9));
  s.push_back(integer<int>("data.synthetic.min_operands", REF(data.synthetic.min_operands), "Fewest operands per expression.", 2, 8));
  s.push_back(integer<int>("data.synthetic.max_operands", REF(data.synthetic.max_operands), "Most operands per expression.", 2, 8));
  s.push_back(text("data.synthetic.ops", REF(data.synthetic.ops), "Operators to draw from, any of \"+-*\"."));
  s.push_back(boolean("data.synthetic.nonnegative", REF(data.synthetic.nonnegative), "Only problems whose running values never go below zero (signed steps such as 9-18 = -9 are much harder for small models)."));
  s.push_back(integer<int64_t>("data.synthetic.max_value", REF(data.synthetic.max_value), "> 0: only problems whose every computed value (products, partial products, running sums) is at most this; 0: no limit."));
  s.push_back(integer<uint64_t>("data.synthetic.seed", REF(data.synthetic.seed), "Seed of the problem generator."));

  s.push_back(choice("precision.compute_dtype", REF(precision.compute_dtype), "Matmul precision (autocast); master weights stay float32.",
                     {"float32", "bfloat16"}, precision::parse_compute_dtype, [](ComputeDtype v) { return precision::to_string(v); }));
  s.push_back(choice("precision.optimizer_state_dtype", REF(precision.optimizer_state_dtype), "AdamW moments (exp_avg, exp_avg_sq): float32, or bfloat16 (DeepSeek-V3; half the memory, update math in float32; see docs/fp8.md).",
                     {"float32", "bfloat16"}, precision::parse_compute_dtype, [](ComputeDtype v) { return precision::to_string(v); }));
  s.push_back(choice("precision.fp8_recipe", REF(precision.fp8.recipe), "FP8 GEMMs: none, blockwise (DeepSeek-V3: 1x128 activation tiles, 128x128 weight blocks), current or delayed (per-tensor scales). See docs/fp8.md.",
                     {"none", "blockwise", "current", "delayed"}, precision::parse_fp8_recipe, [](precision::Fp8Recipe v) { return precision::to_string(v); }));
  s.push_back(choice("precision.fp8_formats", REF(precision.fp8.formats), "FP8 formats: e4m3 for every operand (DeepSeek-V3), or hybrid (E4M3 forward, E5M2 gradients).",
                     {"e4m3", "hybrid"}, precision::parse_fp8_formats, [](precision::Fp8Formats v) { return precision::to_string(v); }));
  s.push_back(text_list("precision.fp8_modules", REF(precision.fp8.modules), "Module kinds whose GEMMs run in FP8: attention (q/k/v/o projections), mlp (dense MLPs and shared experts), experts (routed experts), lm_head. Embedding, norms, router and attention core always stay high precision."));
  s.push_back(boolean("precision.fp8_cuda_kernels", REF(precision.fp8.cuda_kernels), "On CUDA, run FP8 through brigade's own quantize kernels and cuBLASLt GEMMs. Opt-in until they have passed their *_CUDA tests on a GPU (docs/gpu.md); without it FP8 on CUDA is refused."));
  s.push_back(boolean("precision.fp8_power_of_two_scales", REF(precision.fp8.power_of_two_scales), "Round every FP8 scale up to a power of two."));
  s.push_back(integer<int64_t>("precision.fp8_amax_history", REF(precision.fp8.amax_history), "Delayed scaling: steps of amax kept per tensor.", 1));
  s.push_back(real("precision.fp8_margin", REF(precision.fp8.margin), "Delayed scaling: scales get 2^margin headroom.", 0.0, 64.0));
  s.push_back(choice("precision.fp8_amax_algorithm", REF(precision.fp8.amax_algorithm), "Delayed scaling: scale from the history's maximum or its most recent amax.",
                     {"max", "most_recent"}, precision::parse_amax_algorithm, [](precision::DelayedScaling::Algorithm v) { return precision::to_string(v); }));

  s.push_back(choice("parallel.backend", REF(parallel.backend), "How ranks talk: nccl (GPU tensors), mpi (CPU tensors), or auto (nccl on GPUs, mpi on CPUs). MPI also starts NCCL.",
                     {"auto", "mpi", "nccl"}, parallel::parse_backend_request, [](parallel::BackendRequest v) { return parallel::to_string(v); }));
  s.push_back(integer<int64_t>("parallel.timeout_s", REF(parallel.timeout_s), "Seconds a collective may take before the job stops with an error naming the rank and operation (a rank died or hangs).", 1));
  s.push_back(real("parallel.bucket_mb", REF(parallel.bucket_mb), "Data-parallel gradient bucket size in MiB: each full bucket's all-reduce starts during backward.", 1e-6, 1e6));
  s.push_back(integer<int64_t>("parallel.zero_stage", REF(parallel.zero_stage), "0: every rank keeps the whole AdamW state; 1 (ZeRO-1): the state is sharded over the data-parallel ranks (gradients reduce-scattered, updated shards all-gathered; checkpoints hold one optimizer file per rank and reshard on resume); 2 (ZeRO-2): gradients too (every micro-batch reduce-scattered during backward, nothing whole kept); 3 (ZeRO-3): the parameters too (each block, the embedding table, the head and the final norm gathered where they run, forward and backward, freed after). With parallel.expert_parallel > 1: every stage (ZeRO then shards the dense parameters' state, at 2 also their gradients, at 3 also the dense parameters; experts keep theirs whole on their EP rank, reduced once per step over the ranks holding the same experts).", 0, 3));
  s.push_back(integer<int64_t>("parallel.expert_parallel", REF(parallel.expert_parallel), "Ranks that share one copy of the routed experts (EP group size): each holds num_experts / expert_parallel experts and tokens travel to them by all-to-all. Must divide the world size and model.moe.num_experts.", 1));
  s.push_back(integer<int64_t>("parallel.pipeline_parallel", REF(parallel.pipeline_parallel), "Pipeline stages: the blocks are split over this many consecutive ranks (stage 0 also runs the embedding, the last stage the head), and trainer.grad_accum_steps micro-batches flow through them. Must divide the world size and be at most model.n_layers. MTP modules run on the last stage; expert parallelism runs over the pipelines at each stage.", 1));
  s.push_back(integer_list("parallel.pp_layers", REF(parallel.pp_layers), "Blocks per pipeline stage, in order (e.g. [3, 5, 5, 3]): one entry per stage (with interleaved_1f1b or dualpipev one per chunk, pipeline_parallel x chunks per rank of them in model order), adding up to model.n_layers. Empty: balanced by parameters (the contiguous split whose largest stage, counting the embedding on stage 0 and the final norm, head and MTP modules on the last, holds the fewest parameters).", 1));
  s.push_back(choice("parallel.pp_schedule", REF(parallel.pp_schedule), "Pipeline schedule: gpipe (every forward, then every backward: all micro-batches' activations kept), 1f1b (one forward, one backward in turn after filling the pipe: at most pipeline_parallel - stage kept on a stage), interleaved_1f1b (Megatron-LM's: each rank holds pp_virtual_stages chunks of blocks, rank s the chunks s, s + P, ...; the bubble shrinks by that factor for more activations and messages; grad_accum_steps must be a multiple of pipeline_parallel), or dualpipev (DeepSeek's DualPipe-V: 2 chunks per rank placed in a V, rank s holding chunks s and 2P - 1 - s, so rank 0 runs the embedding and the head; forwards of one chunk meet backwards of the other; needs grad_accum_steps >= 2 x pipeline_parallel; some backwards split into input and weight gradients, see pp_zero_bubble).",
                     {"gpipe", "1f1b", "interleaved_1f1b", "dualpipev"}, parallel::parse_pipeline_schedule, [](parallel::PipelineSchedule v) { return parallel::to_string(v); }));
  s.push_back(integer<int64_t>("parallel.pp_virtual_stages", REF(parallel.pp_virtual_stages), "Model chunks per pipeline rank with pp_schedule interleaved_1f1b (Megatron-LM's virtual pipeline stages); 0: 2. dualpipev runs 2 (0 or 2); other schedules take 1 (or 0).", 0));
  s.push_back(boolean("parallel.pp_zero_bubble", REF(parallel.pp_zero_bubble), "With pp_schedule dualpipev: split some backwards into the input gradients, sent on at once, and the Linear layers' weight gradients, computed later in W steps that fill the pipeline's idle time (DeepSeek's DualPipe-V with zero-bubble steps; the same gradients bit for bit). Applies at parallel.zero_stage 0 and 1; at 2 and 3, which reduce each backward's gradients as it completes them, the backwards stay whole. false: never split."));
  s.push_back(boolean("parallel.ep_fp8_dispatch", REF(parallel.ep_fp8_dispatch), "Send dispatched tokens as FP8 E4M3 with 1x128 scales (DeepSeek-V3); gradients and the combine stay in the compute dtype."));
  s.push_back(text("distill.teacher.checkpoint", REF(distill.teacher.checkpoint), "A brigade checkpoint (step, checkpoints or run directory) to distil from; empty: train the teacher from distill.teacher.recipe first."));
  s.push_back(text("distill.teacher.recipe", REF(distill.teacher.recipe), "The teacher's training recipe, relative to this recipe's folder (used when distill.teacher.checkpoint is empty)."));
  s.push_back(integer<uint64_t>("distill.teacher.seed", REF(distill.teacher.seed), "Train the teacher (from distill.teacher.recipe) with this trainer.seed; 0: the teacher recipe's own. Use a new run directory per teacher seed: a trained teacher is kept.", 0));
  s.push_back(text("distill.teacher.url", REF(distill.teacher.url), "A remote teacher: the base URL of an OpenAI-compatible server, ending in /v1 (vLLM, SGLang, llama.cpp's server, brigade serve); empty: a local brigade teacher."));
  s.push_back(text("distill.teacher.api", REF(distill.teacher.api), "Remote teacher endpoint: completions (/v1/completions, the prompt as text) or chat (/v1/chat/completions, the prompt as one user message)."));
  s.push_back(text("distill.teacher.model", REF(distill.teacher.model), "Remote teacher: the requests' \"model\" field."));
  s.push_back(text("distill.teacher.api_key_env", REF(distill.teacher.api_key_env), "Remote teacher: the environment variable holding the API key, sent as a Bearer token and never logged; empty: no key."));
  s.push_back(integer<int64_t>("distill.teacher.concurrency", REF(distill.teacher.concurrency), "Remote teacher: requests in flight at once.", 1));
  s.push_back(real("distill.teacher.timeout", REF(distill.teacher.timeout), "Remote teacher: seconds per request (connecting included) before it counts as failed.", 1e-3, 1e6));
  s.push_back(integer<int64_t>("distill.teacher.retries", REF(distill.teacher.retries), "Remote teacher: retries of a request after a connection error, timeout or HTTP 408/409/429/5xx; then the sample is stored as failed and retried by the next run."));
  s.push_back(json_object("distill.teacher.extra_body", REF(distill.teacher.extra_body), "Remote teacher: fields merged into every request body (server-specific sampling settings, e.g. {repeat_penalty: 1.0} for llama.cpp's server, whose default 1.1 penalises repeats even at temperature 0); empty: none."));
  s.push_back(real("distill.teacher.backoff", REF(distill.teacher.backoff), "Remote teacher: seconds before the first retry, doubled for each further one (a Retry-After header wins).", 0.0, 3600.0));
  s.push_back(text("distill.prompts", REF(distill.prompts), "Prompts JSONL ({\"id\", \"prompt\", \"answer\"} per line); empty: the built-in arithmetic problems of data.synthetic."));
  s.push_back(integer<int64_t>("distill.num_prompts", REF(distill.num_prompts), "Use the first N prompts (0: all; the built-in set has data.synthetic.num_problems)."));
  s.push_back(integer<int64_t>("distill.generate.samples", REF(distill.generate.samples), "Teacher samples per prompt.", 1));
  s.push_back(real("distill.generate.temperature", REF(distill.generate.temperature), "Sampling temperature (0: greedy, then samples must be 1).", 0.0, 10.0));
  s.push_back(real("distill.generate.top_p", REF(distill.generate.top_p), "Nucleus sampling: keep the most likely tokens up to this probability.", 1e-6, 1.0));
  s.push_back(integer<int64_t>("distill.generate.max_new_tokens", REF(distill.generate.max_new_tokens), "Tokens per sample at most; longer samples are stored as truncated and rejected.", 1));
  s.push_back(integer<int64_t>("distill.generate.batch_size", REF(distill.generate.batch_size), "Sequences the teacher decodes together (and the eval batch).", 1));
  s.push_back(integer<int64_t>("distill.generate.logprobs", REF(distill.generate.logprobs), "Top-k log-probabilities kept per generated token in the trace store's sidecar (0: none)."));
  s.push_back(text_list("distill.generate.stop", REF(distill.generate.stop), "Stop strings: a sample ends before the first one (finish reason stop). Sent to a remote teacher as \"stop\"."));
  s.push_back(integer<uint64_t>("distill.generate.seed", REF(distill.generate.seed), "Seed of the samples (each sample's seed is hashed from it, the prompt id and the sample index)."));
  s.push_back(text("distill.verify.answer_pattern", REF(distill.verify.answer_pattern), "How to find the final answer: boxed (the last \\boxed{...}), gsm8k (after the last ####, else the last number), exact (the whole text) or a regex whose first group is the answer."));
  s.push_back(boolean("distill.verify.require_think", REF(distill.verify.require_think), "Reject samples without a closed <think>...</think> before the answer."));
  s.push_back(integer<int64_t>("distill.verify.max_chars", REF(distill.verify.max_chars), "Reject completions longer than this many bytes (0: no limit)."));
  s.push_back(integer<int64_t>("distill.verify.max_tokens", REF(distill.verify.max_tokens), "Reject completions longer than this many tokens (0: no limit)."));
  s.push_back(real("distill.verify.numeric_tolerance", REF(distill.verify.numeric_tolerance), "Relative tolerance when comparing numeric answers.", 0.0, 1.0));
  s.push_back(integer<int64_t>("distill.eval.problems", REF(distill.eval.problems), "Held-out problems for pass@1 / pass@k (the built-in arithmetic eval range).", 1));
  s.push_back(integer<int64_t>("distill.eval.k", REF(distill.eval.k), "Samples per problem for pass@k.", 1));
  s.push_back(real("distill.eval.temperature", REF(distill.eval.temperature), "Temperature of the pass@k samples (pass@1 is greedy).", 1e-6, 10.0));
  s.push_back(choice("distill.kd.loss", REF(distill.kd.loss), "Logit distillation in the train stage on the teacher's top-k (needs distill.generate.logprobs > 0): forward_kl, reverse_kl, jsd, uld (sorted distributions: a teacher with another tokenizer), or none (SFT only). See docs/distillation.md.",
                     {"none", "forward_kl", "reverse_kl", "jsd", "uld"}, distill::parse_kd_loss, [](distill::KdLoss v) { return distill::to_string(v); }));
  s.push_back(real("distill.kd.weight", REF(distill.kd.weight), "The KD term's share of the student's loss: (1 - weight) * cross-entropy + weight * KD.", 0.0, 1.0));
  s.push_back(real("distill.kd.temperature", REF(distill.kd.temperature), "KD temperature T (both distributions at T, the divergence times T^2).", 1e-6, 100.0));
  s.push_back(integer<int64_t>("distill.onpolicy.rounds", REF(distill.onpolicy.rounds), "On-policy distillation after the train stage: rounds of student sampling, teacher scoring and KD training on the student's own samples (0: none). See docs/distillation.md.", 0));
  s.push_back(integer<int64_t>("distill.onpolicy.steps_per_round", REF(distill.onpolicy.steps_per_round), "Student optimizer steps per on-policy round.", 1));
  s.push_back(integer<int64_t>("distill.onpolicy.prompts_per_round", REF(distill.onpolicy.prompts_per_round), "Prompts the student answers per round (rotating through the prompt set): how often its samples are refreshed.", 1));
  s.push_back(integer<int64_t>("distill.onpolicy.samples", REF(distill.onpolicy.samples), "Student samples per prompt per round.", 1));
  s.push_back(real("distill.onpolicy.temperature", REF(distill.onpolicy.temperature), "The student's sampling temperature.", 1e-6, 10.0));
  s.push_back(integer<int64_t>("distill.onpolicy.topk", REF(distill.onpolicy.topk), "Teacher log-probs kept per student token (capped at the vocabulary: the whole distribution for small ones; at most 20 with a remote teacher, which scores through echo + logprobs).", 1));
  s.push_back(choice("distill.onpolicy.loss", REF(distill.onpolicy.loss), "The per-token divergence on the student's samples: reverse_kl (GKD's default, mode-seeking), forward_kl or jsd.",
                     {"forward_kl", "reverse_kl", "jsd"}, distill::parse_kd_loss, [](distill::KdLoss v) { return distill::to_string(v); }));
  s.push_back(real("distill.onpolicy.beta", REF(distill.onpolicy.beta), "jsd: the mixture's teacher weight, in (0, 1).", 1e-6, 1.0 - 1e-6));
  s.push_back(real("distill.onpolicy.lr", REF(distill.onpolicy.lr), "The student's constant learning rate during the rounds.", 1e-12, 10.0));
  s.push_back(real("distill.onpolicy.lambda", REF(distill.onpolicy.lambda), "GKD's lambda: the share of each round's prompts the student answers; the others bring the teacher's verified samples, trained on with the same divergence (1: all on-policy).", 0.0, 1.0));
  s.push_back(real("distill.kd.beta", REF(distill.kd.beta), "jsd: the mixture's teacher weight, in (0, 1) (0.5: symmetric JSD).", 1e-6, 1.0 - 1e-6));
  s.push_back(integer<int64_t>("trainer.max_steps", REF(trainer.max_steps), "Optimizer steps; also where the cosine schedule ends.", 1));
  s.push_back(integer<int64_t>("trainer.micro_batch_size", REF(trainer.micro_batch_size), "Sequences per micro-batch per rank.", 1));
  s.push_back(integer<int64_t>("trainer.grad_accum_steps", REF(trainer.grad_accum_steps), "Micro-batches accumulated per optimizer step (a power of two keeps runs on different rank counts bit-identical: docs/distributed.md).", 1));
  s.push_back(real("trainer.lr", REF(trainer.lr), "Peak learning rate.", 1e-12, 10.0));
  s.push_back(real("trainer.min_lr", REF(trainer.min_lr), "Learning-rate floor at the end of the cosine decay.", 0.0, 10.0));
  s.push_back(integer<int64_t>("trainer.warmup_steps", REF(trainer.warmup_steps), "Linear warmup steps from 0 to lr."));
  s.push_back(real("trainer.weight_decay", REF(trainer.weight_decay), "Decoupled weight decay (AdamW).", 0.0, 10.0));
  s.push_back(real("trainer.beta1", REF(trainer.beta1), "AdamW beta1.", 0.0, 0.999999));
  s.push_back(real("trainer.beta2", REF(trainer.beta2), "AdamW beta2.", 0.0, 0.999999999));
  s.push_back(real("trainer.eps", REF(trainer.eps), "AdamW epsilon.", 1e-30, 1.0));
  s.push_back(real("trainer.grad_clip", REF(trainer.grad_clip), "Clip the global gradient norm to this; 0 disables."));
  s.push_back(boolean("trainer.decay_norms_and_biases", REF(trainer.decay_norms_and_biases), "Apply weight decay to norm weights and biases."));
  s.push_back(boolean("trainer.decay_embeddings", REF(trainer.decay_embeddings), "Apply weight decay to the token embedding."));
  s.push_back(boolean("trainer.tensorboard", REF(trainer.tensorboard),
                      "Also write every metrics.jsonl value as TensorBoard scalars into RUN/tensorboard/ (rank 0)."));
  s.push_back(integer<int64_t>("trainer.log_every", REF(trainer.log_every), "Steps between metrics.jsonl lines (and plain progress lines).", 1));
  s.push_back(integer<int64_t>("trainer.eval_every", REF(trainer.eval_every), "Steps between evaluations; 0 = only at the end."));
  s.push_back(integer<int64_t>("trainer.eval_batches", REF(trainer.eval_batches), "Held-out micro-batches per evaluation.", 1));
  s.push_back(integer<int64_t>("trainer.checkpoint_every", REF(trainer.checkpoint_every), "Steps between checkpoints; 0 = only at the end."));
  s.push_back(integer<int64_t>("trainer.keep_checkpoints", REF(trainer.keep_checkpoints), "Most recent checkpoints kept.", 1));
  s.push_back(integer<uint64_t>("trainer.seed", REF(trainer.seed), "Seed for model init and data order."));
  s.push_back(integer<int64_t>("trainer.threads", REF(trainer.threads), "CPU threads for compute; 0 = the node's cores divided by its ranks."));
  s.push_back(choice("trainer.activation_checkpointing", REF(trainer.activation_checkpointing), "Activation memory for compute: none; selective (the attention core is recomputed in backward: no [batch, heads, seq, seq] intermediates kept); full (each transformer block is recomputed; only block inputs are kept; about one more forward per step). Full is refused with MoE aux losses and expert parallelism (not supported yet).",
                     {"none", "selective", "full"}, parse_checkpointing, [](Checkpointing v) { return brigade::to_string(v); }));
  s.push_back(choice("trainer.device", REF(trainer.device), "Where the model, optimizer state and batches live: cuda (one GPU per rank: local rank i on visible GPU i), cpu, or auto (cuda when a GPU is visible). See docs/gpu.md.",
                     {"auto", "cpu", "cuda"}, parse_device_kind, [](DeviceKind v) { return brigade::to_string(v); }));
  s.push_back(choice("trainer.on_nonfinite", REF(trainer.on_nonfinite), "On a NaN/Inf loss or gradient: abort with the step and parameter, or skip the update.",
                     {"abort", "skip"}, trainer::parse_nonfinite_policy, [](NonFinitePolicy v) { return trainer::to_string(v); }));
  s.push_back(integer<int64_t>("trainer.stop_after", REF(trainer.stop_after), "Stop at this step (with a checkpoint) without changing the schedule; 0 = run to max_steps."));
  return s;
}

#undef REF

}  // namespace

const std::vector<Field>& schema() {
  static const std::vector<Field> fields = build_schema();
  return fields;
}

const Field* find_field(const std::string& path) {
  for (const auto& f : schema())
    if (f.path == path) return &f;
  return nullptr;
}

bool is_section(const std::string& path) {
  const std::string prefix = path + ".";
  for (const auto& f : schema())
    if (f.path.rfind(prefix, 0) == 0) return true;
  return false;
}

}  // namespace brigade::recipes
