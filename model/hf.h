// Hugging Face checkpoints: config.json <-> TransformerOptions for the llama, qwen2,
// qwen3, qwen3_moe, deepseek_v2 and deepseek_v3 families (rope_parameters with
// default, linear, llama3 or yarn scaling), weight names ("model.layers.3.self_attn.q_proj.weight" <->
// brigade's "layers.3.self_attn.q_proj.weight"), tied embeddings, and sharded
// safetensors (model.safetensors.index.json).
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <string>

#include "model/transformer.h"

namespace brigade::model {

// A Hugging Face model family brigade reads and writes.
enum class HfFamily { kLlama, kQwen2, kQwen3, kQwen3Moe, kDeepseekV2, kDeepseekV3 };

// config.json's model_type: "llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v2", "deepseek_v3".
std::string family_name(HfFamily family);

// The family whose architecture these options describe: q/k norm -> qwen3, QKV bias
// -> qwen2, else llama; MoE layers -> qwen3_moe when they route like it (softmax
// scores, no shared experts, no groups, no scaling, q/k norm), else an Error saying
// which setting has no Hugging Face equivalent. Multi-head latent attention ->
// deepseek_v3 (dense, or sigmoid routing with top-2-sum groups and normalised
// weights) or deepseek_v2 (softmax routing, max groups, no normalisation).
HfFamily family_of(const TransformerOptions& options);

struct HfConfig {
  HfFamily family = HfFamily::kLlama;
  TransformerOptions options;
  std::string torch_dtype = "float32";
  int64_t bos_token_id = -1;  // -1: not set
  int64_t eos_token_id = -1;
  // deepseek_v3's multi-token prediction modules in the checkpoint (num_nextn_predict_layers;
  // model.layers.N... for N >= layers); options.mtp.depth starts equal to it.
  int64_t mtp_layers = 0;
  // DeepSeek: the checkpoint's rotary rows are interleaved (see load_hf_weights).
  bool rope_interleaved = false;
};

// Parses config.json; unknown model_type or architecture features brigade does not
// have (rope_scaling, sliding windows, MoE) are Errors naming the file and field.
HfConfig read_hf_config(const std::filesystem::path& config_json);
// config.json text for `config` (architectures, model_type, sizes, rope, dtype).
std::string hf_config_text(const HfConfig& config);
// The Hugging Face config describing a brigade model (family from family_of()).
HfConfig hf_config_for(const TransformerOptions& options);

// The model's weights under Hugging Face names ("model.layers.0...", "lm_head.weight"
// unless tied), aliasing the model's tensors; fused MoE experts appear one expert at
// a time as the Hub stores them (model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight).
// deepseek_v3 MTP module k is layer num_hidden_layers + k as DeepSeek lays it out
// (enorm, hnorm, eh_proj, shared_head.norm, the block's tensors, and aliases of the
// shared embed_tokens and shared_head.head); other families leave MTP modules out.
NamedTensors hf_state_dict(const TransformerImpl& model);

// Copies a Hugging Face checkpoint directory's weights (model.safetensors or a
// sharded index) into `model`, converting dtypes; experts may be stored one by one
// or fused (gate_up_proj / down_proj). Missing, unexpected or misshapen
// tensors are Errors naming the file and tensor; the model is untouched then. A tied
// model ignores an lm_head.weight the file may carry; rotary inv_freq buffers are skipped.
// MTP modules: the first options.mtp.depth the file has are loaded (their embedding and
// head copies must equal the main ones), the file's further ones are left out, and
// modules the file lacks keep their initialisation. An fp8 quantization_config
// (DeepSeek's released checkpoints: F8_E4M3 weights with a weight_scale_inv per
// 128x128 block) is dequantized to float32; a scale whose shape disagrees with its
// weight is an Error naming both.
// DeepSeek's rotary rows are stored interleaved (pairs 2i, 2i+1; deepseek_v2 always,
// deepseek_v3 unless rope_interleave is false) and are permuted into brigade's
// rotate-half order; save_hf_checkpoint permutes them back and writes rope_interleave.
void load_hf_weights(TransformerImpl& model, const std::filesystem::path& dir);

// A block-scaled FP8 weight as DeepSeek releases it: `weight` [out, in] (F8_E4M3)
// times `scale_inv` [ceil(out/b0), ceil(in/b1)], one float32 scale per b0 x b1 block,
// as float32. (An FP8 blockwise recipe quantizing the result with 128x128 blocks gets
// the checkpoint's codes back: tests/model/hf_test.cpp.)
torch::Tensor dequantize_block_scaled(const torch::Tensor& weight, const torch::Tensor& scale_inv,
                                      std::array<int64_t, 2> block);

// DeepSeek's rotary layout for a multi-head latent attention projection (brigade or
// Hugging Face name ending in self_attn.q_proj / q_b_proj / kv_a_proj_with_mqa
// .weight): the rope rows of each query head and of the shared rope key converted
// between rotate-half order (brigade's) and interleaved pairs (DeepSeek's
// checkpoints, llama.cpp's deepseek2). Other tensors come back unchanged.
torch::Tensor convert_rope_rows(const std::string& name, const torch::Tensor& tensor, const TransformerOptions& options,
                                bool to_interleaved);

// Writes config.json and the weights (`dtype`: float32, bfloat16 or float16;
// sharded above `max_shard_bytes`) into `dir`, which must exist. Tokenizer files are
// the caller's.
// bos/eos ids (-1: unset) go into config.json.
void save_hf_checkpoint(const TransformerImpl& model, const std::filesystem::path& dir, const std::string& dtype,
                        uint64_t max_shard_bytes, int64_t bos_token_id = -1, int64_t eos_token_id = -1);

}  // namespace brigade::model
