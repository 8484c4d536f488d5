// Reading a GGUF model back into brigade (`model.init_from: FILE.gguf`): the
// architectures brigade exports (llama, qwen2, qwen3, qwen3moe, deepseek2), their
// metadata mapped to TransformerOptions (RoPE scaling none, linear or yarn) and their
// tensors (dequantized to float32, llama's q/k rows un-permuted to the Hugging Face
// RoPE layout, qwen3moe's gate/up experts fused, deepseek2's attn_k_b / attn_v_b
// joined into kv_b_proj and its interleaved rope rows back to rotate-half) copied
// into a model. The inverse of model/gguf_export.h.
#pragma once

#include "data/bpe.h"
#include "data/spm.h"

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "model/hf.h"
#include "model/transformer.h"

namespace brigade::model {

struct GgufModelInfo {
  HfFamily family = HfFamily::kLlama;
  TransformerOptions options;
  // The file's vocabulary is brigade's byte tokenizer (256 byte tokens, then <|bos|>,
  // <|eos|>, <|pad|>, <|im_start|>, <|im_end|>, no merges): "byte" serves it.
  bool byte_vocabulary = false;
};

// The architecture in a GGUF file's metadata; an unknown architecture, a missing key
// or a feature brigade lacks (llama3 RoPE scaling, per-layer head counts) is an Error naming
// the file and the key.
GgufModelInfo read_gguf_model_info(const std::filesystem::path& path);

// Copies the file's tensors into `model` (built from read_gguf_model_info's options).
// Missing, unexpected or misshapen tensors are Errors naming the file and tensor; the
// model is untouched then. Quantized tensors are dequantized: a q8_0 file gives the
// q8_0-rounded weights.
void load_gguf_weights(TransformerImpl& model, const std::filesystem::path& path);

// The vocabulary a GGUF file carries, rebuilt as a tokenizer: tokenizer.ggml.model
// "gpt2" (byte-level BPE: tokens, merges, token types) with any tokenizer.ggml.pre of
// gguf_pre_tokenizer_names() (gpt-2, llama-bpe, qwen2, deepseek-llm, deepseek-v3,
// smollm, tekken, ...), split by the regexes llama.cpp applies for each ("default":
// the GPT-2 split); control tokens (type 3) become special added
// tokens, user-defined ones (4) added tokens; bos/eos/padding ids give the roles. Any
// other tokenizer model (SentencePiece "llama", ...) or pre-tokenizer is an Error
// naming the file, the key and what is supported.
data::BpeTokenizer read_gguf_tokenizer(const std::filesystem::path& path);

// A SentencePiece vocabulary (tokenizer.ggml.model "llama": tokens, scores, token
// types, add_space_prefix, role ids), tokenized as llama.cpp does (data/spm.h).
data::SpmTokenizer read_gguf_spm_tokenizer(const std::filesystem::path& path);
// Whichever of the two the file carries ("gpt2" or "llama"); other models are an
// Error naming the key.
std::unique_ptr<data::Tokenizer> read_gguf_vocabulary(const std::filesystem::path& path);

// A tokenizer.ggml.pre name's split regexes, applied in turn before the byte-level
// step (empty: GPT-2's split inside ByteLevel), and whether a word found whole in
// the vocabulary skips the merges. nullptr for a name brigade does not implement.
struct PreTokenizerSplits {
  std::vector<std::string> regexes;
  bool ignore_merges = false;
};
const PreTokenizerSplits* gguf_pre_tokenizer(const std::string& name);
// Every implemented name, comma-separated (for error messages).
std::string gguf_pre_tokenizer_names();

}  // namespace brigade::model
