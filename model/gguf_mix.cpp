#include "model/gguf_mix.h"

#include <charconv>

#include "core/error.h"

namespace brigade::model::gguf {
namespace {

bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

// ggml_n_dims: trailing dims of size 1 do not count.
int n_dims(std::span<const int64_t> ne) {
  int n = 1;
  for (int d = 0; d < static_cast<int>(ne.size()); ++d)
    if (ne[d] > 1) n = d + 1;
  return n;
}

// llama.cpp's tensor_allows_quantization, for the names brigade writes.
bool quantizable(const std::string& name, std::span<const int64_t> ne) {
  return n_dims(ne) >= 2 && name.ends_with("weight") && !contains(name, "_norm.weight") &&
         !contains(name, "ffn_gate_inp.weight");
}

GgmlType mix_type(QuantMix mix) {
  switch (mix) {
    case QuantMix::kF32: return GgmlType::kF32;
    case QuantMix::kF16: return GgmlType::kF16;
    case QuantMix::kQ8_0: return GgmlType::kQ8_0;
    case QuantMix::kQ6_K: return GgmlType::kQ6_K;
    case QuantMix::kQ5_K_M: return GgmlType::kQ5_K;
    case QuantMix::kQ4_K_M: return GgmlType::kQ4_K;
  }
  BRIGADE_ASSERT(false, "unknown QuantMix");
}

// The layer of a "blk.<i>." name, checked against the model; nullopt for other names.
std::optional<int64_t> layer_of(const std::string& name, const MixModel& model) {
  if (!name.starts_with("blk.")) return std::nullopt;
  int64_t layer = -1;
  const char* begin = name.data() + 4;
  const auto [end, ec] = std::from_chars(begin, name.data() + name.size(), layer);
  BRIGADE_CHECK(ec == std::errc() && *end == '.' && layer >= 0 && layer < model.n_layers, "GGUF mix: tensor '", name,
                "' does not name a layer in [0, ", model.n_layers, ")");
  return layer;
}

// llama.cpp's use_more_bits: the first and last eighth of the layers and every third
// layer between them get more bits in the *_M mixes.
bool more_bits_layer(int64_t i, int64_t n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

// tensor_type_fallback: the nearest type whose block divides ne[0].
GgmlType shape_fallback(GgmlType type, int64_t ne0) {
  if (ne0 % ggml_block_size(type) == 0) return type;
  GgmlType fallback = GgmlType::kF16;
  if (type == GgmlType::kQ4_K) fallback = GgmlType::kQ5_0;
  else if (type == GgmlType::kQ5_K) fallback = GgmlType::kQ5_1;
  else if (type == GgmlType::kQ6_K) fallback = GgmlType::kQ8_0;
  return ne0 % ggml_block_size(fallback) == 0 ? fallback : GgmlType::kF16;
}

}  // namespace

std::string quant_mix_name(QuantMix mix) {
  switch (mix) {
    case QuantMix::kF32: return "f32";
    case QuantMix::kF16: return "f16";
    case QuantMix::kQ8_0: return "q8_0";
    case QuantMix::kQ6_K: return "q6_k";
    case QuantMix::kQ5_K_M: return "q5_k_m";
    case QuantMix::kQ4_K_M: return "q4_k_m";
  }
  BRIGADE_ASSERT(false, "unknown QuantMix");
}

std::optional<QuantMix> quant_mix_from_name(const std::string& name) {
  for (QuantMix mix : {QuantMix::kF32, QuantMix::kF16, QuantMix::kQ8_0, QuantMix::kQ6_K, QuantMix::kQ5_K_M,
                       QuantMix::kQ4_K_M}) {
    if (quant_mix_name(mix) == name) return mix;
  }
  return std::nullopt;
}

uint32_t quant_mix_file_type(QuantMix mix) {
  switch (mix) {
    case QuantMix::kF32: return 0;      // LLAMA_FTYPE_ALL_F32
    case QuantMix::kF16: return 1;      // LLAMA_FTYPE_MOSTLY_F16
    case QuantMix::kQ8_0: return 7;     // LLAMA_FTYPE_MOSTLY_Q8_0
    case QuantMix::kQ6_K: return 18;    // LLAMA_FTYPE_MOSTLY_Q6_K
    case QuantMix::kQ5_K_M: return 17;  // LLAMA_FTYPE_MOSTLY_Q5_K_M
    case QuantMix::kQ4_K_M: return 15;  // LLAMA_FTYPE_MOSTLY_Q4_K_M
  }
  BRIGADE_ASSERT(false, "unknown QuantMix");
}

GgmlType mix_tensor_type(QuantMix mix, const std::string& name, std::span<const int64_t> ne, const MixModel& model) {
  BRIGADE_CHECK(!ne.empty(), "GGUF mix: tensor '", name, "' has no dims");
  const std::optional<int64_t> layer = layer_of(name, model);
  if (!quantizable(name, ne)) return GgmlType::kF32;
  const GgmlType base = mix_type(mix);
  if (base == GgmlType::kF32 || base == GgmlType::kF16) return base;

  const bool medium = mix == QuantMix::kQ4_K_M || mix == QuantMix::kQ5_K_M;
  const bool eight_experts = model.n_experts == 8;
  const bool more_bits = layer.has_value() && more_bits_layer(*layer, model.n_layers);
  GgmlType type = base;
  if (name == "output.weight" || (!model.has_output && name == "token_embd.weight")) {
    // The output head (also the tied embedding) is kept at 6 bits or more.
    if (ne[0] % ggml_block_size(base) != 0) type = GgmlType::kQ8_0;
    else if (base != GgmlType::kQ8_0) type = GgmlType::kQ6_K;
  } else if (name == "token_embd.weight") {
    // An untied embedding stays at the mix's type.
  } else if (contains(name, "attn_qkv.weight") || contains(name, "attn_kv_b.weight") ||
             contains(name, "attn_v.weight")) {
    if (medium && more_bits) type = GgmlType::kQ6_K;
    // llama.cpp's LLM_TYPE_70B: its attn_v is small next to attn_q, so a bit more is cheap.
    const bool type_70b = model.n_layers == 80 && (model.architecture == "qwen2" ||
                                                   (model.architecture == "llama" && model.n_heads != model.n_kv_heads));
    if (type_70b && type == GgmlType::kQ4_K) type = GgmlType::kQ5_K;
    if (eight_experts) type = GgmlType::kQ8_0;
  } else if (contains(name, "attn_k.weight")) {
    if (eight_experts) type = GgmlType::kQ8_0;
  } else if (contains(name, "attn_q.weight")) {
    // No rule for these mixes; matched here so that no later rule applies.
  } else if (contains(name, "attn_output.weight")) {
    if (eight_experts && mix == QuantMix::kQ4_K_M) type = GgmlType::kQ5_K;
  } else if (!contains(name, "ffn_up") && !contains(name, "ffn_gate") && contains(name, "ffn_down")) {
    if (medium && more_bits) type = GgmlType::kQ6_K;
  }
  return shape_fallback(type, ne[0]);
}

}  // namespace brigade::model::gguf
