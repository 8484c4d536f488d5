#include "model/safetensors.h"

#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"

namespace brigade::model {
namespace {

struct DtypeName {
  torch::ScalarType type;
  const char* name;
};
constexpr DtypeName kDtypes[] = {
    {torch::kFloat64, "F64"}, {torch::kFloat32, "F32"}, {torch::kFloat16, "F16"},
    {torch::kBFloat16, "BF16"}, {torch::kInt64, "I64"}, {torch::kInt32, "I32"},
    {torch::kInt16, "I16"}, {torch::kInt8, "I8"}, {torch::kUInt8, "U8"}, {torch::kBool, "BOOL"},
};

const char* dtype_name(torch::ScalarType type) {
  for (const auto& d : kDtypes)
    if (d.type == type) return d.name;
  BRIGADE_FAIL("safetensors: unsupported dtype ", c10::toString(type));
}

std::optional<torch::ScalarType> dtype_from_name(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.type;
  return std::nullopt;
}

}  // namespace

void save_safetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> contiguous;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    BRIGADE_CHECK(tensor.device().is_cpu(), "safetensors: tensor ", name, " is not on the CPU");
    auto t = tensor.detach().contiguous();
    const uint64_t bytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    header[name] = {{"dtype", dtype_name(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    contiguous.push_back(t);
  }
  std::string json = header.dump();
  // Pad the header with spaces so the data area starts 8-byte aligned.
  json.append((8 - (json.size() % 8)) % 8, ' ');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  BRIGADE_CHECK(out.good(), "cannot write ", path.string());
  uint64_t n = json.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(json.data(), static_cast<std::streamsize>(json.size()));
  for (const auto& t : contiguous) {
    out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.numel() * t.element_size()));
  }
  out.flush();
  BRIGADE_CHECK(out.good(), "failed writing ", path.string());
}

SafetensorsFile load_safetensors(const std::filesystem::path& path) {
  const std::string bytes = read_file(path);
  const std::string where = "safetensors file " + path.string();
  BRIGADE_CHECK(bytes.size() >= 8, where, ": truncated (", bytes.size(), " bytes, no header)");
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  BRIGADE_CHECK(n <= bytes.size() - 8, where, ": header length ", n, " exceeds the file size ",
                bytes.size());
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes.substr(8, n));
  } catch (const std::exception& e) {
    BRIGADE_FAIL(where, ": header is not valid JSON: ", e.what());
  }
  BRIGADE_CHECK(header.is_object(), where, ": header is not a JSON object");
  const uint64_t data_begin = 8 + n;
  const uint64_t data_size = bytes.size() - data_begin;
  SafetensorsFile file;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      BRIGADE_CHECK(entry.is_object(), where, ": __metadata__ must be an object");
      for (const auto& [k, v] : entry.items()) {
        BRIGADE_CHECK(v.is_string(), where, ": metadata value for '", k, "' is not a string");
        file.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    const std::string tw = where + ": tensor '" + name + "'";
    BRIGADE_CHECK(entry.is_object() && entry.contains("dtype") && entry.contains("shape") &&
                      entry.contains("data_offsets"),
                  tw, " needs dtype, shape and data_offsets");
    BRIGADE_CHECK(entry["dtype"].is_string(), tw, ": dtype is not a string");
    auto dtype = dtype_from_name(entry["dtype"].get<std::string>());
    BRIGADE_CHECK(dtype.has_value(), tw, ": unsupported dtype ", entry["dtype"].dump());
    std::vector<int64_t> shape;
    BRIGADE_CHECK(entry["shape"].is_array(), tw, ": shape is not an array");
    uint64_t numel = 1;
    for (const auto& d : entry["shape"]) {
      BRIGADE_CHECK(d.is_number_unsigned(), tw, ": shape entries must be non-negative integers");
      const uint64_t dim = d.get<uint64_t>();
      BRIGADE_CHECK(dim <= (uint64_t{1} << 62) && !__builtin_mul_overflow(numel, dim, &numel), tw,
                    ": shape ", entry["shape"].dump(), " is too large");
      shape.push_back(static_cast<int64_t>(dim));
    }
    const auto& offs = entry["data_offsets"];
    BRIGADE_CHECK(offs.is_array() && offs.size() == 2 && offs[0].is_number_unsigned() &&
                      offs[1].is_number_unsigned(),
                  tw, ": data_offsets must be two non-negative integers");
    uint64_t b = offs[0].get<uint64_t>(), e = offs[1].get<uint64_t>();
    BRIGADE_CHECK(b <= e && e <= data_size, tw, ": data_offsets [", b, ", ", e,
                  "] fall outside the data area of ", data_size, " bytes");
    uint64_t expected = 0;
    BRIGADE_CHECK(!__builtin_mul_overflow(numel, c10::elementSize(*dtype), &expected), tw, ": shape ",
                  entry["shape"].dump(), " is too large");
    BRIGADE_CHECK(e - b == expected, tw, ": ", e - b, " bytes for shape ", entry["shape"].dump(),
                  " needs ", expected);
    ranges.emplace_back(b, e);
    auto tensor = torch::empty(shape, torch::TensorOptions().dtype(*dtype));
    if (expected > 0) std::memcpy(tensor.data_ptr(), bytes.data() + data_begin + b, expected);
    file.tensors.emplace(name, tensor);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    BRIGADE_CHECK(ranges[i].first >= ranges[i - 1].second, where, ": tensor data ranges overlap");
  }
  return file;
}

}  // namespace brigade::model
