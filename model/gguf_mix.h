// The per-tensor storage types of llama.cpp's quantization mixes ("Q4_K_M" and
// friends), as llama.cpp's quantizer (llama_model_quantize, src/llama-quant.cpp:
// tensor_allows_quantization, llama_tensor_get_type_impl, tensor_type_fallback)
// chooses them for a file converted from F32 without an importance matrix, so a file
// brigade writes with a mix has the same tensor types as llama-quantize's output for
// that mix. Standard library only (plus core/error.h).
//
// Rules followed, in llama.cpp's order:
//   kept as they are (F32): tensors of fewer than 2 dims (trailing 1s not counted,
//     as ggml_n_dims), names not ending in "weight" (biases), "_norm.weight" (every
//     norm), the MoE router "ffn_gate_inp.weight";
//   f32 / f16: every other tensor F32 / F16; nothing below applies;
//   output.weight, and token_embd.weight when there is no output.weight (tied
//     embeddings): Q6_K for the K-quant mixes, Q8_0 for q8_0, and Q8_0 when ne[0] is
//     not a multiple of the mix's block size;
//   attn_v.weight (and the fused attn_qkv / attn_kv_b, which llama.cpp counts with
//     it): Q6_K under q4_k_m and q5_k_m in the "use_more_bits" layers i (i < n/8, or
//     i >= 7n/8, or (i - n/8) % 3 == 2, n layers); a Q4_K result becomes Q5_K in a
//     model llama.cpp types as 70B (80 layers: "qwen2", or "llama" with fewer KV heads
//     than heads); Q8_0 whenever the model has exactly 8 experts;
//   attn_k.weight: Q8_0 with exactly 8 experts;
//   ffn_down (dense, _exps and _shexp): Q6_K in the use_more_bits layers under q4_k_m
//     and q5_k_m;
//   attn_output.weight: Q5_K under q4_k_m with exactly 8 experts;
//   everything else: the mix's type (Q4_K, Q5_K, Q6_K, Q8_0);
//   then the shape fallback when ne[0] is not a multiple of the type's block: Q4_K ->
//     Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 if ne[0] is not a multiple of 32
//     either.
// The layer i is the one in the name (blk.<i>.); llama.cpp counts attn_v and ffn_down
// tensors in file order sorted by layer, which gives the same i when each layer has
// one (MoE layers: llama.cpp parses the name too).
//
// Rules not followed (brigade writes none of these cases): the Falcon architecture's
// own ffn_down / output choices; user overrides (--output-tensor-type,
// --token-embedding-type, --tensor-type, --pure, --leave-output-tensor); the
// importance-matrix variants; the mixes other than those below (their IQ, Q2_K, Q3_K,
// *_K_S, *_K_L and MXFP4 rules). One deliberate difference: where llama.cpp refuses a
// tensor (a Q8_0 tensor whose ne[0] is not a multiple of 32), F16 is returned, as
// brigade's q8_0 export has always stored such tensors.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include "model/gguf_format.h"

namespace brigade::model::gguf {

// A llama.cpp quantization mix ("file type").
enum class QuantMix { kF32, kF16, kQ8_0, kQ6_K, kQ5_K_M, kQ4_K_M };

std::string quant_mix_name(QuantMix mix);  // "f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"
std::optional<QuantMix> quant_mix_from_name(const std::string& name);  // the names above
// llama.cpp's llama_ftype, stored as general.file_type: 0, 1, 7, 18, 17, 15.
uint32_t quant_mix_file_type(QuantMix mix);

// What the choice needs to know about the whole model.
struct MixModel {
  std::string architecture;  // general.architecture ("llama", "qwen3moe", ...)
  int64_t n_layers = 0;      // blocks blk.0 .. blk.<n_layers - 1>
  int64_t n_heads = 0;       // attention heads
  int64_t n_kv_heads = 0;    // key/value heads
  int64_t n_experts = 0;     // routed experts per MoE layer (0: dense)
  bool has_output = true;    // a separate output.weight (false: tied to token_embd)
};

// The type llama.cpp's quantizer stores tensor `name` (a GGUF tensor name such as
// "blk.3.attn_v.weight") of dims `ne` (innermost first) in, converting an F32 file to
// `mix`. A block tensor whose layer is outside [0, n_layers) is an Error.
GgmlType mix_tensor_type(QuantMix mix, const std::string& name, std::span<const int64_t> ne, const MixModel& model);

}  // namespace brigade::model::gguf
