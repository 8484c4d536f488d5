#include "model/gguf.h"

#include <algorithm>
#include <fstream>
#include <vector>

#include <ATen/Parallel.h>

#include "core/error.h"

namespace brigade::model {

void GgufWriter::set(const std::string& key, gguf::Value value) {
  for (auto& [k, v] : metadata_) {
    if (k == key) {
      v = std::move(value);
      return;
    }
  }
  metadata_.emplace_back(key, std::move(value));
}

void GgufWriter::add_tensor(const std::string& name, const torch::Tensor& tensor, gguf::GgmlType type) {
  BRIGADE_CHECK(tensor.device().is_cpu(), "GGUF: tensor ", name, " is not on the CPU");
  BRIGADE_CHECK(tensor.is_floating_point(), "GGUF: tensor ", name, " is not a floating-point tensor");
  BRIGADE_CHECK(tensor.dim() >= 1 && tensor.dim() <= gguf::kMaxDims, "GGUF: tensor ", name, " has ",
                tensor.dim(), " dims (1..4 supported)");
  const torch::Tensor values = tensor.detach().to(torch::kFloat32).contiguous();
  const int64_t block = gguf::ggml_block_size(type);
  BRIGADE_CHECK(block == 1 || values.size(-1) % block == 0, "GGUF: tensor ", name, " has rows of ", values.size(-1),
                " values, which ", gguf::ggml_type_name(type), " cannot store (a multiple of ", block, " is needed)");
  gguf::EncodedTensor encoded;
  encoded.name = name;
  encoded.ne.assign(values.sizes().rbegin(), values.sizes().rend());
  encoded.type = type;
  // Blocks are encoded independently: chunks of whole rows in parallel (the K-quant
  // searches cost ~0.1 us per value), joined in order.
  const int64_t row = values.size(-1), rows = values.numel() / std::max<int64_t>(row, 1);
  const int64_t chunk_rows = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(row, 1));
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  std::vector<std::vector<uint8_t>> parts(static_cast<size_t>(std::max<int64_t>(chunks, 1)));
  const float* data = values.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * chunk_rows, count = std::min(chunk_rows, rows - first);
      parts[static_cast<size_t>(c)] =
          gguf::encode(type, {data + first * row, static_cast<size_t>(count * row)});
    }
  });
  for (auto& part : parts) encoded.data.insert(encoded.data.end(), part.begin(), part.end());
  for (auto& t : tensors_) {
    if (t.name == name) {
      t = std::move(encoded);
      return;
    }
  }
  tensors_.push_back(std::move(encoded));
}

void GgufWriter::write(const std::filesystem::path& path) const {
  std::vector<gguf::TensorInfo> infos;
  for (const auto& t : tensors_) infos.push_back(gguf::info_of(t));
  uint64_t alignment = 0;
  const std::vector<uint8_t> header = gguf::serialize_header(metadata_, infos, alignment);

  std::filesystem::path tmp = path;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    BRIGADE_CHECK(out.good(), "cannot write GGUF file ", tmp.string());
    out.write(reinterpret_cast<const char*>(header.data()), static_cast<std::streamsize>(header.size()));
    const std::vector<char> zeros(alignment, 0);
    for (const auto& t : tensors_) {
      out.write(reinterpret_cast<const char*>(t.data.data()), static_cast<std::streamsize>(t.data.size()));
      const uint64_t pad = (alignment - t.data.size() % alignment) % alignment;
      out.write(zeros.data(), static_cast<std::streamsize>(pad));
    }
    out.flush();
    BRIGADE_CHECK(out.good(), "failed writing GGUF file ", tmp.string());
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  BRIGADE_CHECK(!ec, "cannot rename ", tmp.string(), " to ", path.string(), ": ", ec.message());
}

GgufReader::GgufReader(const std::filesystem::path& path)
    : path_(path), where_("GGUF file " + path.string()), mapped_(path, where_) {
  file_ = gguf::parse_gguf(mapped_.bytes(), where_);
}

GgufReader::~GgufReader() = default;

const gguf::Value& GgufReader::metadata(const std::string& key) const {
  const gguf::Value* value = file_.find(key);
  BRIGADE_CHECK(value != nullptr, where_, ": no metadata key '", key, "'");
  return *value;
}

const gguf::TensorInfo& GgufReader::info(const std::string& name) const {
  const gguf::TensorInfo* info = file_.find_tensor(name);
  BRIGADE_CHECK(info != nullptr, where_, ": no tensor '", name, "'");
  return *info;
}

std::span<const uint8_t> GgufReader::raw(const std::string& name) const {
  const gguf::TensorInfo& t = info(name);
  return mapped_.bytes().subspan(file_.data_offset + t.offset, static_cast<size_t>(t.nbytes));
}

torch::Tensor GgufReader::tensor(const std::string& name) const {
  const gguf::TensorInfo& t = info(name);
  torch::Tensor out = torch::empty(t.shape(), torch::kFloat32);
  gguf::decode(t.type, raw(name), {out.data_ptr<float>(), static_cast<size_t>(out.numel())});
  return out;
}

GgufQuant parse_gguf_quant(const std::string& name) {
  for (GgufQuant q : {GgufQuant::kF32, GgufQuant::kF16, GgufQuant::kQ8_0, GgufQuant::kQ4_0, GgufQuant::kQ6_K,
                      GgufQuant::kQ5_K_M, GgufQuant::kQ4_K_M}) {
    if (name == gguf_quant_name(q)) return q;
  }
  BRIGADE_FAIL("unknown GGUF quantization '", name, "' (choices: f32, f16, q8_0, q4_0, q6_k, q5_k_m, q4_k_m)");
}

std::string gguf_quant_name(GgufQuant quant) {
  switch (quant) {
    case GgufQuant::kF32: return "f32";
    case GgufQuant::kF16: return "f16";
    case GgufQuant::kQ8_0: return "q8_0";
    case GgufQuant::kQ4_0: return "q4_0";
    case GgufQuant::kQ6_K: return "q6_k";
    case GgufQuant::kQ5_K_M: return "q5_k_m";
    case GgufQuant::kQ4_K_M: return "q4_k_m";
  }
  BRIGADE_ASSERT(false, "unknown GgufQuant");
}

}  // namespace brigade::model
