#include "model/gguf_import.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "data/bpe.h"
#include "data/spm.h"
#include "model/gguf.h"
#include "model/gguf_export.h"

namespace brigade::model {
namespace {

struct Arch {
  const char* name;
  HfFamily family;
};
constexpr Arch kArchs[] = {{"llama", HfFamily::kLlama},
                           {"qwen2", HfFamily::kQwen2},
                           {"qwen3", HfFamily::kQwen3},
                           {"qwen3moe", HfFamily::kQwen3Moe},
                           {"deepseek2", HfFamily::kDeepseekV3}};

// Metadata reads for one architecture, naming the file and key in every error.
struct MetadataReader {
  const GgufReader& reader;
  const std::string& arch;
  const std::string& where;
  std::string key(const std::string& k) const { return arch + "." + k; }
  bool has(const std::string& k) const { return reader.has(key(k)); }
  int64_t integer(const std::string& k, std::optional<int64_t> fallback = std::nullopt) const {
    if (!has(k)) {
      BRIGADE_CHECK(fallback.has_value(), where, ": missing metadata key ", key(k));
      return *fallback;
    }
    return reader.metadata(key(k)).as_int(key(k));
  }
  double real(const std::string& k, double fallback) const {
    return has(k) ? reader.metadata(key(k)).as_float(key(k)) : fallback;
  }
};

// rope.scaling.*: none, linear (factor) or yarn (factor, original context, betas; for
// deepseek2 yarn_log_multiplier = 0.1 * mscale_all_dim, with cos/sin unscaled as
// llama.cpp runs it: mscale = mscale_all_dim).
void read_rope_scaling(const MetadataReader& m, TransformerOptions& o) {
  if (!m.has("rope.scaling.type")) return;
  const std::string type = m.reader.metadata(m.key("rope.scaling.type")).as_string(m.key("rope.scaling.type"));
  auto& s = o.rope_scaling;
  if (type == "none") return;
  const double factor = m.real("rope.scaling.factor", 0.0);
  if (type == "linear" && (factor == 0.0 || factor == 1.0)) return;  // llama.cpp's default: no scaling
  BRIGADE_CHECK(type == "linear" || type == "yarn", m.where, ": ", m.key("rope.scaling.type"), " is '", type,
                "'; brigade reads none, linear and yarn");
  BRIGADE_CHECK(factor > 0, m.where, ": ", m.key("rope.scaling.factor"), " must be positive for ", type, " scaling");
  s.type = type == "yarn" ? RopeScalingType::kYarn : RopeScalingType::kLinear;
  s.factor = factor;
  if (type == "yarn") {
    s.original_max_seq_len = m.integer("rope.scaling.original_context_length", o.max_seq_len);
    s.beta_fast = m.real("rope.scaling.yarn_beta_fast", 32.0);
    s.beta_slow = m.real("rope.scaling.yarn_beta_slow", 1.0);
    BRIGADE_CHECK(m.real("rope.scaling.attn_factor", 1.0) == 1.0, m.where, ": ", m.key("rope.scaling.attn_factor"),
                  " other than 1 is not read");
    if (o.is_mla()) {
      // The file holds 0.1 * mscale_all_dim in float32; configs give it as a short
      // decimal (DeepSeek: 1, 0.707), which six significant digits recover exactly.
      const double all_dim = m.real("rope.scaling.yarn_log_multiplier", 0.0) / 0.1;
      s.mscale = s.mscale_all_dim = std::round(all_dim * 1e6) / 1e6;
    }
  }
  try {
    s.validate();
  } catch (const Error& e) {
    BRIGADE_FAIL(m.where, ": ", e.message());
  }
}

// deepseek2: multi-head latent attention in llama.cpp's absorbed form (the
// attention.*_mla keys; the legacy attn_kv_b form is not read), dense leading
// layers, shared + routed experts (docs/formats.md, "GGUF").
void read_deepseek2(const MetadataReader& m, TransformerOptions& o) {
  BRIGADE_CHECK(m.has("attention.key_length_mla") && m.has("attention.value_length_mla"), m.where,
                ": deepseek2 without ", m.key("attention.key_length_mla"), " / value_length_mla (the older attn_kv_b "
                "layout) is not read; convert the model with a current llama.cpp");
  BRIGADE_CHECK(m.integer("attention.head_count_kv", 1) == 1, m.where, ": ", m.key("attention.head_count_kv"),
                " must be 1 for multi-head latent attention");
  o.attention = AttentionKind::kMla;
  o.n_kv_heads = 0;
  o.head_dim = 0;
  auto& a = o.mla;
  const bool lite = o.n_layers == 26 || o.n_layers == 27 || (o.n_layers == 48 && o.vocab_size == 128256);
  a.q_lora_rank = lite ? 0 : m.integer("attention.q_lora_rank");  // llama.cpp ignores it for V2-Lite shapes
  a.kv_lora_rank = m.integer("attention.kv_lora_rank");
  a.qk_rope_head_dim = m.integer("rope.dimension_count");
  a.qk_nope_head_dim = m.integer("attention.key_length_mla") - a.qk_rope_head_dim;
  a.v_head_dim = m.integer("attention.value_length_mla");
  const int64_t dense = m.integer("leading_dense_block_count", 0);
  auto& e = o.moe;
  if (m.integer("expert_count", 0) == 0 || dense >= o.n_layers) {
    e.num_experts = 0;
    return;
  }
  e.num_experts = m.integer("expert_count");
  e.top_k = m.integer("expert_used_count");
  e.expert_d_ff = m.integer("expert_feed_forward_length");
  e.num_shared_experts = m.integer("expert_shared_count");
  e.shared_d_ff = 0;
  e.first_k_dense = dense;
  const double scale = m.real("expert_weights_scale", 0.0);
  e.routed_scaling = scale == 0.0 ? 1.0 : scale;
  e.normalize_topk = m.has("expert_weights_norm") &&
                     m.reader.metadata(m.key("expert_weights_norm")).as_bool(m.key("expert_weights_norm"));
  const int64_t gating = m.integer("expert_gating_func", 1);  // llama.cpp: missing means softmax
  BRIGADE_CHECK(gating == 1 || gating == 2, m.where, ": ", m.key("expert_gating_func"), " is ", gating,
                "; brigade reads 1 (softmax) and 2 (sigmoid)");
  e.score_function = gating == 2 ? moe::ScoreFunction::kSigmoid : moe::ScoreFunction::kSoftmax;
  if (gating == 1) e.bias_update_rate = 0.0;  // no selection bias with softmax scores
  e.num_groups = m.integer("expert_group_count", 1);
  e.topk_group = m.integer("expert_group_used_count", e.num_groups);
  if (e.num_groups <= 1) e.num_groups = e.topk_group = 1;
  e.group_score = moe::GroupScore::kTopTwoSum;
  e.dropless = true;
}

}  // namespace


GgufModelInfo read_gguf_model_info(const std::filesystem::path& path) {
  const GgufReader reader(path);
  const std::string where = "GGUF file " + path.string();
  const std::string arch = reader.metadata("general.architecture").as_string("general.architecture");
  GgufModelInfo info;
  bool known = false;
  for (const auto& a : kArchs)
    if (arch == a.name) info.family = a.family, known = true;
  BRIGADE_CHECK(known, where, ": general.architecture '", arch,
                "' cannot be imported (brigade reads llama, qwen2, qwen3, qwen3moe and deepseek2)");
  const MetadataReader meta{reader, arch, where};
  auto key = [&](const std::string& k) { return meta.key(k); };
  auto integer = [&](const std::string& k, std::optional<int64_t> fallback = std::nullopt) {
    return meta.integer(k, fallback);
  };
  auto real = [&](const std::string& k, double fallback) { return meta.real(k, fallback); };
  auto& o = info.options;
  const auto& embedding = reader.info("token_embd.weight");
  BRIGADE_CHECK(embedding.ne.size() == 2, where, ": token_embd.weight must be 2-D");
  o.vocab_size = embedding.ne[1];
  o.d_model = integer("embedding_length");
  o.n_layers = integer("block_count");
  o.n_heads = integer("attention.head_count");
  BRIGADE_CHECK(o.n_heads > 0, where, ": ", key("attention.head_count"), " must be positive");
  o.d_ff = integer("feed_forward_length", 0);
  o.max_seq_len = integer("context_length");
  o.rope_theta = real("rope.freq_base", 10000.0);
  if (arch == "deepseek2") {
    read_deepseek2(meta, o);
    // The Hugging Face family it would be: softmax routing is deepseek_v2's, the rest deepseek_v3's.
    info.family = o.moe.enabled() && o.moe.score_function == moe::ScoreFunction::kSoftmax ? HfFamily::kDeepseekV2
                                                                                          : HfFamily::kDeepseekV3;
  } else {
    o.n_kv_heads = integer("attention.head_count_kv", o.n_heads);
    o.head_dim = integer("attention.key_length", o.d_model / o.n_heads);
    BRIGADE_CHECK(integer("attention.value_length", o.head_dim) == o.head_dim, where, ": ",
                  key("attention.value_length"), " differs from key_length; brigade's heads have one size");
    if (o.head_dim * o.n_heads == o.d_model) o.head_dim = 0;
  }
  read_rope_scaling(meta, o);

  o.norm_eps = real("attention.layer_norm_rms_epsilon", 1e-5);
  o.tie_embeddings = reader.file().find_tensor("output.weight") == nullptr;
  o.qkv_bias = info.family == HfFamily::kQwen2;
  o.qk_norm = info.family == HfFamily::kQwen3 || info.family == HfFamily::kQwen3Moe;
  if (info.family == HfFamily::kQwen3Moe) {
    // llama.cpp's qwen3moe: softmax top-k renormalised, no shared experts, no bias.
    auto& m = o.moe;
    m.num_experts = integer("expert_count");
    m.top_k = integer("expert_used_count");
    m.expert_d_ff = integer("expert_feed_forward_length");
    m.num_shared_experts = 0;
    m.score_function = moe::ScoreFunction::kSoftmax;
    m.normalize_topk = true;
    m.routed_scaling = 1.0;
    m.num_groups = 1;
    m.topk_group = 1;
    m.first_k_dense = 0;
    m.bias_update_rate = 0.0;
  }
  try {
    o.validate();
  } catch (const Error& e) {
    BRIGADE_FAIL(where, ": ", e.message());
  }
  // brigade's byte tokenizer, exported as a byte-level BPE without merges?
  if (reader.has("tokenizer.ggml.tokens")) {
    const auto tokens = reader.metadata("tokenizer.ggml.tokens").as_strings("tokenizer.ggml.tokens");
    const data::BpeTokenizer byte_tokenizer = data::BpeTokenizer::from_byte_tokenizer();
    const auto& byte = byte_tokenizer.tokens();
    const bool no_merges = !reader.has("tokenizer.ggml.merges") ||
                           reader.metadata("tokenizer.ggml.merges").as_strings("tokenizer.ggml.merges").empty();
    info.byte_vocabulary =
        no_merges && tokens.size() >= byte.size() && std::equal(byte.begin(), byte.end(), tokens.begin());
  }
  return info;
}

void load_gguf_weights(TransformerImpl& model, const std::filesystem::path& path) {
  const GgufReader reader(path);
  const std::string where = "GGUF file " + path.string();
  const std::string arch = reader.metadata("general.architecture").as_string("general.architecture");
  const TransformerOptions& o = model.options();
  torch::NoGradGuard no_grad;
  // Every target with the file tensor(s) it comes from, read and checked first.
  std::vector<std::pair<torch::Tensor, torch::Tensor>> copies;
  std::set<std::string> used;
  auto read = [&](const std::string& name, at::IntArrayRef shape) {
    BRIGADE_CHECK(reader.file().find_tensor(name) != nullptr, where, ": no tensor '", name,
                  "' (the metadata describes a model that has it)");
    used.insert(name);
    torch::Tensor t = reader.tensor(name);
    BRIGADE_CHECK(t.sizes() == shape, where, ": tensor '", name, "' has torch shape ", t.sizes(),
                  " but the metadata implies ", shape);
    return t;
  };
  const bool mla = o.is_mla();
  for (const auto& [name, target] : model.state_dict()) {
    if (name.starts_with("mtp.")) continue;  // llama.cpp files hold no MTP modules: they keep their initialisation
    if (name.ends_with(".e_score_correction_bias")) {
      // deepseek2's optional exp_probs_b; qwen3moe has none: it stays zero.
      const std::string bias = gguf_tensor_name(name);
      if (mla && reader.file().find_tensor(bias) != nullptr) copies.emplace_back(target, read(bias, target.sizes()));
      continue;
    }
    if (mla && name.ends_with("self_attn.kv_b_proj.weight")) {
      // attn_k_b [heads, kv_lora, dn] (transposed) and attn_v_b [heads, dv, kv_lora] back into
      // kv_b_proj [heads * (dn + dv), kv_lora].
      const std::string blk = "blk." + name.substr(7, name.find(".self_attn") - 7) + ".";
      const auto& a = o.mla;
      const auto k_b = read(blk + "attn_k_b.weight", {o.n_heads, a.kv_lora_rank, a.qk_nope_head_dim});
      const auto v_b = read(blk + "attn_v_b.weight", {o.n_heads, a.v_head_dim, a.kv_lora_rank});
      copies.emplace_back(target, torch::cat({k_b.transpose(1, 2), v_b}, 1).reshape(target.sizes()));
      continue;
    }
    if (name.ends_with("mlp.experts.gate_up_proj")) {
      const std::string blk = "blk." + name.substr(7, name.find(".mlp") - 7) + ".";
      const int64_t ff = target.size(1) / 2;
      const auto gate = read(blk + "ffn_gate_exps.weight", {target.size(0), ff, target.size(2)});
      const auto up = read(blk + "ffn_up_exps.weight", {target.size(0), ff, target.size(2)});
      copies.emplace_back(target, torch::cat({gate, up}, 1));
      continue;
    }
    torch::Tensor t = read(gguf_tensor_name(name), target.sizes());
    if (arch == "llama" && name.ends_with("self_attn.q_proj.weight"))
      t = permute_for_interleaved_rope(t, o.n_heads, /*inverse=*/true);
    if (arch == "llama" && name.ends_with("self_attn.k_proj.weight"))
      t = permute_for_interleaved_rope(t, o.kv_heads(), /*inverse=*/true);
    if (mla) t = convert_rope_rows(name, t, o, /*to_interleaved=*/false);  // deepseek2's interleaved pairs
    copies.emplace_back(target, t);
  }
  for (const auto& t : reader.file().tensors) {
    if (t.name == "rope_freqs.weight") continue;  // derived from the metadata
    BRIGADE_CHECK(used.contains(t.name), where, ": unexpected tensor '", t.name,
                  "' (the metadata describes a model without it)");
  }
  Progress bar("import gguf (tensors)", static_cast<int64_t>(copies.size()), stderr_is_terminal(), /*quiet_seconds=*/2.0);
  int64_t copied = 0;
  for (auto& [target, source] : copies) {
    target.copy_(source);
    bar.tick(++copied, "");
  }
  bar.finish();
}

namespace {

// llama.cpp's pre-tokenizers by tokenizer.ggml.pre name: the split regexes it
// applies in turn (src/llama-vocab.cpp, llm_tokenizer_bpe), and whether a whole
// word found in the vocabulary skips the merges (its ignore_merges). Where
// llama.cpp rewrote a tokenizer.json regex for its own engine (llama3's (?i:...),
// tekken's letter classes), its rewriting is used, so both split alike.
using PreTokenizerTable = std::vector<std::pair<std::vector<std::string>, PreTokenizerSplits>>;
const PreTokenizerTable& pre_tokenizers() {
  static const PreTokenizerTable table = [] {
    const std::string gpt2 = data::pre_tokenizer_pattern("gpt2");
    const std::string llama3 = data::pre_tokenizer_pattern("llama-bpe");
    const std::string qwen2 = data::pre_tokenizer_pattern("qwen2");
    const std::string finnish = R"( ?[^(\s|.,!?…。，、।۔،)]+)";
    return PreTokenizerTable{
        // "default": brigade's own exports name no pre-tokenizer for a byte-level BPE
        // without a split regex, which applies GPT-2's split.
        {{"gpt-2", "default", "mpt", "olmo", "jais", "trillion", "exaone4"}, {{}, false}},
        {{"llama-bpe", "llama3", "dbrx", "smaug-bpe"}, {{llama3}, true}},
        {{"chatglm-bpe", "glm4"}, {{llama3}, false}},
        {{"qwen2", "stablelm2", "deepseek-r1-qwen", "hunyuan"}, {{qwen2}, false}},
        {{"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"},
         {{R"(\p{N})", gpt2}, false}},
        {{"falcon"}, {{R"([\p{P}\$\+<=>\^~\|`]+)", gpt2, "[0-9][0-9][0-9]"}, false}},
        // Written with \x{...} where a letter's canonical equivalent differs (ώ, ι, ΐ, Ί,
        // Ω, K): an editor's NFC would otherwise turn a range's end into another code point.
        {{"deepseek-llm"},
         {{"[\r\n]",
           R"(\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\x{1F7D}ᾀ-ᾴᾶ-ᾼ\x{1FBE}ῂ-ῄῆ-ῌῐ-\x{1FD3}ῖ-\x{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\x{2126}ℨ\x{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+)",
           R"(\s?[!-/:-~！-／：-～‘-‟　-。]+)", R"(\s+$)", "[一-龥ࠀ-一가-퟿]+", R"(\p{N}+)"},
          false}},
        {{"deepseek-coder"}, {{"[\r\n]", R"(\s?\p{L}+)", R"(\s?\p{P}+)", "[一-龥ࠀ-一가-퟿]+", R"(\p{N})"}, false}},
        {{"deepseek-v3"},
         {{R"(\p{N}{1,3})", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
           R"([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"},
          false}},
        {{"tekken"},
         {{R"([^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)"},
          true}},
        {{"poro-chat", "bloom", "gpt3-finnish"}, {{finnish}, false}},
        {{"viking"}, {{finnish, R"(\p{N})"}, false}},
    };
  }();
  return table;
}

}  // namespace

const PreTokenizerSplits* gguf_pre_tokenizer(const std::string& name) {
  for (const auto& [names, splits] : pre_tokenizers()) {
    if (std::find(names.begin(), names.end(), name) != names.end()) return &splits;
  }
  return nullptr;
}

std::string gguf_pre_tokenizer_names() {
  std::string out;
  for (const auto& [names, splits] : pre_tokenizers()) {
    for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  }
  return out;
}

data::BpeTokenizer read_gguf_tokenizer(const std::filesystem::path& path) {
  const GgufReader reader(path);
  const std::string where = "GGUF file " + path.string();
  auto text = [&](const char* key) { return reader.metadata(key).as_string(key); };
  BRIGADE_CHECK(reader.has("tokenizer.ggml.model"), where, ": no tokenizer.ggml.model (the file carries no vocabulary)");
  const std::string model = text("tokenizer.ggml.model");
  BRIGADE_CHECK(model == "gpt2", where, ": tokenizer.ggml.model is '", model,
                "'; brigade rebuilds byte-level BPE (gpt2) and SentencePiece (llama, read_gguf_vocabulary) "
                "vocabularies, so set data.tokenizer to the model's tokenizer.json");
  const std::string pre = reader.has("tokenizer.ggml.pre") ? text("tokenizer.ggml.pre") : "default";
  const PreTokenizerSplits* family = gguf_pre_tokenizer(pre);
  BRIGADE_CHECK(family != nullptr, where, ": tokenizer.ggml.pre is '", pre,
                "', a pre-tokenizer brigade does not implement (", gguf_pre_tokenizer_names(),
                "); set data.tokenizer to the model's tokenizer.json");
  const auto tokens = reader.metadata("tokenizer.ggml.tokens").as_strings("tokenizer.ggml.tokens");
  std::vector<int64_t> types(tokens.size(), 1);
  if (reader.has("tokenizer.ggml.token_type")) types = reader.metadata("tokenizer.ggml.token_type").as_ints("tokenizer.ggml.token_type");
  BRIGADE_CHECK(types.size() == tokens.size(), where, ": tokenizer.ggml.token_type has ", types.size(),
                " entries for ", tokens.size(), " tokens");
  const std::vector<std::string> merges = reader.has("tokenizer.ggml.merges")
                                              ? reader.metadata("tokenizer.ggml.merges").as_strings("tokenizer.ggml.merges")
                                              : std::vector<std::string>{};
  // The tokenizer.json Hugging Face would hold for this vocabulary.
  nlohmann::json vocab = nlohmann::json::object(), added = nlohmann::json::array();
  for (size_t id = 0; id < tokens.size(); ++id) {
    if (types[id] == 3 || types[id] == 4) {  // control, user-defined
      added.push_back({{"id", id}, {"content", tokens[id]}, {"special", types[id] == 3}, {"normalized", false},
                       {"lstrip", false}, {"rstrip", false}, {"single_word", false}});
    } else {
      vocab[tokens[id]] = id;
    }
  }
  nlohmann::json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}};
  nlohmann::json pre_tokenizer;
  if (family->regexes.empty()) {  // GPT-2's split, inside ByteLevel
    pre_tokenizer = byte_level;
    pre_tokenizer["use_regex"] = true;
  } else {
    byte_level["use_regex"] = false;
    nlohmann::json steps = nlohmann::json::array();
    for (const auto& regex : family->regexes)
      steps.push_back({{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}});
    steps.push_back(byte_level);
    pre_tokenizer = {{"type", "Sequence"}, {"pretokenizers", steps}};
  }
  nlohmann::json json = {{"version", "1.0"},
                         {"added_tokens", added},
                         {"normalizer", nullptr},
                         {"pre_tokenizer", pre_tokenizer},
                         {"post_processor", nullptr},
                         {"decoder", {{"type", "ByteLevel"}}},
                         {"model",
                          {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"fuse_unk", false},
                           {"byte_fallback", false}, {"ignore_merges", family->ignore_merges},
                           {"vocab", vocab}, {"merges", merges}}}};
  nlohmann::json config = nlohmann::json::object();
  for (const auto& [key, role] : {std::pair{"tokenizer.ggml.bos_token_id", "bos_token"},
                                  {"tokenizer.ggml.eos_token_id", "eos_token"},
                                  {"tokenizer.ggml.padding_token_id", "pad_token"}}) {
    if (!reader.has(key)) continue;
    const int64_t id = reader.metadata(key).as_int(key);
    BRIGADE_CHECK(id >= 0 && id < static_cast<int64_t>(tokens.size()), where, ": ", key, " = ", id,
                  " is not a token id (", tokens.size(), " tokens)");
    config[role] = tokens[static_cast<size_t>(id)];
  }
  if (reader.has("tokenizer.ggml.add_bos_token"))
    config["add_bos_token"] = reader.metadata("tokenizer.ggml.add_bos_token").as_bool("tokenizer.ggml.add_bos_token");
  if (reader.has("tokenizer.chat_template"))
    config["chat_template"] = reader.metadata("tokenizer.chat_template").as_string("tokenizer.chat_template");
  return data::BpeTokenizer::parse(json.dump(), where + " (tokenizer.ggml.*)", config.dump(),
                                   where + " (tokenizer.ggml.*_token_id)");
}

data::SpmTokenizer read_gguf_spm_tokenizer(const std::filesystem::path& path) {
  const GgufReader reader(path);
  const std::string where = "GGUF file " + path.string();
  BRIGADE_CHECK(reader.has("tokenizer.ggml.model"), where, ": no tokenizer.ggml.model (the file carries no vocabulary)");
  const std::string model = reader.metadata("tokenizer.ggml.model").as_string("tokenizer.ggml.model");
  BRIGADE_CHECK(model == "llama", where, ": tokenizer.ggml.model is '", model, "', not a SentencePiece vocabulary (llama)");
  data::SpmVocabulary v;
  v.tokens = reader.metadata("tokenizer.ggml.tokens").as_strings("tokenizer.ggml.tokens");
  const size_t n = v.tokens.size();
  if (reader.has("tokenizer.ggml.scores")) {
    const gguf::Value& scores = reader.metadata("tokenizer.ggml.scores");
    BRIGADE_CHECK(scores.type == gguf::ValueType::kArray && scores.element_type == gguf::ValueType::kFloat32, where,
                  ": tokenizer.ggml.scores must be an array of float32");
    for (const auto& e : scores.elements) v.scores.push_back(std::get<float>(e));
  } else {
    v.scores.assign(n, 0.0f);
  }
  if (reader.has("tokenizer.ggml.token_type")) {
    for (int64_t t : reader.metadata("tokenizer.ggml.token_type").as_ints("tokenizer.ggml.token_type"))
      v.types.push_back(static_cast<int32_t>(t));
  } else {
    v.types.assign(n, 1);
  }
  // llama.cpp makes end-of-turn / end-of-generation tokens control tokens whatever
  // the file says ("control-looking token ... its type will be overridden"), so they
  // are cut out of text only with special tokens allowed; brigade reads them alike.
  static const std::set<std::string> kEndOfGeneration = {
      "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>",
      "<|end_of_text|>", "<end_of_utterance>", "<｜end▁of▁sentence｜>"};
  for (size_t id = 0; id < v.types.size() && id < n; ++id) {
    if (kEndOfGeneration.contains(v.tokens[id])) v.types[id] = static_cast<int32_t>(data::SpmTokenType::kControl);
  }
  if (reader.has("tokenizer.ggml.add_bos_token"))
    v.add_bos = reader.metadata("tokenizer.ggml.add_bos_token").as_bool("tokenizer.ggml.add_bos_token");
  if (reader.has("tokenizer.chat_template"))
    v.chat_template = reader.metadata("tokenizer.chat_template").as_string("tokenizer.chat_template");
  if (reader.has("tokenizer.ggml.add_space_prefix"))
    v.add_space_prefix = reader.metadata("tokenizer.ggml.add_space_prefix").as_bool("tokenizer.ggml.add_space_prefix");
  const std::pair<const char*, std::optional<int64_t>*> roles[] = {{"tokenizer.ggml.bos_token_id", &v.bos},
                                                                     {"tokenizer.ggml.eos_token_id", &v.eos},
                                                                     {"tokenizer.ggml.unknown_token_id", &v.unk},
                                                                     {"tokenizer.ggml.padding_token_id", &v.pad}};
  for (const auto& [key, role] : roles) {
    if (reader.has(key)) *role = reader.metadata(key).as_int(key);
  }
  return data::SpmTokenizer(std::move(v), where + " (tokenizer.ggml.*)");
}

std::unique_ptr<data::Tokenizer> read_gguf_vocabulary(const std::filesystem::path& path) {
  const GgufReader reader(path);
  const std::string key = "tokenizer.ggml.model";
  if (reader.has(key) && reader.metadata(key).as_string(key) == "llama")
    return std::make_unique<data::SpmTokenizer>(read_gguf_spm_tokenizer(path));
  return std::make_unique<data::BpeTokenizer>(read_gguf_tokenizer(path));
}

}  // namespace brigade::model
