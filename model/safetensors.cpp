#include "model/safetensors.h"

#include <cstring>
#include <fstream>
#include <memory>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "model/safetensors_format.h"

namespace brigade::model {
namespace {

struct DtypeName {
  torch::ScalarType type;
  const char* name;
};
constexpr DtypeName kDtypes[] = {
    {torch::kFloat64, "F64"},         {torch::kFloat32, "F32"},       {torch::kFloat16, "F16"},
    {torch::kBFloat16, "BF16"},       {torch::kFloat8_e4m3fn, "F8_E4M3"}, {torch::kFloat8_e5m2, "F8_E5M2"},
    {torch::kInt64, "I64"},           {torch::kInt32, "I32"},         {torch::kInt16, "I16"},
    {torch::kInt8, "I8"},             {torch::kUInt64, "U64"},        {torch::kUInt32, "U32"},
    {torch::kUInt16, "U16"},          {torch::kUInt8, "U8"},          {torch::kBool, "BOOL"},
};

const char* dtype_name(torch::ScalarType type) {
  for (const auto& d : kDtypes)
    if (d.type == type) return d.name;
  BRIGADE_FAIL("safetensors: unsupported dtype ", c10::toString(type));
}

torch::ScalarType dtype_from_name(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.type;
  BRIGADE_ASSERT(false, "safetensors dtype ", name, " passed the header check but has no torch type");
  return torch::kFloat32;
}

constexpr const char* kIndexFile = "model.safetensors.index.json";

}  // namespace

void save_safetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> contiguous;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    BRIGADE_CHECK(tensor.device().is_cpu(), "safetensors: tensor ", name, " is not on the CPU");
    BRIGADE_CHECK(!header.contains(name), "safetensors: tensor name ", name, " given twice for ", path.string());
    // Device tensors are copied out here, so callers hand over what they hold.
    auto t = tensor.detach().to(torch::kCPU).contiguous();
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
  const std::string where = "safetensors file " + path.string();
  auto mapped = std::make_shared<MappedFile>(path, where);
  const SafetensorsHeader header = parse_safetensors_header(mapped->bytes(), where);
  SafetensorsFile file;
  file.metadata = header.metadata;
  for (const auto& entry : header.tensors) {
    const auto dtype = dtype_from_name(entry.dtype);
    const auto options = torch::TensorOptions().dtype(dtype);
    const uint64_t bytes = entry.end - entry.begin;
    uint8_t* data = mapped->writable_data() + header.data_begin + entry.begin;
    torch::Tensor tensor;
    if (bytes == 0) {
      tensor = torch::empty(entry.shape, options);
    } else if (reinterpret_cast<uintptr_t>(data) % c10::elementSize(dtype) == 0) {
      // The tensor keeps the mapping alive.
      tensor = torch::from_blob(data, entry.shape, [mapped](void*) {}, options);
    } else {
      tensor = torch::empty(entry.shape, options);
      std::memcpy(tensor.data_ptr(), data, bytes);
    }
    file.tensors.emplace(entry.name, std::move(tensor));
  }
  return file;
}

std::vector<std::filesystem::path> save_safetensors_sharded(const std::filesystem::path& dir, const NamedTensors& tensors,
                                                            uint64_t max_shard_bytes,
                                                            const std::map<std::string, std::string>& metadata) {
  BRIGADE_CHECK(max_shard_bytes > 0, "safetensors: the shard size must be positive");
  std::vector<NamedTensors> shards(1);
  uint64_t total = 0, current = 0;
  for (const auto& named : tensors) {
    const uint64_t bytes = static_cast<uint64_t>(named.second.numel()) * named.second.element_size();
    if (current > 0 && current + bytes > max_shard_bytes) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(named);
    current += bytes;
    total += bytes;
  }
  std::vector<std::filesystem::path> written;
  if (shards.size() == 1) {
    written.push_back(dir / "model.safetensors");
    save_safetensors(written.back(), tensors, metadata);
    return written;
  }
  nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    written.push_back(dir / name);
    save_safetensors(written.back(), shards[i], metadata);
    for (const auto& [tensor_name, tensor] : shards[i]) weight_map[tensor_name] = name;
  }
  nlohmann::ordered_json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  written.push_back(dir / kIndexFile);
  write_file_atomic(written.back(), index.dump(2) + "\n");
  return written;
}

SafetensorsFile load_safetensors_dir(const std::filesystem::path& dir) {
  const auto index_path = dir / kIndexFile;
  if (!std::filesystem::exists(index_path)) {
    BRIGADE_CHECK(std::filesystem::exists(dir / "model.safetensors"), dir.string(), " has neither ", kIndexFile,
                  " nor model.safetensors");
    return load_safetensors(dir / "model.safetensors");
  }
  const std::string where = index_path.string();
  nlohmann::json index;
  try {
    index = nlohmann::json::parse(read_file(index_path));
  } catch (const nlohmann::json::exception& e) {
    BRIGADE_FAIL(where, ": not valid JSON: ", e.what());
  }
  BRIGADE_CHECK(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(), where,
                ": needs a \"weight_map\" object {tensor name: file}");
  std::map<std::string, std::set<std::string>> by_file;  // file -> tensors the index puts there
  for (const auto& [name, file] : index["weight_map"].items()) {
    BRIGADE_CHECK(file.is_string(), where, ": weight_map['", name, "'] is not a file name");
    const auto file_name = file.get<std::string>();
    BRIGADE_CHECK(!file_name.empty() && file_name.find('/') == std::string::npos && file_name != "..", where,
                  ": weight_map['", name, "'] = '", file_name, "' is not a file name in the same directory");
    by_file[file_name].insert(name);
  }
  SafetensorsFile out;
  for (const auto& [file_name, names] : by_file) {
    SafetensorsFile shard = load_safetensors(dir / file_name);
    for (const auto& name : names)
      BRIGADE_CHECK(shard.tensors.contains(name), where, ": weight_map puts '", name, "' in ", file_name,
                    ", which does not hold it");
    for (auto& [name, tensor] : shard.tensors) {
      BRIGADE_CHECK(names.contains(name), where, ": ", file_name, " holds '", name,
                    "', which weight_map does not put there");
      out.tensors.emplace(name, std::move(tensor));
    }
    out.metadata.insert(shard.metadata.begin(), shard.metadata.end());
  }
  return out;
}

}  // namespace brigade::model
