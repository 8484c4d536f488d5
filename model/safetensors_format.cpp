#include "model/safetensors_format.h"

#include <algorithm>
#include <cstring>
#include <set>
#include <string_view>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace brigade::model {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference implementation's limit

struct DtypeSize {
  const char* name;
  uint64_t bytes;
};
constexpr DtypeSize kDtypeSizes[] = {
    {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"F8_E4M3", 1}, {"F8_E5M2", 1},
    {"I64", 8}, {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U64", 8},     {"U32", 4},
    {"U16", 2}, {"U8", 1},  {"BOOL", 1},
};

}  // namespace

uint64_t safetensors_dtype_size(const std::string& dtype) {
  for (const auto& d : kDtypeSizes)
    if (dtype == d.name) return d.bytes;
  return 0;
}

SafetensorsHeader parse_safetensors_header(std::span<const uint8_t> file, const std::string& where) {
  BRIGADE_CHECK(file.size() >= 8, where, ": truncated (", file.size(), " bytes; the 8-byte header length is missing)");
  uint64_t n = 0;
  std::memcpy(&n, file.data(), 8);
  BRIGADE_CHECK(n <= kMaxHeaderBytes, where, ": header length ", n, " exceeds the ", kMaxHeaderBytes,
                "-byte limit (not a safetensors file, or a corrupt one)");
  BRIGADE_CHECK(n <= file.size() - 8, where, ": header length ", n, " runs past the end of the ", file.size(),
                "-byte file (truncated?)");
  const std::string_view text(reinterpret_cast<const char*>(file.data()) + 8, n);

  // Duplicate top-level keys would silently shadow each other: reject them.
  std::set<std::string> keys;
  std::string duplicate;
  nlohmann::json::parser_callback_t check_keys = [&](int depth, nlohmann::json::parse_event_t event,
                                                     nlohmann::json& parsed) {
    if (depth == 1 && event == nlohmann::json::parse_event_t::key && parsed.is_string() &&
        !keys.insert(parsed.get<std::string>()).second && duplicate.empty())
      duplicate = parsed.get<std::string>();
    return true;
  };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text.begin(), text.end(), check_keys);
  } catch (const std::exception& e) {
    BRIGADE_FAIL(where, ": header is not valid JSON: ", e.what());
  }
  BRIGADE_CHECK(header.is_object(), where, ": header is not a JSON object");
  BRIGADE_CHECK(duplicate.empty(), where, ": header names '", duplicate, "' twice");

  SafetensorsHeader out;
  out.data_begin = 8 + n;
  const uint64_t data_size = file.size() - out.data_begin;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      BRIGADE_CHECK(entry.is_object(), where, ": __metadata__ must be an object of strings");
      for (const auto& [k, v] : entry.items()) {
        BRIGADE_CHECK(v.is_string(), where, ": __metadata__['", k, "'] is not a string");
        out.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    const std::string tw = where + ": tensor '" + name + "'";
    BRIGADE_CHECK(entry.is_object() && entry.contains("dtype") && entry.contains("shape") &&
                      entry.contains("data_offsets"),
                  tw, " needs dtype, shape and data_offsets");
    const auto& dtype = entry["dtype"];
    BRIGADE_CHECK(dtype.is_string(), tw, ": dtype is not a string");
    SafetensorsEntry e{name, dtype.get<std::string>(), {}, 0, 0};
    const uint64_t element = safetensors_dtype_size(e.dtype);
    BRIGADE_CHECK(element > 0, tw, ": unsupported dtype ", dtype.dump());
    const auto& shape = entry["shape"];
    BRIGADE_CHECK(shape.is_array(), tw, ": shape is not an array");
    BRIGADE_CHECK(shape.size() <= 16, tw, ": shape has ", shape.size(), " dimensions (at most 16)");
    uint64_t bytes = element;
    for (const auto& d : shape) {
      BRIGADE_CHECK(d.is_number_unsigned(), tw, ": shape entries must be non-negative integers, got ", shape.dump());
      const uint64_t dim = d.get<uint64_t>();
      BRIGADE_CHECK(dim < (uint64_t{1} << 62) && !__builtin_mul_overflow(bytes, dim, &bytes), tw, ": shape ",
                    shape.dump(), " is too large");
      e.shape.push_back(static_cast<int64_t>(dim));
    }
    const auto& offs = entry["data_offsets"];
    BRIGADE_CHECK(offs.is_array() && offs.size() == 2 && offs[0].is_number_unsigned() && offs[1].is_number_unsigned(),
                  tw, ": data_offsets must be two non-negative integers, got ", offs.dump());
    e.begin = offs[0].get<uint64_t>();
    e.end = offs[1].get<uint64_t>();
    BRIGADE_CHECK(e.begin <= e.end && e.end <= data_size, tw, ": data_offsets [", e.begin, ", ", e.end,
                  "] fall outside the data area of ", data_size, " bytes");
    BRIGADE_CHECK(e.end - e.begin == bytes, tw, ": data_offsets hold ", e.end - e.begin, " bytes but ", e.dtype,
                  " shape ", shape.dump(), " needs ", bytes);
    out.tensors.push_back(std::move(e));
  }
  std::vector<const SafetensorsEntry*> by_offset;
  for (const auto& e : out.tensors)
    if (e.end > e.begin) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i)
    BRIGADE_CHECK(by_offset[i]->begin >= by_offset[i - 1]->end, where, ": the data of tensors '",
                  by_offset[i - 1]->name, "' and '", by_offset[i]->name, "' overlap");
  return out;
}

}  // namespace brigade::model
