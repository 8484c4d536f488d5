#include "model/gguf_format.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>

#include "core/error.h"

namespace brigade::model::gguf {
namespace {

constexpr uint64_t kMaxAlignment = uint64_t{1} << 30;

// Reads little-endian fields from the file bytes; every read checks the bytes left.
class Cursor {
 public:
  Cursor(std::span<const uint8_t> bytes, const std::string& where) : bytes_(bytes), where_(where) {}

  uint64_t position() const { return pos_; }
  uint64_t remaining() const { return bytes_.size() - pos_; }

  template <typename T>
  T read(const std::string& field) {
    BRIGADE_CHECK(remaining() >= sizeof(T), where_, ": truncated at byte ", pos_, " reading ", field,
                  " (", sizeof(T), " bytes needed, ", remaining(), " left)");
    T value;
    std::memcpy(&value, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }

  std::string read_string(const std::string& field) {
    const uint64_t length = read<uint64_t>(field + " length");
    BRIGADE_CHECK(length <= remaining(), where_, ": ", field, " has length ", length, " but only ",
                  remaining(), " bytes are left in the file");
    std::string s(reinterpret_cast<const char*>(bytes_.data() + pos_), length);
    pos_ += length;
    return s;
  }

 private:
  std::span<const uint8_t> bytes_;
  const std::string& where_;
  uint64_t pos_ = 0;
};

// Fixed size of a scalar type's encoding; 0 for strings (8 + length) and arrays.
uint64_t fixed_size(ValueType type) {
  switch (type) {
    case ValueType::kUint8: case ValueType::kInt8: case ValueType::kBool: return 1;
    case ValueType::kUint16: case ValueType::kInt16: return 2;
    case ValueType::kUint32: case ValueType::kInt32: case ValueType::kFloat32: return 4;
    case ValueType::kUint64: case ValueType::kInt64: case ValueType::kFloat64: return 8;
    case ValueType::kString: case ValueType::kArray: return 0;
  }
  return 0;
}

bool valid_value_type(uint32_t id) { return id <= 12; }

Scalar read_scalar(Cursor& in, ValueType type, const std::string& field, const std::string& where) {
  switch (type) {
    case ValueType::kUint8: return in.read<uint8_t>(field);
    case ValueType::kInt8: return in.read<int8_t>(field);
    case ValueType::kUint16: return in.read<uint16_t>(field);
    case ValueType::kInt16: return in.read<int16_t>(field);
    case ValueType::kUint32: return in.read<uint32_t>(field);
    case ValueType::kInt32: return in.read<int32_t>(field);
    case ValueType::kFloat32: return in.read<float>(field);
    case ValueType::kBool: {
      const uint8_t b = in.read<uint8_t>(field);
      BRIGADE_CHECK(b <= 1, where, ": ", field, " is a bool with byte value ", int{b}, " (0 or 1 expected)");
      return b == 1;
    }
    case ValueType::kString: return in.read_string(field);
    case ValueType::kUint64: return in.read<uint64_t>(field);
    case ValueType::kInt64: return in.read<int64_t>(field);
    case ValueType::kFloat64: return in.read<double>(field);
    case ValueType::kArray: break;
  }
  BRIGADE_FAIL(where, ": ", field, " has a nested array (not supported by GGUF readers)");
}

Value read_value(Cursor& in, const std::string& key, const std::string& where) {
  const std::string field = "metadata '" + key + "'";
  const uint32_t type_id = in.read<uint32_t>(field + " value type");
  BRIGADE_CHECK(valid_value_type(type_id), where, ": ", field, " has unknown value type ", type_id);
  const auto type = static_cast<ValueType>(type_id);
  if (type != ValueType::kArray) return Value(read_scalar(in, type, field, where));

  const uint32_t element_id = in.read<uint32_t>(field + " array element type");
  BRIGADE_CHECK(valid_value_type(element_id), where, ": ", field, " has unknown array element type ",
                element_id);
  const auto element_type = static_cast<ValueType>(element_id);
  BRIGADE_CHECK(element_type != ValueType::kArray, where, ": ", field,
                " is an array of arrays (not supported by GGUF readers)");
  const uint64_t count = in.read<uint64_t>(field + " array length");
  // Each element takes at least its fixed size (a string at least its 8-byte length),
  // so the count is bounded by the bytes left before anything is allocated.
  const uint64_t min_size = element_type == ValueType::kString ? 8 : fixed_size(element_type);
  BRIGADE_CHECK(count <= in.remaining() / min_size, where, ": ", field, " has array length ", count,
                " but only ", in.remaining(), " bytes are left in the file");
  Value value;
  value.type = ValueType::kArray;
  value.element_type = element_type;
  value.elements.reserve(count);
  for (uint64_t i = 0; i < count; ++i) value.elements.push_back(read_scalar(in, element_type, field, where));
  return value;
}

template <typename T>
void put(std::vector<uint8_t>& out, T value) {
  const size_t at = out.size();
  out.resize(at + sizeof(T));
  std::memcpy(out.data() + at, &value, sizeof(T));
}

void put_string(std::vector<uint8_t>& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out.insert(out.end(), s.begin(), s.end());
}

void put_scalar(std::vector<uint8_t>& out, const Scalar& value) {
  std::visit(
      [&](const auto& v) {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, std::string>) {
          put_string(out, v);
        } else if constexpr (std::is_same_v<T, bool>) {
          put<uint8_t>(out, v ? 1 : 0);
        } else {
          put<T>(out, v);
        }
      },
      value);
}

uint64_t pad_to(uint64_t n, uint64_t alignment) { return (n + alignment - 1) / alignment * alignment; }

float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

// ggml's reference quantizers (quantize_row_q8_0_ref, quantize_row_q4_0_ref), one block.
void quantize_block_q8_0(const float* x, uint8_t* out) {
  float amax = 0.0f;
  for (int64_t j = 0; j < kBlockSize; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const uint16_t dh = fp32_to_fp16(d);
  std::memcpy(out, &dh, 2);
  for (int64_t j = 0; j < kBlockSize; ++j) {
    const float scaled = x[j] * id;
    out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::round(scaled)));  // half away from zero
  }
}

void quantize_block_q4_0(const float* x, uint8_t* out) {
  float amax = 0.0f;
  float max = 0.0f;  // the signed value of largest magnitude (first one on ties)
  for (int64_t j = 0; j < kBlockSize; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const uint16_t dh = fp32_to_fp16(d);
  std::memcpy(out, &dh, 2);
  auto nibble = [&](float v) {
    const float shifted = v * id + 8.5f;  // in [0.5, 16.5]: the cast truncates
    return static_cast<uint8_t>(std::min(15, static_cast<int>(shifted)));
  };
  for (int64_t j = 0; j < kBlockSize / 2; ++j) {
    out[2 + j] = static_cast<uint8_t>(nibble(x[j]) | (nibble(x[j + kBlockSize / 2]) << 4));
  }
}

}  // namespace

std::string value_type_name(ValueType type) {
  static const char* const kNames[] = {"uint8", "int8",   "uint16", "int16", "uint32", "int32", "float32",
                                       "bool",  "string", "array",  "uint64", "int64", "float64"};
  const auto id = static_cast<uint32_t>(type);
  return id <= 12 ? kNames[id] : "type " + std::to_string(id);
}

std::string ggml_type_name(GgmlType type) {
  switch (type) {
    case GgmlType::kF32: return "F32";
    case GgmlType::kF16: return "F16";
    case GgmlType::kQ4_0: return "Q4_0";
    case GgmlType::kQ4_1: return "Q4_1";
    case GgmlType::kQ5_0: return "Q5_0";
    case GgmlType::kQ5_1: return "Q5_1";
    case GgmlType::kQ8_0: return "Q8_0";
    case GgmlType::kQ2_K: return "Q2_K";
    case GgmlType::kQ3_K: return "Q3_K";
    case GgmlType::kQ4_K: return "Q4_K";
    case GgmlType::kQ5_K: return "Q5_K";
    case GgmlType::kQ6_K: return "Q6_K";
    case GgmlType::kIQ4_NL: return "IQ4_NL";
    case GgmlType::kIQ4_XS: return "IQ4_XS";
    case GgmlType::kBF16: return "BF16";
  }
  return "ggml type " + std::to_string(static_cast<uint32_t>(type));
}

std::optional<GgmlType> ggml_type_from_id(uint32_t id) {
  for (GgmlType t : {GgmlType::kF32, GgmlType::kF16, GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ5_0, GgmlType::kQ5_1,
                     GgmlType::kQ8_0, GgmlType::kQ2_K, GgmlType::kQ3_K, GgmlType::kQ4_K, GgmlType::kQ5_K,
                     GgmlType::kQ6_K, GgmlType::kIQ4_NL, GgmlType::kIQ4_XS, GgmlType::kBF16}) {
    if (static_cast<uint32_t>(t) == id) return t;
  }
  return std::nullopt;
}

int64_t ggml_block_size(GgmlType type) {
  switch (type) {
    case GgmlType::kF32: case GgmlType::kF16: case GgmlType::kBF16: return 1;
    case GgmlType::kQ4_0: case GgmlType::kQ4_1: case GgmlType::kQ5_0: case GgmlType::kQ5_1: case GgmlType::kQ8_0:
    case GgmlType::kIQ4_NL: return kBlockSize;
    case GgmlType::kQ2_K: case GgmlType::kQ3_K: case GgmlType::kQ4_K: case GgmlType::kQ5_K: case GgmlType::kQ6_K:
    case GgmlType::kIQ4_XS: return kSuperBlockSize;
  }
  return 1;
}

int64_t ggml_block_bytes(GgmlType type) {
  switch (type) {
    case GgmlType::kF32: return 4;
    case GgmlType::kF16: case GgmlType::kBF16: return 2;
    case GgmlType::kQ4_0: return 2 + kBlockSize / 2;
    case GgmlType::kQ4_1: return 4 + kBlockSize / 2;
    case GgmlType::kQ5_0: return 2 + 4 + kBlockSize / 2;
    case GgmlType::kQ5_1: return 4 + 4 + kBlockSize / 2;
    case GgmlType::kQ8_0: return 2 + kBlockSize;
    case GgmlType::kIQ4_NL: return 2 + kBlockSize / 2;
    case GgmlType::kQ2_K: return 16 + 64 + 4;
    case GgmlType::kQ3_K: return 32 + 64 + 12 + 2;
    case GgmlType::kQ4_K: return 4 + 12 + 128;
    case GgmlType::kQ5_K: return 4 + 12 + 32 + 128;
    case GgmlType::kQ6_K: return 128 + 64 + 16 + 2;
    case GgmlType::kIQ4_XS: return 2 + 2 + 4 + 128;
  }
  return 0;
}

std::optional<uint64_t> ggml_nbytes(GgmlType type, int64_t count) {
  if (count < 0 || count % ggml_block_size(type) != 0) return std::nullopt;
  const uint64_t blocks = static_cast<uint64_t>(count / ggml_block_size(type));
  const auto per_block = static_cast<uint64_t>(ggml_block_bytes(type));
  if (blocks > std::numeric_limits<uint64_t>::max() / per_block) return std::nullopt;
  return blocks * per_block;
}

ValueType scalar_type(const Scalar& value) {
  const auto index = static_cast<uint32_t>(value.index());
  return static_cast<ValueType>(index < 9 ? index : index + 1);  // the array id 9 is skipped
}

Value Value::array(ValueType element_type, std::vector<Scalar> elements) {
  BRIGADE_CHECK(element_type != ValueType::kArray, "GGUF: arrays of arrays are not supported");
  for (const auto& e : elements) {
    BRIGADE_CHECK(scalar_type(e) == element_type, "GGUF: array of ", value_type_name(element_type),
                  " holds a ", value_type_name(scalar_type(e)));
  }
  Value v;
  v.type = ValueType::kArray;
  v.element_type = element_type;
  v.elements = std::move(elements);
  return v;
}

Value Value::strings(const std::vector<std::string>& items) {
  return array(ValueType::kString, std::vector<Scalar>(items.begin(), items.end()));
}

namespace {
std::optional<int64_t> scalar_int(const Scalar& s) {
  return std::visit(
      [](const auto& v) -> std::optional<int64_t> {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, uint64_t>) {
          if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
          return static_cast<int64_t>(v);
        } else if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
          return static_cast<int64_t>(v);
        } else {
          return std::nullopt;
        }
      },
      s);
}
}  // namespace

int64_t Value::as_int(const std::string& key) const {
  std::optional<int64_t> v = type == ValueType::kArray ? std::nullopt : scalar_int(scalar);
  BRIGADE_CHECK(v.has_value(), "GGUF metadata '", key, "' is a ", value_type_name(type),
                ", not an integer in int64 range");
  return *v;
}

double Value::as_float(const std::string& key) const {
  if (type == ValueType::kFloat32) return std::get<float>(scalar);
  if (type == ValueType::kFloat64) return std::get<double>(scalar);
  if (type == ValueType::kUint64) return static_cast<double>(std::get<uint64_t>(scalar));
  return static_cast<double>(as_int(key));
}

bool Value::as_bool(const std::string& key) const {
  BRIGADE_CHECK(type == ValueType::kBool, "GGUF metadata '", key, "' is a ", value_type_name(type),
                ", not a bool");
  return std::get<bool>(scalar);
}

const std::string& Value::as_string(const std::string& key) const {
  BRIGADE_CHECK(type == ValueType::kString, "GGUF metadata '", key, "' is a ", value_type_name(type),
                ", not a string");
  return std::get<std::string>(scalar);
}

std::vector<std::string> Value::as_strings(const std::string& key) const {
  BRIGADE_CHECK(type == ValueType::kArray && element_type == ValueType::kString, "GGUF metadata '", key,
                "' is not an array of strings");
  std::vector<std::string> out;
  out.reserve(elements.size());
  for (const auto& e : elements) out.push_back(std::get<std::string>(e));
  return out;
}

std::vector<int64_t> Value::as_ints(const std::string& key) const {
  BRIGADE_CHECK(type == ValueType::kArray, "GGUF metadata '", key, "' is not an array");
  std::vector<int64_t> out;
  out.reserve(elements.size());
  for (const auto& e : elements) {
    std::optional<int64_t> v = scalar_int(e);
    BRIGADE_CHECK(v.has_value(), "GGUF metadata '", key, "' is not an array of integers");
    out.push_back(*v);
  }
  return out;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  return n;
}

std::vector<int64_t> TensorInfo::shape() const { return {ne.rbegin(), ne.rend()}; }

const Value* File::find(const std::string& key) const {
  for (const auto& [k, v] : metadata)
    if (k == key) return &v;
  return nullptr;
}

const TensorInfo* File::find_tensor(const std::string& name) const {
  for (const auto& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

File parse_gguf(std::span<const uint8_t> bytes, const std::string& where) {
  Cursor in(bytes, where);
  File file;
  BRIGADE_CHECK(bytes.size() >= 4, where, ": truncated (", bytes.size(), " bytes), not a GGUF file");
  const uint32_t magic = in.read<uint32_t>("magic");
  BRIGADE_CHECK(magic == kMagic, where, ": bad magic (the file does not start with \"GGUF\"), not a GGUF file");
  file.version = in.read<uint32_t>("version");
  BRIGADE_CHECK(file.version != 0x03000000 && file.version != 0x02000000, where,
                ": a big-endian GGUF file (byte-swapped version); only little-endian files are supported");
  BRIGADE_CHECK(file.version == 2 || file.version == 3, where, ": unsupported GGUF version ", file.version,
                " (2 or 3 expected)");
  const uint64_t tensor_count = in.read<uint64_t>("tensor_count");
  const uint64_t kv_count = in.read<uint64_t>("metadata_kv_count");
  // A key/value takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info at
  // least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
  BRIGADE_CHECK(kv_count <= in.remaining() / 13, where, ": metadata_kv_count ", kv_count,
                " cannot fit in the ", in.remaining(), " bytes left in the file");
  BRIGADE_CHECK(tensor_count <= in.remaining() / 24, where, ": tensor_count ", tensor_count,
                " cannot fit in the ", in.remaining(), " bytes left in the file");

  std::set<std::string> keys;
  file.metadata.reserve(kv_count);
  for (uint64_t i = 0; i < kv_count; ++i) {
    std::string key = in.read_string("metadata key " + std::to_string(i));
    BRIGADE_CHECK(keys.insert(key).second, where, ": duplicate metadata key '", key, "'");
    Value value = read_value(in, key, where);
    file.metadata.emplace_back(std::move(key), std::move(value));
  }
  if (const Value* alignment = file.find("general.alignment")) {
    BRIGADE_CHECK(alignment->type == ValueType::kUint32, where, ": general.alignment is a ",
                  value_type_name(alignment->type), " (uint32 expected)");
    file.alignment = std::get<uint32_t>(alignment->scalar);
    BRIGADE_CHECK(file.alignment > 0 && (file.alignment & (file.alignment - 1)) == 0 &&
                      file.alignment <= kMaxAlignment,
                  where, ": general.alignment ", file.alignment, " is not a power of two up to 2^30");
  }

  std::set<std::string> names;
  file.tensors.reserve(tensor_count);
  for (uint64_t i = 0; i < tensor_count; ++i) {
    TensorInfo t;
    t.name = in.read_string("tensor " + std::to_string(i) + " name");
    const std::string field = "tensor '" + t.name + "'";
    BRIGADE_CHECK(names.insert(t.name).second, where, ": duplicate tensor name '", t.name, "'");
    const uint32_t n_dims = in.read<uint32_t>(field + " n_dims");
    BRIGADE_CHECK(n_dims >= 1 && n_dims <= kMaxDims, where, ": ", field, " has n_dims ", n_dims,
                  " (1..", kMaxDims, " expected)");
    int64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const int64_t ne = in.read<int64_t>(field + " ne[" + std::to_string(d) + "]");
      BRIGADE_CHECK(ne >= 0, where, ": ", field, " has negative ne[", d, "] = ", ne);
      BRIGADE_CHECK(ne == 0 || numel <= std::numeric_limits<int64_t>::max() / ne, where, ": ", field,
                    " has too many elements (ne overflows int64)");
      numel *= ne;
      t.ne.push_back(ne);
    }
    const uint32_t type_id = in.read<uint32_t>(field + " type");
    const std::optional<GgmlType> type = ggml_type_from_id(type_id);
    BRIGADE_CHECK(type.has_value(), where, ": ", field, " has ggml type ", type_id,
                  ", which brigade does not read (F32 0, F16 1, Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q2_K 10, Q3_K 11, "
                  "Q4_K 12, Q5_K 13, Q6_K 14, IQ4_NL 20, IQ4_XS 23, BF16 30)");
    t.type = *type;
    BRIGADE_CHECK(t.ne[0] % ggml_block_size(t.type) == 0, where, ": ", field, " of type ",
                  ggml_type_name(t.type), " has ne[0] = ", t.ne[0], ", not a multiple of the block size ",
                  ggml_block_size(t.type));
    const std::optional<uint64_t> nbytes = ggml_nbytes(t.type, numel);
    BRIGADE_CHECK(nbytes.has_value(), where, ": ", field, " is too large");
    t.nbytes = *nbytes;
    t.offset = in.read<uint64_t>(field + " offset");
    BRIGADE_CHECK(t.offset % file.alignment == 0, where, ": ", field, " has offset ", t.offset,
                  ", not a multiple of the alignment ", file.alignment);
    file.tensors.push_back(std::move(t));
  }

  file.data_offset = pad_to(in.position(), file.alignment);
  const uint64_t data_size = bytes.size() >= file.data_offset ? bytes.size() - file.data_offset : 0;
  BRIGADE_CHECK(file.tensors.empty() || bytes.size() >= file.data_offset, where,
                ": truncated: the data section would start at byte ", file.data_offset, " but the file has ",
                bytes.size(), " bytes");
  std::vector<const TensorInfo*> by_offset;
  for (const auto& t : file.tensors) {
    BRIGADE_CHECK(t.offset <= data_size && t.nbytes <= data_size - t.offset, where, ": tensor '", t.name,
                  "' (", t.nbytes, " bytes at data offset ", t.offset, ") extends past the end of the file (",
                  data_size, " bytes of data)");
    by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorInfo& prev = *by_offset[i - 1];
    BRIGADE_CHECK(prev.offset + prev.nbytes <= by_offset[i]->offset, where, ": tensors '", prev.name, "' and '",
                  by_offset[i]->name, "' overlap in the data section");
  }
  return file;
}

std::vector<uint8_t> serialize_header(const std::vector<std::pair<std::string, Value>>& metadata,
                                      std::vector<TensorInfo>& tensors, uint64_t& alignment) {
  alignment = kDefaultAlignment;
  for (const auto& [key, value] : metadata) {
    if (key != "general.alignment") continue;
    BRIGADE_CHECK(value.type == ValueType::kUint32, "GGUF: general.alignment must be a uint32");
    alignment = std::get<uint32_t>(value.scalar);
    BRIGADE_CHECK(alignment > 0 && (alignment & (alignment - 1)) == 0 && alignment <= kMaxAlignment,
                  "GGUF: general.alignment ", alignment, " is not a power of two up to 2^30");
  }
  std::vector<uint8_t> out;
  put<uint32_t>(out, kMagic);
  put<uint32_t>(out, kVersion);
  put<uint64_t>(out, tensors.size());
  put<uint64_t>(out, metadata.size());
  std::set<std::string> keys;
  for (const auto& [key, value] : metadata) {
    BRIGADE_CHECK(keys.insert(key).second, "GGUF: duplicate metadata key '", key, "'");
    put_string(out, key);
    put<uint32_t>(out, static_cast<uint32_t>(value.type));
    if (value.type == ValueType::kArray) {
      put<uint32_t>(out, static_cast<uint32_t>(value.element_type));
      put<uint64_t>(out, value.elements.size());
      for (const auto& e : value.elements) put_scalar(out, e);
    } else {
      put_scalar(out, value.scalar);
    }
  }
  std::set<std::string> names;
  uint64_t offset = 0;
  for (auto& t : tensors) {
    BRIGADE_CHECK(names.insert(t.name).second, "GGUF: duplicate tensor name '", t.name, "'");
    t.offset = offset;
    put_string(out, t.name);
    put<uint32_t>(out, static_cast<uint32_t>(t.ne.size()));
    for (int64_t d : t.ne) put<int64_t>(out, d);
    put<uint32_t>(out, static_cast<uint32_t>(t.type));
    put<uint64_t>(out, offset);
    offset = pad_to(offset + t.nbytes, alignment);
  }
  out.resize(pad_to(out.size(), alignment), 0);
  return out;
}

TensorInfo info_of(const EncodedTensor& tensor) {
  BRIGADE_CHECK(!tensor.ne.empty() && tensor.ne.size() <= kMaxDims, "GGUF: tensor '", tensor.name, "' has ",
                tensor.ne.size(), " dims (1..4 supported)");
  TensorInfo info;
  info.name = tensor.name;
  info.ne = tensor.ne;
  info.type = tensor.type;
  for (int64_t d : tensor.ne) BRIGADE_CHECK(d >= 0, "GGUF: tensor '", tensor.name, "' has a negative dim");
  const std::optional<uint64_t> nbytes = ggml_nbytes(tensor.type, info.numel());
  BRIGADE_CHECK(tensor.ne[0] % ggml_block_size(tensor.type) == 0 && nbytes == tensor.data.size(),
                "GGUF: tensor '", tensor.name, "' has ", tensor.data.size(), " bytes, which does not match its ",
                ggml_type_name(tensor.type), " shape");
  info.nbytes = *nbytes;
  return info;
}

std::vector<uint8_t> serialize_gguf(const std::vector<std::pair<std::string, Value>>& metadata,
                                    const std::vector<EncodedTensor>& tensors) {
  std::vector<TensorInfo> infos;
  for (const auto& t : tensors) infos.push_back(info_of(t));
  uint64_t alignment = 0;
  std::vector<uint8_t> out = serialize_header(metadata, infos, alignment);
  for (const auto& t : tensors) {
    out.insert(out.end(), t.data.begin(), t.data.end());
    out.resize(pad_to(out.size(), alignment), 0);
  }
  return out;
}

uint16_t fp32_to_fp16(float x) {
  const uint32_t bits = float_to_bits(x);
  const auto sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
  const uint32_t exponent = (bits >> 23) & 0xff;
  uint32_t mantissa = bits & 0x7fffff;
  if (exponent == 0xff) return sign | 0x7c00 | (mantissa != 0 ? 0x200 : 0);  // inf, nan
  const int32_t e = static_cast<int32_t>(exponent) - 127 + 15;
  if (e >= 31) return sign | 0x7c00;  // overflows to infinity
  if (e <= 0) {
    // Subnormal half (or zero): the value in units of 2^-24, rounded to nearest even.
    if (e < -10) return sign;
    mantissa |= 0x800000;
    const int shift = 14 - e;
    uint32_t half = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1);
    const uint32_t midpoint = 1u << (shift - 1);
    if (rest > midpoint || (rest == midpoint && (half & 1))) ++half;
    return sign | static_cast<uint16_t>(half);
  }
  uint32_t half = (static_cast<uint32_t>(e) << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) ++half;  // a carry may round up to inf: correct
  return sign | static_cast<uint16_t>(half);
}

float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1f;
  const uint32_t mantissa = h & 0x3ff;
  if (exponent == 0) {
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // zero or subnormal
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000 | (mantissa << 13));
  return bits_to_float(sign | ((exponent - 15 + 127) << 23) | (mantissa << 13));
}

uint16_t fp32_to_bf16(float x) {
  const uint32_t bits = float_to_bits(x);
  if ((bits & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((bits >> 16) | 0x40);  // quiet nan
  const uint32_t rounding = 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float bf16_to_fp32(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

std::vector<uint8_t> encode(GgmlType type, std::span<const float> values) {
  const auto count = static_cast<int64_t>(values.size());
  const std::optional<uint64_t> nbytes = ggml_nbytes(type, count);
  BRIGADE_CHECK(nbytes.has_value(), "GGUF: ", count, " values cannot be encoded as ", ggml_type_name(type),
                " (a multiple of ", ggml_block_size(type), " is needed)");
  std::vector<uint8_t> out(*nbytes);
  uint8_t* p = out.data();
  switch (type) {
    case GgmlType::kF32:
      if (count > 0) std::memcpy(p, values.data(), *nbytes);
      break;
    case GgmlType::kF16:
    case GgmlType::kBF16:
      for (int64_t i = 0; i < count; ++i) {
        const uint16_t h = type == GgmlType::kF16 ? fp32_to_fp16(values[i]) : fp32_to_bf16(values[i]);
        std::memcpy(p + 2 * i, &h, 2);
      }
      break;
    case GgmlType::kQ8_0:
    case GgmlType::kQ4_0:
      for (int64_t b = 0; b < count / kBlockSize; ++b) {
        const float* x = values.data() + b * kBlockSize;
        uint8_t* block = p + b * ggml_block_bytes(type);
        if (type == GgmlType::kQ8_0) quantize_block_q8_0(x, block);
        else quantize_block_q4_0(x, block);
      }
      break;
    case GgmlType::kQ5_0:
    case GgmlType::kQ5_1:
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K:
    case GgmlType::kQ6_K: {
      const int64_t block = ggml_block_size(type), block_bytes = ggml_block_bytes(type);
      for (int64_t b = 0; b < count / block; ++b) quantize_block(type, values.data() + b * block, p + b * block_bytes);
      break;
    }
    default:
      BRIGADE_FAIL("GGUF: brigade reads ", ggml_type_name(type), " but does not write it (F32, F16, BF16, Q8_0, Q4_0, "
                   "Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)");
  }
  return out;
}

void decode(GgmlType type, std::span<const uint8_t> bytes, std::span<float> out) {
  const auto count = static_cast<int64_t>(out.size());
  const std::optional<uint64_t> nbytes = ggml_nbytes(type, count);
  BRIGADE_CHECK(nbytes.has_value() && *nbytes == bytes.size(), "GGUF: ", bytes.size(), " bytes are not ", count,
                " values of ", ggml_type_name(type));
  const uint8_t* p = bytes.data();
  auto half_at = [&](uint64_t at) {
    uint16_t h;
    std::memcpy(&h, p + at, 2);
    return h;
  };
  switch (type) {
    case GgmlType::kF32:
      if (count > 0) std::memcpy(out.data(), p, *nbytes);
      break;
    case GgmlType::kF16:
      for (int64_t i = 0; i < count; ++i) out[i] = fp16_to_fp32(half_at(2 * i));
      break;
    case GgmlType::kBF16:
      for (int64_t i = 0; i < count; ++i) out[i] = bf16_to_fp32(half_at(2 * i));
      break;
    case GgmlType::kQ8_0:
      for (int64_t b = 0; b < count / kBlockSize; ++b) {
        const uint64_t at = b * ggml_block_bytes(type);
        const float d = fp16_to_fp32(half_at(at));
        for (int64_t j = 0; j < kBlockSize; ++j)
          out[b * kBlockSize + j] = static_cast<float>(static_cast<int8_t>(p[at + 2 + j])) * d;
      }
      break;
    case GgmlType::kQ4_0:
      for (int64_t b = 0; b < count / kBlockSize; ++b) {
        const uint64_t at = b * ggml_block_bytes(type);
        const float d = fp16_to_fp32(half_at(at));
        for (int64_t j = 0; j < kBlockSize / 2; ++j) {
          const uint8_t q = p[at + 2 + j];
          out[b * kBlockSize + j] = static_cast<float>((q & 0x0f) - 8) * d;
          out[b * kBlockSize + j + kBlockSize / 2] = static_cast<float>((q >> 4) - 8) * d;
        }
      }
      break;
    default: {
      const int64_t block = ggml_block_size(type), block_bytes = ggml_block_bytes(type);
      for (int64_t b = 0; b < count / block; ++b)
        dequantize_block(type, p + b * block_bytes, out.data() + b * block);
    }
  }
}

}  // namespace brigade::model::gguf
