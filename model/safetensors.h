// safetensors files (Hugging Face's weight format), single or sharded. The byte
// layout and the header checks are in model/safetensors_format.h.
//
// Reading memory-maps the file: tensors alias its pages (private copy-on-write, so
// writing to them never touches the file) and are read from disk on first use;
// a tensor whose offset is not aligned to its element size is copied instead.
// dtypes: F64/F32/F16/BF16/F8_E4M3/F8_E5M2/I64/I32/I16/I8/U64/U32/U16/U8/BOOL.
//
// Sharded checkpoints (Hugging Face's layout): model-00001-of-00003.safetensors ...
// plus model.safetensors.index.json {"metadata": {"total_size": BYTES},
// "weight_map": {NAME: FILE}}.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

namespace brigade::model {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

struct SafetensorsFile {
  std::map<std::string, torch::Tensor> tensors;  // CPU, aliasing the mapped file
  std::map<std::string, std::string> metadata;
};

// Writes `tensors` (CPU; any dtype listed above) with `metadata`. Not atomic by
// itself: callers write into a temporary directory.
void save_safetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Reads and validates a file; any inconsistency is an Error naming the file.
SafetensorsFile load_safetensors(const std::filesystem::path& path);

// Writes `tensors` into `dir` as Hugging Face does: one model.safetensors when the
// total is at most `max_shard_bytes`, else model-0000i-of-0000n.safetensors files of
// at most that size each (a larger tensor gets a file of its own) plus
// model.safetensors.index.json. Returns the files written.
std::vector<std::filesystem::path> save_safetensors_sharded(const std::filesystem::path& dir, const NamedTensors& tensors,
                                                            uint64_t max_shard_bytes,
                                                            const std::map<std::string, std::string>& metadata = {});

// Reads a directory's weights: model.safetensors.index.json when present (every
// file it names must hold exactly the tensors mapped to it), else model.safetensors.
// A tensor name found in two files is an Error.
SafetensorsFile load_safetensors_dir(const std::filesystem::path& dir);

}  // namespace brigade::model
