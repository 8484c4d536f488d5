// The safetensors header parser on its own, free of LibTorch so a fuzzer can drive
// it (tests/fuzz/). model/safetensors.h builds tensors on top of it.
//
//   8 bytes   N, little-endian uint64: length of the JSON header (at most 100 MB)
//   N bytes   JSON object: {"__metadata__": {str: str}, NAME: {"dtype": "F32",
//             "shape": [..], "data_offsets": [begin, end]}, ...}
//   ...       data area; offsets are relative to its start
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace brigade::model {

struct SafetensorsEntry {
  std::string name;
  std::string dtype;           // "F32", "BF16", "F8_E4M3", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range inside the data area
};

struct SafetensorsHeader {
  std::vector<SafetensorsEntry> tensors;  // in header order
  std::map<std::string, std::string> metadata;
  uint64_t data_begin = 0;                // file offset of the data area
};

// Bytes per element of a safetensors dtype name; 0 when brigade does not know it.
uint64_t safetensors_dtype_size(const std::string& dtype);

// Checks every field against the file's bytes: the header length fits, the JSON is an
// object, each tensor has a known dtype, a shape whose byte count does not overflow
// and equals its data_offsets range, ranges lie inside the data area and do not
// overlap, names are unique. Errors name `where` and the tensor or field.
SafetensorsHeader parse_safetensors_header(std::span<const uint8_t> file, const std::string& where);

}  // namespace brigade::model
