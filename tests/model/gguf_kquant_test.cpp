// The K-quant encoders (model/gguf_kquants.cpp) and llama.cpp's quantization mixes
// (model/gguf_mix.h) against llama.cpp's own quantizer and gguf-py's decoder
// (tests/model/gguf_kquant_oracle.py).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/fs.h"
#include "model/gguf_format.h"
#include "model/gguf_mix.h"
#include "tests/testing.h"

namespace brigade::model::gguf {
namespace {

const std::string kOracle = std::string(BRIGADE_SOURCE_DIR) + "/tests/model/gguf_kquant_oracle.py";

testing::CommandResult run_oracle(const std::string& args) {
  return testing::run_command(std::string(BRIGADE_VENV_PYTHON) + " " + kOracle + " " + args);
}

std::vector<float> gaussian(int64_t n, uint32_t seed, float stddev) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

std::vector<float> decoded(GgmlType type, std::span<const uint8_t> bytes, int64_t count) {
  std::vector<float> out(count);
  decode(type, bytes, out);
  return out;
}

double rms_error(std::span<const float> a, std::span<const float> b) {
  double sum = 0;
  for (size_t i = 0; i < a.size(); ++i) sum += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
  return std::sqrt(sum / static_cast<double>(a.size()));
}

// A GGUF file held in memory.
struct Gguf {
  std::string bytes;
  File file;

  explicit Gguf(const std::filesystem::path& path)
      : bytes(read_file(path)), file(parse_gguf(span(), path.string())) {}
  std::span<const uint8_t> span() const {
    return {reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()};
  }
  std::span<const uint8_t> data(const TensorInfo& t) const {
    return span().subspan(file.data_offset + t.offset, t.nbytes);
  }
  std::vector<float> floats(const TensorInfo& t) const { return decoded(t.type, data(t), t.numel()); }
  int64_t metadata_int(const std::string& key, int64_t fallback) const {
    const Value* v = file.find(key);
    return v ? v->as_int(key) : fallback;
  }
};

// Relative RMS error bounds for N(0, 1) data, about 1.2x what the encoders reach
// (measured over these 64 super-blocks: Q4_K 0.0720, Q5_K 0.0361, Q6_K 0.0178, Q5_0
// 0.0426, Q5_1 0.0378).
TEST(GgufKQuantRoundTrip, GaussianErrorWithinBounds) {
  const std::vector<float> x = gaussian(64 * kSuperBlockSize, 11, 1.0f);
  const std::pair<GgmlType, double> bounds[] = {
      {GgmlType::kQ4_K, 0.086}, {GgmlType::kQ5_K, 0.044}, {GgmlType::kQ6_K, 0.022},
      {GgmlType::kQ5_0, 0.052}, {GgmlType::kQ5_1, 0.046},
  };
  for (const auto& [type, bound] : bounds) {
    const std::vector<uint8_t> bytes = encode(type, x);
    ASSERT_EQ(bytes.size(), *ggml_nbytes(type, static_cast<int64_t>(x.size())));
    const double error = rms_error(x, decoded(type, bytes, static_cast<int64_t>(x.size())));
    std::printf("round trip %-5s relative RMS error %.4f (bound %.3f)\n", ggml_type_name(type).c_str(), error, bound);
    EXPECT_LT(error, bound) << ggml_type_name(type);
    EXPECT_GT(error, bound / 4) << ggml_type_name(type) << ": suspiciously exact";
  }
}

TEST(GgufKQuantRoundTrip, ZerosAndConstantsDecodeExactly) {
  for (GgmlType type : {GgmlType::kQ4_K, GgmlType::kQ5_K, GgmlType::kQ6_K, GgmlType::kQ5_0, GgmlType::kQ5_1}) {
    const std::vector<float> zeros(kSuperBlockSize, 0.0f);
    const std::vector<float> back = decoded(type, encode(type, zeros), kSuperBlockSize);
    for (float v : back) ASSERT_EQ(v, 0.0f) << ggml_type_name(type);
  }
  // A block of one negative value: the min of Q4_K / Q5_K (and Q5_1's m) carries it.
  const std::vector<float> constant(kSuperBlockSize, -0.5f);
  for (GgmlType type : {GgmlType::kQ4_K, GgmlType::kQ5_K, GgmlType::kQ5_1}) {
    const std::vector<float> back = decoded(type, encode(type, constant), kSuperBlockSize);
    for (float v : back) ASSERT_NEAR(v, -0.5f, 1e-3f) << ggml_type_name(type);
  }
}

TEST(GgufKQuantRoundTrip, RejectsPartialSuperBlocks) {
  const std::vector<float> x(kSuperBlockSize + kBlockSize, 1.0f);
  EXPECT_BRIGADE_ERROR(encode(GgmlType::kQ4_K, x), "a multiple of 256");
  EXPECT_EQ(encode(GgmlType::kQ5_0, x).size(), *ggml_nbytes(GgmlType::kQ5_0, static_cast<int64_t>(x.size())));
}

// The rules of gguf_mix.h on a 32-layer llama with grouped-query attention (no
// oracle needed: the expected layers are llama.cpp's use_more_bits for n = 32).
TEST(GgufKQuantMix, LlamaRules) {
  const MixModel llama{.architecture = "llama", .n_layers = 32, .n_heads = 32, .n_kv_heads = 8, .n_experts = 0,
                       .has_output = true};
  const std::vector<int64_t> square = {4096, 4096}, kv = {4096, 1024}, down = {14336, 4096}, norm = {4096};
  auto type = [&](QuantMix mix, const std::string& name, const std::vector<int64_t>& ne, const MixModel& m) {
    return mix_tensor_type(mix, name, ne, m);
  };
  const std::vector<int> more_bits = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31};
  for (int layer = 0; layer < 32; ++layer) {
    const std::string blk = "blk." + std::to_string(layer) + ".";
    const bool more = std::find(more_bits.begin(), more_bits.end(), layer) != more_bits.end();
    EXPECT_EQ(type(QuantMix::kQ4_K_M, blk + "attn_v.weight", kv, llama), more ? GgmlType::kQ6_K : GgmlType::kQ4_K)
        << layer;
    EXPECT_EQ(type(QuantMix::kQ4_K_M, blk + "ffn_down.weight", down, llama), more ? GgmlType::kQ6_K : GgmlType::kQ4_K)
        << layer;
    EXPECT_EQ(type(QuantMix::kQ5_K_M, blk + "attn_v.weight", kv, llama), more ? GgmlType::kQ6_K : GgmlType::kQ5_K);
    EXPECT_EQ(type(QuantMix::kQ6_K, blk + "ffn_down.weight", down, llama), GgmlType::kQ6_K);
    EXPECT_EQ(type(QuantMix::kQ4_K_M, blk + "attn_q.weight", square, llama), GgmlType::kQ4_K);
    EXPECT_EQ(type(QuantMix::kQ4_K_M, blk + "ffn_up.weight", down, llama), GgmlType::kQ4_K);
    EXPECT_EQ(type(QuantMix::kQ4_K_M, blk + "attn_norm.weight", norm, llama), GgmlType::kF32);
    EXPECT_EQ(type(QuantMix::kQ4_K_M, blk + "attn_q.bias", norm, llama), GgmlType::kF32);
  }
  // The output head gets 6 bits; an untied embedding the mix's type; a tied one the head's.
  const std::vector<int64_t> embedding = {4096, 128256};
  EXPECT_EQ(type(QuantMix::kQ4_K_M, "output.weight", embedding, llama), GgmlType::kQ6_K);
  EXPECT_EQ(type(QuantMix::kQ8_0, "output.weight", embedding, llama), GgmlType::kQ8_0);
  EXPECT_EQ(type(QuantMix::kQ4_K_M, "token_embd.weight", embedding, llama), GgmlType::kQ4_K);
  MixModel tied = llama;
  tied.has_output = false;
  EXPECT_EQ(type(QuantMix::kQ5_K_M, "token_embd.weight", embedding, tied), GgmlType::kQ6_K);
  EXPECT_EQ(type(QuantMix::kF16, "token_embd.weight", embedding, tied), GgmlType::kF16);
  EXPECT_EQ(type(QuantMix::kF16, "output_norm.weight", norm, tied), GgmlType::kF32);
  EXPECT_EQ(type(QuantMix::kF32, "output.weight", embedding, llama), GgmlType::kF32);
  EXPECT_EQ(type(QuantMix::kQ4_K_M, "blk.0.attn_q.weight", std::vector<int64_t>{4096, 1}, llama), GgmlType::kF32)
      << "a [4096, 1] tensor is 1-D to ggml";
  EXPECT_BRIGADE_ERROR(type(QuantMix::kQ4_K_M, "blk.32.attn_v.weight", kv, llama), "[0, 32)");
}

// Rows that are not whole super-blocks take llama.cpp's fallbacks; rows that are not
// whole 32-blocks F16.
TEST(GgufKQuantMix, ShapeFallbacks) {
  const MixModel m{.architecture = "qwen2", .n_layers = 4, .n_heads = 4, .n_kv_heads = 4};
  const std::vector<int64_t> ne = {896, 4864}, odd = {100, 64};
  EXPECT_EQ(mix_tensor_type(QuantMix::kQ4_K_M, "blk.1.ffn_gate.weight", ne, m), GgmlType::kQ5_0);
  EXPECT_EQ(mix_tensor_type(QuantMix::kQ5_K_M, "blk.1.ffn_gate.weight", ne, m), GgmlType::kQ5_1);
  EXPECT_EQ(mix_tensor_type(QuantMix::kQ6_K, "blk.1.ffn_gate.weight", ne, m), GgmlType::kQ8_0);
  EXPECT_EQ(mix_tensor_type(QuantMix::kQ4_K_M, "blk.3.ffn_down.weight", ne, m), GgmlType::kQ8_0);  // Q6_K's
  EXPECT_EQ(mix_tensor_type(QuantMix::kQ4_K_M, "output.weight", ne, m), GgmlType::kQ8_0);
  EXPECT_EQ(mix_tensor_type(QuantMix::kQ4_K_M, "blk.1.ffn_gate.weight", odd, m), GgmlType::kF16);
  EXPECT_EQ(mix_tensor_type(QuantMix::kQ8_0, "blk.1.ffn_gate.weight", odd, m), GgmlType::kF16);
}

TEST(GgufKQuantMix, NamesAndFileTypes) {
  const std::pair<QuantMix, uint32_t> mixes[] = {{QuantMix::kF32, 0},  {QuantMix::kF16, 1},    {QuantMix::kQ8_0, 7},
                                                 {QuantMix::kQ6_K, 18}, {QuantMix::kQ5_K_M, 17}, {QuantMix::kQ4_K_M, 15}};
  for (const auto& [mix, file_type] : mixes) {
    EXPECT_EQ(quant_mix_file_type(mix), file_type);
    EXPECT_EQ(quant_mix_from_name(quant_mix_name(mix)), mix);
  }
  EXPECT_FALSE(quant_mix_from_name("q4_k_s").has_value());
}

// llama.cpp's quantizer on three F32 files: the tensor types it picks are the mix's,
// and brigade's encoding of each F32 tensor in that type is llama.cpp's, byte for byte.
TEST(GgufKQuantOracle, MatchesLlamaCppQuantizer) {
  testing::TempDir dir;
  const testing::CommandResult run = run_oracle("models " + dir.path().string());
  if (run.exit_code == 3) GTEST_SKIP() << run.output;
  ASSERT_EQ(run.exit_code, 0) << run.output;

  const std::pair<const char*, QuantMix> mixes[] = {
      {"q4_k_m", QuantMix::kQ4_K_M}, {"q5_k_m", QuantMix::kQ5_K_M}, {"q6_k", QuantMix::kQ6_K}, {"q8_0", QuantMix::kQ8_0}};
  struct Tally {
    int64_t tensors = 0, blocks = 0, differing_blocks = 0;
    double ours_sq = 0, llama_sq = 0, values = 0;  // squared dequantization errors
  };
  std::map<std::string, Tally> by_type;
  int matched = 0, total = 0;
  for (const char* model : {"dense", "wide", "moe"}) {
    const Gguf f32(dir / (std::string(model) + ".f32.gguf"));
    const std::string arch = "llama";
    const MixModel facts{.architecture = arch,
                         .n_layers = f32.metadata_int(arch + ".block_count", 0),
                         .n_heads = f32.metadata_int(arch + ".attention.head_count", 0),
                         .n_kv_heads = f32.metadata_int(arch + ".attention.head_count_kv", 0),
                         .n_experts = f32.metadata_int(arch + ".expert_count", 0),
                         .has_output = f32.file.find_tensor("output.weight") != nullptr};
    for (const auto& [mix_name, mix] : mixes) {
      const Gguf quantized(dir / (std::string(model) + "." + mix_name + ".gguf"));
      EXPECT_EQ(quantized.metadata_int("general.file_type", -1), quant_mix_file_type(mix)) << mix_name;
      ASSERT_EQ(quantized.file.tensors.size(), f32.file.tensors.size());
      for (const TensorInfo& source : f32.file.tensors) {
        const TensorInfo* theirs = quantized.file.find_tensor(source.name);
        ASSERT_NE(theirs, nullptr) << source.name;
        const GgmlType ours = mix_tensor_type(mix, source.name, source.ne, facts);
        ++total;
        if (ours == theirs->type) ++matched;
        EXPECT_EQ(ggml_type_name(ours), ggml_type_name(theirs->type)) << model << " " << mix_name << " " << source.name;
        if (ours != theirs->type || ours == GgmlType::kF32) continue;

        const std::vector<float> x = f32.floats(source);
        const std::vector<uint8_t> bytes = encode(ours, x);
        const std::span<const uint8_t> expected = quantized.data(*theirs);
        ASSERT_EQ(bytes.size(), expected.size()) << source.name;
        Tally& tally = by_type[ggml_type_name(ours)];
        const auto block_bytes = static_cast<size_t>(ggml_block_bytes(ours));
        ++tally.tensors;
        for (size_t at = 0; at < bytes.size(); at += block_bytes) {
          ++tally.blocks;
          if (std::memcmp(bytes.data() + at, expected.data() + at, block_bytes) != 0) ++tally.differing_blocks;
        }
        const std::vector<float> ours_back = decoded(ours, bytes, source.numel());
        const std::vector<float> their_back = decoded(ours, expected, source.numel());
        const double n = static_cast<double>(x.size());
        tally.ours_sq += std::pow(rms_error(x, ours_back), 2) * n;
        tally.llama_sq += std::pow(rms_error(x, their_back), 2) * n;
        tally.values += n;
      }
    }
  }
  std::printf("tensor types matching llama.cpp: %d/%d\n", matched, total);
  EXPECT_EQ(matched, total);
  for (const auto& [type, t] : by_type) {
    const double ours = std::sqrt(t.ours_sq / t.values), llama = std::sqrt(t.llama_sq / t.values);
    std::printf("%-5s %3lld tensors, %6lld blocks, %lld differ from llama.cpp; RMS error %.6g (llama.cpp %.6g)\n",
                type.c_str(), static_cast<long long>(t.tensors), static_cast<long long>(t.blocks),
                static_cast<long long>(t.differing_blocks), ours, llama);
    EXPECT_EQ(t.differing_blocks, 0) << type;
    EXPECT_LE(ours, 1.01 * llama) << type;
  }
  for (const char* type : {"Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"})
    EXPECT_TRUE(by_type.contains(type)) << type << " was not exercised";
}

// brigade's encodings decode in gguf-py (gguf.quants.dequantize) to what brigade's own
// decoder gives, bit for bit: the layouts are the ones every reader expects.
TEST(GgufKQuantOracle, GgufPyDecodesBrigadeEncoding) {
  testing::TempDir dir;
  const int64_t rows = 3, cols = 2 * kSuperBlockSize;
  std::vector<EncodedTensor> tensors;
  for (GgmlType type : {GgmlType::kQ4_K, GgmlType::kQ5_K, GgmlType::kQ6_K, GgmlType::kQ5_0, GgmlType::kQ5_1}) {
    const std::vector<float> x = gaussian(rows * cols, static_cast<uint32_t>(type), 0.02f);
    tensors.push_back({.name = ggml_type_name(type), .ne = {cols, rows}, .type = type, .data = encode(type, x)});
  }
  const std::vector<uint8_t> file = serialize_gguf({{"general.architecture", Value(Scalar(std::string("llama")))}},
                                                   tensors);
  write_file_atomic(dir / "ours.gguf", std::string(file.begin(), file.end()));
  const testing::CommandResult run =
      run_oracle("dequant " + (dir / "ours.gguf").string() + " " + (dir / "theirs.gguf").string());
  if (run.exit_code == 3) GTEST_SKIP() << run.output;
  ASSERT_EQ(run.exit_code, 0) << run.output;

  const Gguf theirs(dir / "theirs.gguf");
  for (const EncodedTensor& t : tensors) {
    const TensorInfo* info = theirs.file.find_tensor(t.name);
    ASSERT_NE(info, nullptr) << t.name;
    ASSERT_EQ(info->type, GgmlType::kF32);
    ASSERT_EQ(info->ne, t.ne);
    const std::vector<float> ours = decoded(t.type, t.data, rows * cols);
    const std::vector<float> reference = theirs.floats(*info);
    ASSERT_EQ(std::memcmp(ours.data(), reference.data(), ours.size() * sizeof(float)), 0) << t.name;
  }
}

}  // namespace
}  // namespace brigade::model::gguf
