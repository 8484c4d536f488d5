// GGUF, llama.cpp's single-file model format (version 3), at the byte level: the
// parser, the serializer and the ggml block quantizations. Standard library only
// (plus core/error.h), so the parser builds as a fuzz target; model/gguf.h puts
// torch tensors, a memory-mapped reader and the model export on top.
//
// Layout (all integers little-endian):
//
//   4 bytes   magic "GGUF"
//   uint32    version (3; 2 is read too: same layout)
//   uint64    tensor_count
//   uint64    metadata_kv_count
//   metadata  kv_count times: string key, uint32 value type, value
//   tensors   tensor_count times: string name, uint32 n_dims (<= 4),
//             int64 ne[n_dims] (innermost first: the reverse of torch's shape),
//             uint32 ggml type, uint64 offset (relative to the data section,
//             a multiple of the alignment)
//   padding   zeros up to a multiple of `general.alignment` (uint32 metadata, default 32)
//   data      the tensors' bytes, each padded to the alignment
//
//   string  = uint64 length + that many bytes (UTF-8, no terminator)
//   value   = by type id: 0 uint8, 1 int8, 2 uint16, 3 int16, 4 uint32, 5 int32,
//             6 float32, 7 bool (one byte, 0 or 1), 8 string,
//             9 array (uint32 element type, uint64 count, elements; arrays of
//             arrays are rejected, as ggml does), 10 uint64, 11 int64, 12 float64
//
// Tensor data types (ggml type ids) brigade reads and writes:
//   0 F32, 1 F16, 30 BF16;
//   8 Q8_0: blocks of 32 values: fp16 scale d = amax / 127, then 32 int8 q = round(x / d)
//           (34 bytes);
//   2 Q4_0: blocks of 32: fp16 d = m / -8 where m is the value of largest magnitude,
//           then 16 bytes of 4-bit q = min(15, trunc(x / d + 8.5)), the low nibbles
//           holding elements 0..15 and the high nibbles 16..31 (18 bytes); x = (q - 8) d;
//   12 Q4_K, 13 Q5_K, 14 Q6_K: super-blocks of 256 with searched per-sub-block scales
//           (and mins), and 6 Q5_0, 7 Q5_1 (llama.cpp's fallbacks for rows that do not
//           fill whole super-blocks): written as ggml's reference quantizers write them
//           without an importance matrix (model/gguf_kquants.cpp documents the layouts).
// A quantized tensor's innermost dimension ne[0] is a multiple of its block size (32,
// or 256 for the K-quants).
//
// The parser validates every field against the remaining bytes before allocating,
// so a corrupt or hostile file gives a brigade::Error naming the file and the
// field, never a crash or a huge allocation.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace brigade::model::gguf {

inline constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian uint32
inline constexpr uint32_t kVersion = 3;
inline constexpr uint64_t kDefaultAlignment = 32;
inline constexpr int kMaxDims = 4;
inline constexpr int64_t kBlockSize = 32;        // values per Q8_0 / Q4_0 block (and the other legacy ones)
inline constexpr int64_t kSuperBlockSize = 256;  // values per K-quant (and IQ4_XS) super-block

// Metadata value types (the type ids above).
enum class ValueType : uint32_t {
  kUint8 = 0, kInt8 = 1, kUint16 = 2, kInt16 = 3, kUint32 = 4, kInt32 = 5, kFloat32 = 6,
  kBool = 7, kString = 8, kArray = 9, kUint64 = 10, kInt64 = 11, kFloat64 = 12,
};
std::string value_type_name(ValueType type);

// ggml tensor types brigade handles.
// The legacy blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) and the K-quant
// super-blocks of 256 (Q2_K..Q6_K, IQ4_XS) are read, dequantized as gguf-py's
// gguf.quants.dequantize does, bit for bit (model/gguf_quants.cpp); F32, F16, BF16,
// Q8_0, Q4_0, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K are also written (model/gguf_mix.h picks
// among them per tensor as llama.cpp's quantizer does).
enum class GgmlType : uint32_t {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8,
  kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kIQ4_NL = 20, kIQ4_XS = 23, kBF16 = 30
};
std::string ggml_type_name(GgmlType type);  // "F32", "Q8_0", ...
std::optional<GgmlType> ggml_type_from_id(uint32_t id);
int64_t ggml_block_size(GgmlType type);   // values per block (1 for float types)
int64_t ggml_block_bytes(GgmlType type);  // bytes per block
// Bytes of `count` values (a multiple of the block size), or nullopt on overflow or a
// partial block.
std::optional<uint64_t> ggml_nbytes(GgmlType type, int64_t count);

// One scalar metadata value; the alternative order follows the type ids with the
// array id (9) left out.
using Scalar = std::variant<uint8_t, int8_t, uint16_t, int16_t, uint32_t, int32_t, float, bool,
                            std::string, uint64_t, int64_t, double>;
ValueType scalar_type(const Scalar& value);

// A metadata value: a scalar, or an array of scalars of one type.
struct Value {
  ValueType type = ValueType::kUint8;           // kArray for arrays
  Scalar scalar;                                // when type != kArray
  ValueType element_type = ValueType::kUint8;   // when type == kArray
  std::vector<Scalar> elements;                 // when type == kArray, each of element_type

  Value() = default;
  Value(Scalar s) : type(scalar_type(s)), scalar(std::move(s)) {}  // NOLINT: implicit on purpose
  static Value array(ValueType element_type, std::vector<Scalar> elements);
  static Value strings(const std::vector<std::string>& items);

  // Typed reads; a mismatching type is an Error naming `key`.
  int64_t as_int(const std::string& key) const;     // any integer type (uint64 above INT64_MAX: Error)
  double as_float(const std::string& key) const;    // float32/float64 or an integer
  bool as_bool(const std::string& key) const;
  const std::string& as_string(const std::string& key) const;
  std::vector<std::string> as_strings(const std::string& key) const;  // array of strings
  std::vector<int64_t> as_ints(const std::string& key) const;         // array of integers
};

struct TensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // innermost first (ggml order); torch's shape is the reverse
  GgmlType type = GgmlType::kF32;
  uint64_t offset = 0;      // from the start of the data section
  uint64_t nbytes = 0;      // derived from ne and type
  int64_t numel() const;
  std::vector<int64_t> shape() const;  // torch order (outermost first)
};

struct File {
  uint32_t version = kVersion;
  std::vector<std::pair<std::string, Value>> metadata;  // in file order, keys unique
  std::vector<TensorInfo> tensors;                      // in file order, names unique
  uint64_t alignment = kDefaultAlignment;
  uint64_t data_offset = 0;                             // absolute start of the data section

  const Value* find(const std::string& key) const;
  const TensorInfo* find_tensor(const std::string& name) const;
};

// Parses and validates the header of a whole GGUF file held in `bytes` (tensor data
// stays where it is: data_offset + offset). `where` names the file in errors
// ("GGUF file /x/y.gguf").
File parse_gguf(std::span<const uint8_t> bytes, const std::string& where);

// A tensor ready to serialize: its ggml dims and already-encoded bytes.
struct EncodedTensor {
  std::string name;
  std::vector<int64_t> ne;  // innermost first
  GgmlType type = GgmlType::kF32;
  std::vector<uint8_t> data;  // exactly ggml_nbytes(type, numel) bytes
};

// The header up to the start of the data section (padding included): metadata
// (general.alignment taken from `metadata` when present, else 32) and the infos of
// `tensors`, whose offsets are assigned here (each tensor's data padded to the
// alignment, in order). Returns the bytes; `alignment` receives the alignment used.
std::vector<uint8_t> serialize_header(const std::vector<std::pair<std::string, Value>>& metadata,
                                      std::vector<TensorInfo>& tensors, uint64_t& alignment);

// The whole file: serialize_header, then each tensor's bytes padded to the alignment.
std::vector<uint8_t> serialize_gguf(const std::vector<std::pair<std::string, Value>>& metadata,
                                    const std::vector<EncodedTensor>& tensors);
// The info (ne, type, byte count) of an encoded tensor; checks the byte count.
TensorInfo info_of(const EncodedTensor& tensor);

// fp16 / bf16 conversions, round to nearest even (as numpy, torch and ggml's F16C path).
uint16_t fp32_to_fp16(float x);
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_bf16(float x);
float bf16_to_fp32(uint16_t h);
// One block of a quantized type other than Q8_0 / Q4_0: ggml_block_bytes(type) bytes in,
// ggml_block_size(type) floats out, exactly as gguf-py's dequantize_blocks computes
// them (float32 products and sums in its order).
void dequantize_block(GgmlType type, const uint8_t* block, float* out);

// One block of Q4_K, Q5_K, Q6_K (256 values), Q5_0 or Q5_1 (32 values):
// ggml_block_size(type) floats in, ggml_block_bytes(type) bytes out, byte for byte as
// ggml's reference quantizers without an importance matrix (model/gguf_kquants.cpp).
void quantize_block(GgmlType type, const float* values, uint8_t* block);

// Encodes `values` (a whole number of rows of ne[0] values; quantized types need a
// multiple of their block size) as `type`, bit for bit as ggml's reference quantizers.
std::vector<uint8_t> encode(GgmlType type, std::span<const float> values);
// Decodes `bytes` (`count` values of `type`) into `out` (count floats).
void decode(GgmlType type, std::span<const uint8_t> bytes, std::span<float> out);

}  // namespace brigade::model::gguf
