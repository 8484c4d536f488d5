// Exports a brigade Transformer as a GGUF file that llama.cpp (llama-cli,
// llama-server, llama-cpp-python) and Ollama run: architecture "llama", "qwen2" or
// "qwen3" for dense models, "qwen3moe" for Qwen3-MoE-style ones; the hyperparameters,
// the byte-level BPE vocabulary, and the weights under llama.cpp's tensor names
// (docs/formats.md, "GGUF", lists them).
//
// llama.cpp applies RoPE to "llama" models in the interleaved (GPT-J) layout while
// brigade (like Hugging Face) rotates halves (NeoX layout), so the rows of q_proj and
// k_proj are permuted per head for that architecture, exactly as llama.cpp's
// convert_hf_to_gguf.py does; qwen2/qwen3 use the NeoX layout and are written as is.
#pragma once

#include <filesystem>
#include <string>

#include "data/bpe.h"
#include "model/gguf.h"
#include "model/hf.h"
#include "model/transformer.h"

namespace brigade::model {

// Writes `model` to `out` as GGUF. `family` must match the model's features (q/k
// norm: qwen3, QKV bias: qwen2, neither: llama; MoE: qwen3_moe). The tokenizer's
// vocabulary may be smaller than the model's embedding (padded with unused
// "[PAD<id>]" tokens), not larger. An MoE model must be what llama.cpp's qwen3moe
// computes, else an Error naming the setting: Qwen3 attention, softmax routing with
// normalize_topk, no shared experts, groups, scaling or dense first layers, and an
// all-zero selection bias.
void export_gguf(const Transformer& model, HfFamily family, const data::Tokenizer& tokenizer,
                 GgufQuant quant, const std::filesystem::path& out, const std::string& model_name);

// The GGUF tensor name of a brigade state_dict() name ("layers.3.self_attn.q_proj.weight"
// -> "blk.3.attn_q.weight"); an unknown name is an Error. The fused experts'
// gate_up_proj is an Error too: it becomes two tensors, ffn_gate_exps and ffn_up_exps.
std::string gguf_tensor_name(const std::string& brigade_name);

// The interleaved-RoPE row order llama.cpp expects for a "llama" q_proj / k_proj
// weight [heads * head_dim, d_model] (or bias [heads * head_dim]): within each head,
// rows (i, i + head_dim/2) become neighbours (2i, 2i + 1). `inverse` undoes it (GGUF
// import).
torch::Tensor permute_for_interleaved_rope(const torch::Tensor& weight, int64_t heads, bool inverse = false);

}  // namespace brigade::model
