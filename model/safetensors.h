// safetensors files (Hugging Face's weight format):
//
//   8 bytes   N, little-endian uint64: length of the JSON header
//   N bytes   JSON: {"__metadata__": {str: str}, NAME: {"dtype": "F32", "shape": [..],
//             "data_offsets": [begin, end]}, ...}; offsets relative to the data area
//   ...       data area: raw little-endian tensor bytes
//
// The reader checks every field: header length within the file, valid JSON, known
// dtypes, offsets in bounds, non-overlapping, and byte counts matching the shapes.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

namespace brigade::model {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

struct SafetensorsFile {
  std::map<std::string, torch::Tensor> tensors;  // owned copies, CPU
  std::map<std::string, std::string> metadata;
};

// Writes `tensors` (any CPU dtype among F64/F32/F16/BF16/I64/I32/I16/I8/U8/BOOL) with
// `metadata`. Not atomic by itself: callers write into a temporary directory.
void save_safetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Reads and validates a file; any inconsistency is an Error naming the file.
SafetensorsFile load_safetensors(const std::filesystem::path& path);

}  // namespace brigade::model
