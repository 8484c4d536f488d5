// GGUF files (llama.cpp's format) with torch tensors: a writer, a memory-mapped
// reader that hands out tensors as float32 (dequantized), and the quantization
// choices of a model export. The byte layout, the metadata value types and the
// block quantizations are documented in model/gguf_format.h; exporting a brigade
// Transformer for llama.cpp / Ollama is model/gguf_export.h.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "core/fs.h"
#include "model/gguf_format.h"

namespace brigade::model {

// Builds a GGUF file in memory (tensors are encoded as they are added) and writes it.
class GgufWriter {
 public:
  // Sets a metadata value (replacing an earlier value of the same key); keys are
  // written in the order first set.
  void set(const std::string& key, gguf::Value value);
  // Adds `tensor` (CPU, any floating dtype, torch shape: outermost first) stored as
  // `type`. Quantized types need a last dimension that is a multiple of 32.
  void add_tensor(const std::string& name, const torch::Tensor& tensor, gguf::GgmlType type);
  // Writes `path` (through `path.tmp` and a rename: never a torn file).
  void write(const std::filesystem::path& path) const;

 private:
  std::vector<std::pair<std::string, gguf::Value>> metadata_;
  std::vector<gguf::EncodedTensor> tensors_;
};

// A GGUF file, memory-mapped and validated when opened; any inconsistency is an
// Error naming the file.
class GgufReader {
 public:
  explicit GgufReader(const std::filesystem::path& path);
  ~GgufReader();
  GgufReader(const GgufReader&) = delete;
  GgufReader& operator=(const GgufReader&) = delete;

  const gguf::File& file() const { return file_; }
  bool has(const std::string& key) const { return file_.find(key) != nullptr; }
  // A metadata value; a missing key is an Error naming the file.
  const gguf::Value& metadata(const std::string& key) const;
  // A tensor's info; a missing tensor is an Error naming the file.
  const gguf::TensorInfo& info(const std::string& name) const;
  // The tensor as float32 in torch order (shape reversed from ne), dequantized; an
  // owned copy.
  torch::Tensor tensor(const std::string& name) const;
  // The tensor's bytes as stored (valid while the reader lives).
  std::span<const uint8_t> raw(const std::string& name) const;

 private:
  std::filesystem::path path_;
  std::string where_;
  MappedFile mapped_;
  gguf::File file_;
};

// How an exported model stores its 2-D weights (1-D norms and biases stay F32; a
// weight whose rows are not a multiple of 32 long falls back to F16 for q8_0 / q4_0).
// The K-quant mixes choose each tensor's type as llama.cpp's quantizer does for that
// mix (model/gguf_mix.h): q6_k, q5_k_m, q4_k_m.
enum class GgufQuant { kF32, kF16, kQ8_0, kQ4_0, kQ6_K, kQ5_K_M, kQ4_K_M };
// "f32", "f16", "q8_0", "q4_0", "q6_k", "q5_k_m", "q4_k_m"; anything else is an Error
// listing the choices.
GgufQuant parse_gguf_quant(const std::string& name);
std::string gguf_quant_name(GgufQuant quant);

}  // namespace brigade::model
