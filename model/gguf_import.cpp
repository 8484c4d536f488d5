#include "model/gguf_import.h"

#include <map>
#include <set>

#include <torch/torch.h>

#include "core/error.h"
#include "data/bpe.h"
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
                           {"qwen3moe", HfFamily::kQwen3Moe}};

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
                "' cannot be imported (brigade reads llama, qwen2, qwen3 and qwen3moe)");
  auto key = [&](const std::string& k) { return arch + "." + k; };
  auto integer = [&](const std::string& k, std::optional<int64_t> fallback = std::nullopt) -> int64_t {
    if (!reader.has(key(k))) {
      BRIGADE_CHECK(fallback.has_value(), where, ": missing metadata key ", key(k));
      return *fallback;
    }
    return reader.metadata(key(k)).as_int(key(k));
  };
  auto real = [&](const std::string& k, double fallback) {
    return reader.has(key(k)) ? reader.metadata(key(k)).as_float(key(k)) : fallback;
  };
  if (reader.has(key("rope.scaling.type"))) {
    const std::string type = reader.metadata(key("rope.scaling.type")).as_string(key("rope.scaling.type"));
    BRIGADE_CHECK(type == "none", where, ": ", key("rope.scaling.type"), " is '", type,
                  "'; brigade implements plain RoPE only");
  }
  auto& o = info.options;
  const auto& embedding = reader.info("token_embd.weight");
  BRIGADE_CHECK(embedding.ne.size() == 2, where, ": token_embd.weight must be 2-D");
  o.vocab_size = embedding.ne[1];
  o.d_model = integer("embedding_length");
  o.n_layers = integer("block_count");
  o.n_heads = integer("attention.head_count");
  BRIGADE_CHECK(o.n_heads > 0, where, ": ", key("attention.head_count"), " must be positive");
  o.n_kv_heads = integer("attention.head_count_kv", o.n_heads);
  o.head_dim = integer("attention.key_length", o.d_model / o.n_heads);
  BRIGADE_CHECK(integer("attention.value_length", o.head_dim) == o.head_dim, where, ": ",
                key("attention.value_length"), " differs from key_length; brigade's heads have one size");
  if (o.head_dim * o.n_heads == o.d_model) o.head_dim = 0;
  o.d_ff = integer("feed_forward_length", 0);
  o.max_seq_len = integer("context_length");
  o.rope_theta = real("rope.freq_base", 10000.0);
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
  for (const auto& [name, target] : model.state_dict()) {
    if (name.ends_with(".e_score_correction_bias")) continue;  // qwen3moe has none: stays zero
    if (name.starts_with("mtp.")) continue;  // llama.cpp files hold no MTP modules: they keep their initialisation
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
    copies.emplace_back(target, t);
  }
  for (const auto& t : reader.file().tensors) {
    if (t.name == "rope_freqs.weight") continue;  // derived from the metadata
    BRIGADE_CHECK(used.contains(t.name), where, ": unexpected tensor '", t.name,
                  "' (the metadata describes a model without it)");
  }
  for (auto& [target, source] : copies) target.copy_(source);
}

}  // namespace brigade::model
