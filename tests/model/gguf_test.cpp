// GGUF: the byte format (round trips, corrupt files), the ggml quantizers against
// gguf-py's reference, the model export as gguf-py sees it, and llama.cpp running
// the exported models (greedy parity with brigade's own generation).
#include <gtest/gtest.h>

#include <map>

#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <iostream>
#include <random>
#include <set>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "data/bpe.h"
#include "model/generate.h"
#include "model/gguf.h"
#include "model/gguf_export.h"
#include "tests/model/gguf_testing.h"
#include "tests/testing.h"

namespace brigade::model {
namespace {

namespace fs = std::filesystem;
using gguf::GgmlType;
using gguf::Scalar;
using gguf::Value;
using gguf::ValueType;
using testing::TempDir;
using namespace gguf_testing;

void write_bytes(const fs::path& path, std::span<const uint8_t> bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

uint16_t half_bits(float x) { return torch::tensor(x).to(torch::kHalf).view(torch::kInt16).item<int16_t>(); }

// ---------------------------------------------------------------------------------
// fp16 / bf16 conversions against torch (round to nearest even).

TEST(GgufFormat, HalfConversionsMatchTorch) {
  // Every half bit pattern decodes as torch decodes it.
  auto all = torch::arange(0, 65536, torch::kInt32).to(torch::kInt16).view(torch::kHalf).to(torch::kFloat32);
  for (int bits = 0; bits < 65536; ++bits) {
    const float ours = gguf::fp16_to_fp32(static_cast<uint16_t>(bits));
    const float theirs = all[bits].item<float>();
    if (std::isnan(theirs)) {
      EXPECT_TRUE(std::isnan(ours)) << bits;
    } else {
      ASSERT_EQ(ours, theirs) << "half bits " << bits;
    }
  }
  // Encoding: random values over the whole range, subnormals and exact ties.
  std::mt19937 rng(7);
  std::vector<float> values = {0.0f, -0.0f, 65504.0f, 65519.0f, 65520.0f, 1e9f, -1e9f, 5.96e-8f, 2.98e-8f,
                               2.99e-8f, 1e-10f, INFINITY, -INFINITY};
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> exponent(-30.0f, 17.0f);
  for (int i = 0; i < 20000; ++i) values.push_back(normal(rng) * std::exp2(exponent(rng)));
  for (int bits = 0; bits < 0x7bff; bits += 7) {  // midpoints between neighbouring halves: ties
    values.push_back(0.5f * (gguf::fp16_to_fp32(bits) + gguf::fp16_to_fp32(bits + 1)));
    values.push_back(-values.back());
  }
  auto expected = torch::tensor(values).to(torch::kHalf).view(torch::kInt16);
  auto expected_bf16 = torch::tensor(values).to(torch::kBFloat16).view(torch::kInt16);
  for (size_t i = 0; i < values.size(); ++i) {
    ASSERT_EQ(gguf::fp32_to_fp16(values[i]), static_cast<uint16_t>(expected[i].item<int16_t>()))
        << "value " << values[i];
    ASSERT_EQ(gguf::fp32_to_bf16(values[i]), static_cast<uint16_t>(expected_bf16[i].item<int16_t>()))
        << "value " << values[i];
  }
  EXPECT_EQ(gguf::fp32_to_fp16(1.0f), half_bits(1.0f));
}

// ---------------------------------------------------------------------------------
// Writer / reader round trip.

std::vector<std::pair<std::string, Value>> every_value_type() {
  return {
      {"t.u8", Scalar(uint8_t{200})},
      {"t.i8", Scalar(int8_t{-100})},
      {"t.u16", Scalar(uint16_t{60000})},
      {"t.i16", Scalar(int16_t{-30000})},
      {"t.u32", Scalar(uint32_t{4000000000u})},
      {"t.i32", Scalar(int32_t{-2000000000})},
      {"t.f32", Scalar(1.5f)},
      {"t.bool", Scalar(true)},
      {"t.str", Scalar(std::string("héllo\n\0x", 9))},
      {"t.u64", Scalar(uint64_t{1} << 63)},
      {"t.i64", Scalar(int64_t{-1} << 62)},
      {"t.f64", Scalar(-2.25e300)},
      {"t.arr_i32", Value::array(ValueType::kInt32, {Scalar(int32_t{1}), Scalar(int32_t{-2}), Scalar(int32_t{3})})},
      {"t.arr_str", Value::strings({"a", "", "Ġthe"})},
      {"t.arr_f64", Value::array(ValueType::kFloat64, {Scalar(0.5), Scalar(-1e-300)})},
      {"t.arr_bool", Value::array(ValueType::kBool, {Scalar(false), Scalar(true)})},
      {"t.arr_empty", Value::array(ValueType::kUint64, {})},
  };
}

TEST(GgufFormat, WriterReaderRoundTrip) {
  TempDir dir;
  torch::manual_seed(3);
  GgufWriter writer;
  for (auto& [key, value] : every_value_type()) writer.set(key, value);
  writer.set("general.alignment", Scalar(uint32_t{64}));
  const auto f32 = torch::randn({3, 5});
  const auto f16 = torch::randn({2, 3, 4});
  const auto bf16 = torch::randn({7});
  const auto q8 = torch::randn({2, 64});
  const auto q4 = torch::randn({3, 32});
  writer.add_tensor("f32", f32, GgmlType::kF32);
  writer.add_tensor("f16", f16, GgmlType::kF16);
  writer.add_tensor("bf16", bf16, GgmlType::kBF16);
  writer.add_tensor("q8", q8, GgmlType::kQ8_0);
  writer.add_tensor("q4", q4, GgmlType::kQ4_0);
  writer.write(dir / "a.gguf");

  GgufReader reader(dir / "a.gguf");
  EXPECT_EQ(reader.file().version, 3u);
  EXPECT_EQ(reader.file().alignment, 64u);
  EXPECT_EQ(reader.file().data_offset % 64, 0u);
  for (auto& [key, value] : every_value_type()) {
    const Value& read = reader.metadata(key);
    EXPECT_EQ(read.type, value.type) << key;
    if (value.type == ValueType::kArray) {
      EXPECT_EQ(read.element_type, value.element_type) << key;
      EXPECT_EQ(read.elements, value.elements) << key;
    } else {
      EXPECT_EQ(read.scalar, value.scalar) << key;
    }
  }
  EXPECT_EQ(reader.metadata("t.u64").as_float("t.u64"), std::ldexp(1.0, 63));
  EXPECT_BRIGADE_ERROR(reader.metadata("t.u64").as_int("t.u64"), "not an integer in int64 range");
  EXPECT_EQ(reader.metadata("t.arr_str").as_strings("t.arr_str"), (std::vector<std::string>{"a", "", "Ġthe"}));
  EXPECT_BRIGADE_ERROR(reader.metadata("nope"), "no metadata key 'nope'");
  EXPECT_BRIGADE_ERROR(reader.tensor("nope"), "no tensor 'nope'");

  EXPECT_EQ(reader.info("f16").ne, (std::vector<int64_t>{4, 3, 2}));  // innermost first
  for (const auto& t : reader.file().tensors) EXPECT_EQ(t.offset % 64, 0u) << t.name;
  EXPECT_TRUE(torch::equal(reader.tensor("f32"), f32));
  EXPECT_TRUE(torch::equal(reader.tensor("f16"), f16.to(torch::kHalf).to(torch::kFloat32)));
  EXPECT_TRUE(torch::equal(reader.tensor("bf16"), bf16.to(torch::kBFloat16).to(torch::kFloat32)));
  EXPECT_EQ(reader.tensor("q8").sizes(), q8.sizes());
  EXPECT_EQ(reader.info("q8").nbytes, 2u * 2 * 34);
  EXPECT_EQ(reader.info("q4").nbytes, 3u * 18);
  EXPECT_LT((reader.tensor("q8") - q8).abs().max().item<float>(), 0.03f);
  EXPECT_LT((reader.tensor("q4") - q4).abs().max().item<float>(), 0.5f);

  // The same file through gguf-py.
  auto run = run_check("inspect", dir / "a.gguf");
  if (run.exit_code == 3) GTEST_SKIP() << "gguf python package missing: " << run.output;
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const auto seen = last_json_line(run.output);
  EXPECT_EQ(seen["metadata"]["t.u8"], 200);
  EXPECT_EQ(seen["metadata"]["t.i16"], -30000);
  EXPECT_EQ(seen["metadata"]["t.u64"], uint64_t{1} << 63);
  EXPECT_EQ(seen["metadata"]["t.f64"], -2.25e300);
  EXPECT_EQ(seen["metadata"]["t.bool"], true);
  EXPECT_EQ(seen["metadata"]["t.arr_str"], nlohmann::json({"a", "", "Ġthe"}));
  EXPECT_EQ(seen["metadata"]["t.arr_i32"], nlohmann::json({1, -2, 3}));
  EXPECT_EQ(seen["types"]["t.arr_f64"], "ARRAY/FLOAT64");
  EXPECT_EQ(seen["types"]["t.f32"], "FLOAT32");
  EXPECT_EQ(seen["metadata"]["general.alignment"], 64);
  const nlohmann::json tensors = seen["tensors"];
  ASSERT_EQ(tensors.size(), 5u);
  EXPECT_EQ(tensors[1]["name"], "f16");
  EXPECT_EQ(tensors[1]["shape"], nlohmann::json({4, 3, 2}));
  EXPECT_EQ(tensors[2]["type"], "BF16");
  EXPECT_EQ(tensors[3]["type"], "Q8_0");
  EXPECT_EQ(tensors[4]["type"], "Q4_0");
}

TEST(GgufFormat, ReadsGgufPyFile) {
  TempDir dir;
  auto run = run_check("write", dir / "py.gguf");
  if (run.exit_code == 3) GTEST_SKIP() << "gguf python package missing: " << run.output;
  ASSERT_EQ(run.exit_code, 0) << run.output;
  GgufReader reader(dir / "py.gguf");
  EXPECT_EQ(reader.metadata("general.architecture").as_string("a"), "llama");
  EXPECT_EQ(reader.metadata("x.u32").as_int("x"), 7);
  EXPECT_EQ(reader.metadata("x.i64").as_int("x"), -5);
  EXPECT_EQ(reader.metadata("x.f32").as_float("x"), 0.25);
  EXPECT_TRUE(reader.metadata("x.bool").as_bool("x"));
  EXPECT_EQ(reader.metadata("x.str").as_string("x"), "héllo");
  EXPECT_EQ(reader.metadata("x.ints").as_ints("x"), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(reader.metadata("x.strs").as_strings("x"), (std::vector<std::string>{"a", "bc"}));
  EXPECT_TRUE(torch::equal(reader.tensor("f32"), torch::arange(12, torch::kFloat32).reshape({3, 4})));
  EXPECT_EQ(reader.info("f16").type, GgmlType::kF16);
  EXPECT_TRUE(torch::equal(reader.tensor("f16"), torch::arange(6, torch::kFloat32).reshape({2, 3})));
  for (const char* name : {"q8", "q4"}) {
    EXPECT_EQ(reader.info(name).type, std::string(name) == "q8" ? GgmlType::kQ8_0 : GgmlType::kQ4_0);
    // brigade's dequantization equals gguf-py's.
    EXPECT_TRUE(torch::equal(reader.tensor(name), reader.tensor(std::string(name) + ".ref"))) << name;
  }
}

// Every other block type a published GGUF uses (the legacy Q4_1 / Q5_0 / Q5_1, the
// K-quants Q2_K..Q6_K of the usual Q4_K_M / Q5_K_M / Q6_K mixes, IQ4_NL, IQ4_XS):
// random blocks (finite fp16 scales, every other byte random) dequantize exactly as
// gguf-py's gguf.quants.dequantize does, every value of every block.
TEST(GgufFormat, DequantizesEveryBlockTypeAsGgufPyBitForBit) {
  TempDir dir;
  auto run = run_check("quants", dir / "q.gguf");
  if (run.exit_code == 3) GTEST_SKIP() << "gguf python package missing: " << run.output;
  ASSERT_EQ(run.exit_code, 0) << run.output;
  GgufReader reader(dir / "q.gguf");
  const std::map<std::string, GgmlType> types = {
      {"Q4_1", GgmlType::kQ4_1}, {"Q5_0", GgmlType::kQ5_0}, {"Q5_1", GgmlType::kQ5_1}, {"IQ4_NL", GgmlType::kIQ4_NL},
      {"Q2_K", GgmlType::kQ2_K}, {"Q3_K", GgmlType::kQ3_K}, {"Q4_K", GgmlType::kQ4_K}, {"Q5_K", GgmlType::kQ5_K},
      {"Q6_K", GgmlType::kQ6_K}, {"IQ4_XS", GgmlType::kIQ4_XS}};
  for (const auto& [name, type] : types) {
    EXPECT_EQ(reader.info(name).type, type) << name;
    const auto ours = reader.tensor(name), theirs = reader.tensor(name + ".ref");
    ASSERT_EQ(ours.sizes(), theirs.sizes()) << name;
    EXPECT_EQ(ours.size(0), 3) << name;
    const int64_t differ = ours.ne(theirs).sum().item<int64_t>();
    EXPECT_EQ(differ, 0) << name << ": " << differ << " of " << ours.numel() << " values differ";
    EXPECT_GT(theirs.abs().max().item<float>(), 0.0f) << name;
    // Writing the types no export mix uses is not offered: a clear error, not a wrong file.
    if (type == GgmlType::kQ4_1 || type == GgmlType::kIQ4_NL || type == GgmlType::kQ2_K || type == GgmlType::kQ3_K ||
        type == GgmlType::kIQ4_XS) {
      EXPECT_BRIGADE_ERROR(gguf::encode(type, std::vector<float>(gguf::ggml_block_size(type), 0.5f)), "does not write it");
    }
  }
}

TEST(GgufFormat, WriterRejectsWhatGgufCannotHold) {
  GgufWriter writer;
  EXPECT_BRIGADE_ERROR(writer.add_tensor("w", torch::zeros({2, 48}), GgmlType::kQ8_0),
                       "rows of 48 values, which Q8_0 cannot store");
  EXPECT_BRIGADE_ERROR(writer.add_tensor("w", torch::zeros({1, 1, 1, 1, 1}), GgmlType::kF32), "5 dims");
  EXPECT_BRIGADE_ERROR(writer.add_tensor("w", torch::zeros({2}, torch::kInt64), GgmlType::kF32),
                       "not a floating-point tensor");
  EXPECT_BRIGADE_ERROR(Value::array(ValueType::kInt32, {Scalar(1.0f)}), "array of int32 holds a float32");
  TempDir dir;
  writer.set("general.alignment", Scalar(uint32_t{48}));
  EXPECT_BRIGADE_ERROR(writer.write(dir / "x.gguf"), "not a power of two");
}

// ---------------------------------------------------------------------------------
// Quantization: bytes against gguf-py's numpy reference, error bounds.

// Rows exercising the quantizers' corners: zeros, constants, a lone spike, ties of
// the rounding (values at exact multiples of d/2), tiny scales (subnormal fp16 d),
// large magnitudes, and the largest magnitude being negative or positive.
torch::Tensor quant_test_matrix() {
  torch::manual_seed(11);
  auto w = torch::randn({24, 256});
  w[0].zero_();
  w[1].fill_(0.75f);
  w[2].zero_();
  w[2][5] = -3.0f;
  w[3] = torch::arange(256, torch::kFloat32).remainder(32).sub(15.5f).mul(127.0f / 16.0f / 15.5f);
  w[4] = torch::arange(256, torch::kFloat32).remainder(17).sub(8.0f).mul(0.5f);
  w[5] *= 1e-6f;
  w[6] *= 1e-9f;
  w[7] *= 3000.0f;
  w[8] = torch::arange(256, torch::kFloat32).remainder(32).sub(8.0f);  // max magnitude positive (23)
  w[9] = -w[8];
  w[10] = torch::randint(-16, 17, {256}).to(torch::kFloat32).div(2.0f);  // many exact halves
  return w;
}

TEST(GgufQuant, BytesMatchGgufPyReference) {
  TempDir dir;
  const auto w = quant_test_matrix();
  GgufWriter writer;
  writer.add_tensor("w", w, GgmlType::kF32);
  writer.add_tensor("w.q8_0", w, GgmlType::kQ8_0);
  writer.add_tensor("w.q4_0", w, GgmlType::kQ4_0);
  writer.write(dir / "q.gguf");
  auto run = run_check("quant", dir / "q.gguf");
  if (run.exit_code == 3) GTEST_SKIP() << "gguf python package missing: " << run.output;
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const auto result = last_json_line(run.output);
  ASSERT_TRUE(result.contains("w.q8_0") && result.contains("w.q4_0")) << run.output;
  for (const char* name : {"w.q8_0", "w.q4_0"}) {
    EXPECT_EQ(result[name]["blocks"], 24 * 256 / 32) << name;
    EXPECT_EQ(result[name]["mismatched_blocks"], 0) << name << ": " << run.output;
  }
}

TEST(GgufQuant, DequantizationErrorBounds) {
  const auto w = quant_test_matrix();
  const std::span<const float> values(w.data_ptr<float>(), static_cast<size_t>(w.numel()));
  for (GgmlType type : {GgmlType::kQ8_0, GgmlType::kQ4_0}) {
    std::vector<uint8_t> bytes = gguf::encode(type, values);
    ASSERT_EQ(bytes.size(), *gguf::ggml_nbytes(type, w.numel()));
    std::vector<float> back(values.size());
    gguf::decode(type, bytes, back);
    for (size_t b = 0; b < values.size() / 32; ++b) {
      float amax = 0;
      for (size_t j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(values[b * 32 + j]));
      // Q8_0 rounds to steps of d = amax/127 (error <= d/2); Q4_0 to steps of
      // d = amax/8, and its top level (q = 15 is 7d) clips the opposite extreme (error <= d).
      // The fp16 scale adds a relative 2^-11 of each value, and fp16 underflow of tiny
      // scales an absolute 2^-24 * 127.
      const float step = type == GgmlType::kQ8_0 ? amax / 127.0f / 2.0f : amax / 8.0f;
      for (size_t j = 0; j < 32; ++j) {
        const size_t i = b * 32 + j;
        const float bound = step * 1.001f + std::fabs(values[i]) * 1e-3f + 1e-5f;
        ASSERT_LE(std::fabs(back[i] - values[i]), bound)
            << gguf::ggml_type_name(type) << " block " << b << " element " << j << " value " << values[i];
      }
    }
    // Zero and constant rows come back exactly; a mean error well below the bound.
    for (int j = 0; j < 256; ++j) {
      EXPECT_EQ(back[j], 0.0f);
      EXPECT_NEAR(back[256 + j], 0.75f, 1e-3f);
    }
    auto restored = torch::from_blob(back.data(), w.sizes(), torch::kFloat32);
    const double mean_err = (restored - w).slice(0, 11).abs().mean().item<double>();
    EXPECT_LT(mean_err, type == GgmlType::kQ8_0 ? 0.006 : 0.09) << gguf::ggml_type_name(type);
  }
  EXPECT_BRIGADE_ERROR(gguf::encode(GgmlType::kQ4_0, std::vector<float>(33)), "33 values cannot be encoded as Q4_0");
}

// ---------------------------------------------------------------------------------
// Corrupt files: each a brigade::Error naming the file and the field, never a crash.

// Little-endian byte builder for hand-made headers.
struct Bytes {
  std::vector<uint8_t> b;
  template <typename T>
  Bytes& put(T v) {
    const size_t at = b.size();
    b.resize(at + sizeof(T));
    std::memcpy(b.data() + at, &v, sizeof(T));
    return *this;
  }
  Bytes& u32(uint32_t v) { return put(v); }
  Bytes& u64(uint64_t v) { return put(v); }
  Bytes& i64(int64_t v) { return put(v); }
  Bytes& str(const std::string& s) {
    u64(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Bytes& pad(size_t alignment) {
    b.resize((b.size() + alignment - 1) / alignment * alignment, 0);
    return *this;
  }
  Bytes& zeros(size_t n) {
    b.resize(b.size() + n, 0);
    return *this;
  }
};

Bytes header(uint64_t tensors, uint64_t kvs) {
  Bytes h;
  h.u32(gguf::kMagic).u32(3).u64(tensors).u64(kvs);
  return h;
}

// A tensor info: name, dims (ne), ggml type id, offset.
void tensor_info(Bytes& h, const std::string& name, std::vector<int64_t> ne, uint32_t type, uint64_t offset) {
  h.str(name).u32(static_cast<uint32_t>(ne.size()));
  for (int64_t d : ne) h.i64(d);
  h.u32(type).u64(offset);
}

class GgufCorrupt : public ::testing::Test {
 protected:
  void expect_error(const Bytes& bytes, const std::string& message) { expect_error(bytes.b, message); }
  void expect_error(const std::vector<uint8_t>& bytes, const std::string& message) {
    const fs::path path = dir_ / "bad.gguf";
    write_bytes(path, bytes);
    try {
      GgufReader reader(path);
      ADD_FAILURE() << "expected brigade::Error containing '" << message << "'";
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(message), std::string::npos) << "error was: " << what;
      EXPECT_NE(what.find("GGUF file " + path.string()), std::string::npos) << "error does not name the file: " << what;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "expected brigade::Error containing '" << message << "', got: " << e.what();
    }
  }
  TempDir dir_;
};

TEST_F(GgufCorrupt, MagicAndVersion) {
  expect_error(Bytes{}, "truncated (0 bytes), not a GGUF file");
  Bytes bad_magic;
  bad_magic.u32(0x46554748).u32(3).u64(0).u64(0);
  expect_error(bad_magic, "bad magic");
  Bytes v1;
  v1.u32(gguf::kMagic).u32(1).u64(0).u64(0);
  expect_error(v1, "unsupported GGUF version 1");
  Bytes big_endian;
  big_endian.u32(gguf::kMagic).u32(0x03000000).u64(0).u64(0);
  expect_error(big_endian, "big-endian");
  expect_error(Bytes{}.u32(gguf::kMagic).u32(3).u32(0), "truncated at byte 8 reading tensor_count");
}

TEST_F(GgufCorrupt, HugeCountsAndLengths) {
  expect_error(header(0, uint64_t{1} << 60), "metadata_kv_count 1152921504606846976 cannot fit");
  expect_error(header(~uint64_t{0}, 0), "tensor_count 18446744073709551615 cannot fit");
  Bytes long_key = header(0, 1);
  long_key.u64(uint64_t{1} << 62).zeros(16);
  expect_error(long_key, "metadata key 0 has length 4611686018427387904 but only 16 bytes are left");
  Bytes long_string = header(0, 1);
  long_string.str("k").u32(8).u64(~uint64_t{0}).zeros(16);
  expect_error(long_string, "metadata 'k' has length 18446744073709551615");
  Bytes long_array = header(0, 1);
  long_array.str("arr").u32(9).u32(5).u64(uint64_t{1} << 60).zeros(64);
  expect_error(long_array, "metadata 'arr' has array length 1152921504606846976 but only 64 bytes");
  Bytes string_array = header(0, 1);  // strings take at least 8 bytes each
  string_array.str("arr").u32(9).u32(8).u64(9).zeros(64);
  expect_error(string_array, "array length 9 but only 64 bytes");
  Bytes long_name = header(1, 0);
  long_name.u64(1000).zeros(30);
  expect_error(long_name, "tensor 0 name has length 1000");
}

TEST_F(GgufCorrupt, BadValueTypes) {
  Bytes unknown = header(0, 1);
  unknown.str("k").u32(13).u32(0);
  expect_error(unknown, "metadata 'k' has unknown value type 13");
  Bytes element = header(0, 1);
  element.str("k").u32(9).u32(77).u64(0);
  expect_error(element, "metadata 'k' has unknown array element type 77");
  Bytes nested = header(0, 1);
  nested.str("k").u32(9).u32(9).u64(0);
  expect_error(nested, "metadata 'k' is an array of arrays");
  Bytes boolean = header(0, 1);
  boolean.str("k").u32(7).put<uint8_t>(2);
  expect_error(boolean, "metadata 'k' is a bool with byte value 2");
  Bytes duplicate = header(0, 2);
  duplicate.str("k").u32(4).u32(1).str("k").u32(4).u32(2);
  expect_error(duplicate, "duplicate metadata key 'k'");
  Bytes alignment = header(0, 1);
  alignment.str("general.alignment").u32(4).u32(24);
  expect_error(alignment, "general.alignment 24 is not a power of two");
  Bytes alignment_type = header(0, 1);
  alignment_type.str("general.alignment").u32(10).u64(32);
  expect_error(alignment_type, "general.alignment is a uint64 (uint32 expected)");
}

TEST_F(GgufCorrupt, BadTensorInfos) {
  auto file = [](const std::string& name, std::vector<int64_t> ne, uint32_t type, uint64_t offset, size_t data) {
    Bytes h = header(1, 0);
    tensor_info(h, name, std::move(ne), type, offset);
    h.pad(32).zeros(data);
    return h;
  };
  {  // control: the same file intact reads

    const fs::path path = dir_ / "ok.gguf";
    write_bytes(path, file("t", {4}, 0, 0, 16).b);
    GgufReader ok(path);
    EXPECT_EQ(ok.info("t").nbytes, 16u);
  }
  expect_error(file("t", {4}, 0, 0, 15), "tensor 't' (16 bytes at data offset 0) extends past the end of the file");
  expect_error(file("t", {4}, 0, 32, 40), "extends past the end of the file");
  expect_error(file("t", {4}, 0, ~uint64_t{0} - 31, 40), "extends past the end");  // no wrap-around near 2^64
  expect_error(file("t", {4}, 0, 8, 40), "tensor 't' has offset 8, not a multiple of the alignment 32");
  expect_error(file("t", {4}, 16, 0, 16), "tensor 't' has ggml type 16, which brigade does not read");  // IQ2_XXS
  expect_error(file("t", {4}, 1000, 0, 16), "ggml type 1000");
  expect_error(file("t", {4, 1, 1, 1, 1}, 0, 0, 16), "tensor 't' has n_dims 5");
  expect_error(file("t", {}, 0, 0, 16), "tensor 't' has n_dims 0");
  expect_error(file("t", {-4}, 0, 0, 16), "tensor 't' has negative ne[0] = -4");
  expect_error(file("t", {int64_t{1} << 40, int64_t{1} << 40}, 0, 0, 16), "ne overflows int64");
  expect_error(file("t", {int64_t{1} << 62}, 0, 0, 16), "is too large");  // 2^62 floats: 2^64 bytes
  expect_error(file("t", {48}, 8, 0, 64), "tensor 't' of type Q8_0 has ne[0] = 48, not a multiple of the block size 32");

  Bytes overlap = header(2, 0);
  tensor_info(overlap, "a", {16}, 0, 0);
  tensor_info(overlap, "b", {16}, 0, 32);
  overlap.pad(32).zeros(128);
  expect_error(overlap, "tensors 'a' and 'b' overlap");
  Bytes duplicate = header(2, 0);
  tensor_info(duplicate, "a", {4}, 0, 0);
  tensor_info(duplicate, "a", {4}, 0, 32);
  duplicate.pad(32).zeros(64);
  expect_error(duplicate, "duplicate tensor name 'a'");
  Bytes no_data = header(1, 0);
  tensor_info(no_data, "a", {4}, 0, 0);
  expect_error(no_data, "truncated: the data section would start at byte");
}

// A small valid file with every metadata type and several tensors.
std::vector<uint8_t> sample_file() {
  std::vector<std::pair<std::string, Value>> metadata = every_value_type();
  std::vector<gguf::EncodedTensor> tensors;
  std::vector<float> values(64);
  for (size_t i = 0; i < values.size(); ++i) values[i] = std::sin(static_cast<float>(i));
  tensors.push_back({"a", {8, 2}, GgmlType::kF32, gguf::encode(GgmlType::kF32, {values.data(), 16})});
  tensors.push_back({"b", {32, 2}, GgmlType::kQ4_0, gguf::encode(GgmlType::kQ4_0, values)});
  tensors.push_back({"c", {16, 1}, GgmlType::kF16, gguf::encode(GgmlType::kF16, {values.data(), 16})});
  return gguf::serialize_gguf(metadata, tensors);
}

TEST_F(GgufCorrupt, TruncatedAtEveryByte) {
  const std::vector<uint8_t> bytes = sample_file();
  ASSERT_EQ(bytes.size() % 32, 0u);  // the last tensor fills its padding: every cut loses data
  const gguf::File whole = gguf::parse_gguf(bytes, "sample");
  ASSERT_EQ(whole.tensors.size(), 3u);
  for (size_t cut = 0; cut < bytes.size(); ++cut) {
    try {
      gguf::parse_gguf(std::span(bytes).first(cut), "GGUF file cut.gguf");
      ADD_FAILURE() << "a file cut at byte " << cut << " of " << bytes.size() << " parsed";
    } catch (const Error& e) {
      ASSERT_NE(std::string(e.what()).find("GGUF file cut.gguf: "), std::string::npos) << e.what();
      ASSERT_TRUE(std::string(e.what()).find("truncated") != std::string::npos ||
                  std::string(e.what()).find("left in the file") != std::string::npos ||
                  std::string(e.what()).find("past the end") != std::string::npos)
          << "cut " << cut << ": " << e.what();
    }
  }
  // A few cuts through the reader as well (the message names the path).
  for (size_t cut : {size_t{0}, size_t{3}, size_t{20}, bytes.size() / 2, bytes.size() - 1})
    expect_error(std::vector<uint8_t>(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(cut)), "");
}

TEST_F(GgufCorrupt, RandomByteFlipsNeverCrash) {
  const std::vector<uint8_t> bytes = sample_file();
  std::mt19937 rng(1234);
  int errors = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<uint8_t> bad = bytes;
    const int flips = 1 + trial % 4;
    for (int f = 0; f < flips; ++f) {
      const size_t at = rng() % std::min<size_t>(bad.size(), 600);  // the header, mostly
      bad[at] = trial % 3 == 0 ? static_cast<uint8_t>(rng()) : static_cast<uint8_t>(bad[at] ^ (1u << (rng() % 8)));
    }
    try {
      gguf::parse_gguf(bad, "flipped");
    } catch (const Error&) {
      ++errors;
    }  // anything else (bad_alloc, length_error) fails the test
  }
  EXPECT_GT(errors, 500);
}

// ---------------------------------------------------------------------------------
// Model export.

TransformerOptions small_options(HfFamily family, bool tied) {
  TransformerOptions o;
  o.vocab_size = 264;
  o.d_model = 64;
  o.n_layers = 2;
  o.n_heads = 4;
  o.n_kv_heads = 2;
  o.max_seq_len = 256;
  o.tie_embeddings = tied;
  o.qkv_bias = family == HfFamily::kQwen2;
  o.qk_norm = family == HfFamily::kQwen3;
  o.rope_theta = 10000.0;
  o.norm_eps = 1e-6;
  o.init_std = 0.3;
  return o;
}

std::string expected_pre(const data::BpeTokenizer& tokenizer) {
  const std::string pre = tokenizer.pre_tokenizer();
  return pre == "gpt2" ? "gpt-2" : pre;
}

TEST(GgufExport, TensorNamesAndRopePermutation) {
  EXPECT_EQ(gguf_tensor_name("embed_tokens.weight"), "token_embd.weight");
  EXPECT_EQ(gguf_tensor_name("layers.11.self_attn.q_proj.bias"), "blk.11.attn_q.bias");
  EXPECT_EQ(gguf_tensor_name("layers.0.self_attn.k_norm.weight"), "blk.0.attn_k_norm.weight");
  EXPECT_EQ(gguf_tensor_name("layers.3.mlp.down_proj.weight"), "blk.3.ffn_down.weight");
  EXPECT_EQ(gguf_tensor_name("layers.3.post_attention_layernorm.weight"), "blk.3.ffn_norm.weight");
  EXPECT_EQ(gguf_tensor_name("norm.weight"), "output_norm.weight");
  EXPECT_EQ(gguf_tensor_name("lm_head.weight"), "output.weight");
  EXPECT_BRIGADE_ERROR(gguf_tensor_name("layers.0.mlp.experts.gate_up_proj"), "no llama.cpp tensor name");
  // Two heads of head_dim 4: rows (0 1 | 2 3) of each head become (0 2 1 3): the
  // rotate-half pairs (i, i + hd/2) become adjacent, as convert_hf_to_gguf.py permutes.
  auto rows = torch::arange(8, torch::kFloat32).unsqueeze(1).repeat({1, 3});
  auto permuted = permute_for_interleaved_rope(rows, 2);
  EXPECT_TRUE(torch::equal(permuted.select(1, 0), torch::tensor({0.f, 2.f, 1.f, 3.f, 4.f, 6.f, 5.f, 7.f})));
  EXPECT_TRUE(torch::equal(permute_for_interleaved_rope(torch::arange(8, torch::kFloat32), 2),
                           torch::tensor({0.f, 2.f, 1.f, 3.f, 4.f, 6.f, 5.f, 7.f})));
}

TEST(GgufExport, QuantChoices) {
  EXPECT_EQ(parse_gguf_quant("q8_0"), GgufQuant::kQ8_0);
  EXPECT_EQ(parse_gguf_quant("f16"), GgufQuant::kF16);
  EXPECT_EQ(gguf_quant_name(GgufQuant::kQ4_0), "q4_0");
  EXPECT_BRIGADE_ERROR(parse_gguf_quant("q5_k"), "unknown GGUF quantization 'q5_k' (choices: f32, f16, q8_0, q4_0, q6_k, q5_k_m, q4_k_m)");
  EXPECT_EQ(parse_gguf_quant("q4_k_m"), GgufQuant::kQ4_K_M);
  EXPECT_EQ(gguf_quant_name(GgufQuant::kQ5_K_M), "q5_k_m");
}

TEST(GgufExport, RejectsMoEAndMismatchedFamilies) {
  TempDir dir;
  const auto tokenizer = data::BpeTokenizer::from_byte_tokenizer();
  auto o = small_options(HfFamily::kLlama, true);
  o.moe.num_experts = 4;
  o.moe.top_k = 2;
  o.moe.first_k_dense = 1;
  EXPECT_BRIGADE_ERROR(export_gguf(Transformer(o), HfFamily::kLlama, tokenizer, GgufQuant::kF32, dir / "m.gguf", "m"),
                       "GGUF export covers dense llama/qwen2/qwen3 models only");
  Transformer qwen3 = make_model(small_options(HfFamily::kQwen3, true), 1);
  EXPECT_BRIGADE_ERROR(export_gguf(qwen3, HfFamily::kLlama, tokenizer, GgufQuant::kF32, dir / "m.gguf", "m"),
                       "q/k norm");
  EXPECT_BRIGADE_ERROR(export_gguf(qwen3, HfFamily::kQwen2, tokenizer, GgufQuant::kF32, dir / "m.gguf", "m"),
                       "qwen2 has QKV bias");
  auto tiny = small_options(HfFamily::kLlama, true);
  tiny.vocab_size = 200;  // fewer rows than the tokenizer's 261 tokens
  EXPECT_BRIGADE_ERROR(export_gguf(make_model(tiny, 1), HfFamily::kLlama, tokenizer, GgufQuant::kF32,
                                   dir / "m.gguf", "m"),
                       "the tokenizer has 261 tokens but the model only 200 embedding rows");
  EXPECT_FALSE(fs::exists(dir / "m.gguf"));
}

TEST(GgufExport, ReaderAndGgufPySeeTheModel) {
  TempDir dir;
  const auto tokenizer = data::BpeTokenizer::from_byte_tokenizer();
  auto o = small_options(HfFamily::kQwen2, false);
  o.d_ff = 80;  // ffn_down rows of 80 values: no whole Q8_0 blocks, so F16
  Transformer model = make_model(o, 5);
  export_gguf(model, HfFamily::kQwen2, tokenizer, GgufQuant::kQ8_0, dir / "m.gguf", "tiny-qwen2");

  // brigade's reader: dequantized weights close to the model's.
  GgufReader reader(dir / "m.gguf");
  EXPECT_EQ(reader.metadata("general.architecture").as_string("a"), "qwen2");
  EXPECT_EQ(reader.info("blk.0.ffn_down.weight").type, GgmlType::kF16);
  EXPECT_EQ(reader.info("blk.0.ffn_gate.weight").type, GgmlType::kQ8_0);
  EXPECT_EQ(reader.info("blk.0.attn_q.bias").type, GgmlType::kF32);
  std::map<std::string, torch::Tensor> state;
  for (auto& [name, t] : model->state_dict()) state.emplace(name, t);
  size_t count = 0;
  for (const auto& [name, t] : state) {
    const torch::Tensor read = reader.tensor(gguf_tensor_name(name));
    ASSERT_EQ(read.sizes(), t.sizes()) << name;
    const double tolerance = t.dim() == 1 ? 0.0 : 0.01 * t.abs().max().item<double>();
    EXPECT_LE((read - t).abs().max().item<double>(), tolerance) << name;
    ++count;
  }
  EXPECT_EQ(reader.file().tensors.size(), count);

  auto run = run_check("inspect", dir / "m.gguf");
  if (run.exit_code == 3) GTEST_SKIP() << "gguf python package missing: " << run.output;
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const auto seen = last_json_line(run.output);
  const auto& md = seen["metadata"];
  EXPECT_EQ(md["general.architecture"], "qwen2");
  EXPECT_EQ(md["general.name"], "tiny-qwen2");
  EXPECT_EQ(md["general.file_type"], 7);
  EXPECT_EQ(md["general.quantization_version"], 2);
  EXPECT_EQ(md["qwen2.context_length"], 256);
  EXPECT_EQ(md["qwen2.embedding_length"], 64);
  EXPECT_EQ(md["qwen2.block_count"], 2);
  EXPECT_EQ(md["qwen2.feed_forward_length"], 80);
  EXPECT_EQ(md["qwen2.attention.head_count"], 4);
  EXPECT_EQ(md["qwen2.attention.head_count_kv"], 2);
  EXPECT_EQ(md["qwen2.attention.key_length"], 16);
  EXPECT_EQ(md["qwen2.attention.value_length"], 16);
  EXPECT_EQ(md["qwen2.rope.dimension_count"], 16);
  EXPECT_FLOAT_EQ(md["qwen2.attention.layer_norm_rms_epsilon"].get<float>(), 1e-6f);
  EXPECT_FLOAT_EQ(md["qwen2.rope.freq_base"].get<float>(), 10000.0f);
  EXPECT_EQ(seen["types"]["qwen2.attention.layer_norm_rms_epsilon"], "FLOAT32");
  EXPECT_EQ(seen["types"]["qwen2.block_count"], "UINT32");
  EXPECT_EQ(md["tokenizer.ggml.model"], "gpt2");
  EXPECT_EQ(md["tokenizer.ggml.pre"], expected_pre(tokenizer));
  const auto& tokens = md["tokenizer.ggml.tokens"];
  const auto& types = md["tokenizer.ggml.token_type"];
  ASSERT_EQ(tokens.size(), 264u);
  ASSERT_EQ(types.size(), 264u);
  EXPECT_EQ(seen["types"]["tokenizer.ggml.token_type"], "ARRAY/INT32");
  EXPECT_EQ(tokens[65], tokenizer.tokens()[65]);
  EXPECT_EQ(types[65], 1);
  EXPECT_EQ(tokens[tokenizer.bos_id()], "<|bos|>");
  EXPECT_EQ(types[tokenizer.bos_id()], 3);
  EXPECT_EQ(tokens[263], "[PAD263]");
  EXPECT_EQ(types[263], 5);
  EXPECT_EQ(md["tokenizer.ggml.bos_token_id"], tokenizer.bos_id());
  EXPECT_EQ(md["tokenizer.ggml.eos_token_id"], tokenizer.eos_id());
  EXPECT_EQ(md["tokenizer.ggml.padding_token_id"], tokenizer.pad_id());
  EXPECT_EQ(md["tokenizer.ggml.add_bos_token"], true);  // brigade trains every document BOS-first
  EXPECT_TRUE(md.contains("tokenizer.ggml.merges"));

  std::map<std::string, std::pair<nlohmann::json, std::string>> tensors;
  for (const auto& t : seen["tensors"]) tensors[t["name"]] = {t["shape"], t["type"]};
  const std::vector<std::string> expected_names = {
      "token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_norm.weight",
      "blk.1.attn_q.weight", "blk.1.attn_q.bias", "blk.1.attn_k.weight", "blk.1.attn_k.bias",
      "blk.1.attn_v.weight", "blk.1.attn_v.bias", "blk.1.attn_output.weight", "blk.1.ffn_norm.weight",
      "blk.1.ffn_gate.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight"};
  for (const auto& name : expected_names) EXPECT_TRUE(tensors.count(name)) << name;
  EXPECT_EQ(tensors.size(), 3u + 2 * 12);
  EXPECT_EQ(tensors["token_embd.weight"], std::make_pair(nlohmann::json({64, 264}), std::string("Q8_0")));
  EXPECT_EQ(tensors["output.weight"], std::make_pair(nlohmann::json({64, 264}), std::string("Q8_0")));
  EXPECT_EQ(tensors["blk.0.attn_k.weight"], std::make_pair(nlohmann::json({64, 32}), std::string("Q8_0")));
  EXPECT_EQ(tensors["blk.0.attn_k.bias"], std::make_pair(nlohmann::json({32}), std::string("F32")));
  EXPECT_EQ(tensors["blk.0.ffn_down.weight"], std::make_pair(nlohmann::json({80, 64}), std::string("F16")));
  EXPECT_EQ(tensors["blk.0.ffn_up.weight"], std::make_pair(nlohmann::json({64, 80}), std::string("Q8_0")));
  EXPECT_EQ(tensors["output_norm.weight"], std::make_pair(nlohmann::json({64}), std::string("F32")));
}

// ---------------------------------------------------------------------------------
// llama.cpp runs the exported models.

// A few Adam steps on "the next token is f(the previous token)", f(x) = 5x + 3 mod
// 256, over random tokens: a previous-token attention head, so RoPE and the q/k
// layout matter. A random model's top-1 choices are near ties that any rounding
// flips; a trained one has margins, so quantized agreement measures the export
// rather than chaos.
void train_previous_token_map(Transformer& model, int steps) {
  model->train();
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(1e-2));
  for (int step = 0; step < steps; ++step) {
    auto inputs = torch::randint(0, 256, {16, 32}, torch::kLong);
    auto targets = torch::full({16, 32}, -100, torch::kLong);  // position 0 has no previous token
    targets.slice(1, 1) = (inputs.slice(1, 0, -1) * 5 + 3).remainder(256);
    auto logits = model->forward(inputs);
    auto loss = torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}), targets.reshape(-1));
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
  }
  model->eval();
}

std::vector<int64_t> argmax_per_position(Transformer& model, const std::vector<int64_t>& sequence) {
  torch::NoGradGuard no_grad;
  auto logits = model->forward(torch::tensor(sequence).unsqueeze(0));
  auto ids = logits.squeeze(0).argmax(-1);
  return {ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel()};
}

// Exports tied and untied models of `family` as F32, F16, Q8_0 and Q4_0 and runs
// them in llama.cpp: F32/F16 greedy continuations must equal brigade's (on the
// fp16-rounded weights for F16); Q8_0 must agree with brigade's float32 top-1 at
// >= 95% of 200 positions; Q4_0 is reported.
void llama_cpp_parity(HfFamily family, const std::string& family_label) {
  if (!have_llama_cpp()) {
    GTEST_SKIP() << "llama-cpp-python is not installed in .venv (scripts/setup.sh installs it); "
                    "llama.cpp parity not checked";
  }
  const OneTorchThread one_thread;
  TempDir dir;
  const auto tokenizer = data::BpeTokenizer::from_byte_tokenizer();
  const std::vector<int64_t> prompt = {72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100};  // "Hello, world"
  std::vector<int64_t> sequence;
  std::mt19937 rng(99);
  for (int i = 0; i < 200; ++i) sequence.push_back(static_cast<int64_t>(rng() % 256));
  constexpr int64_t kNew = 32;
  constexpr int kTrainSteps = 150;

  struct Case {
    std::string label;
    GgufQuant quant;
    std::vector<int64_t> expected;  // brigade's greedy continuation or per-position argmax
  };
  std::vector<Case> cases;
  nlohmann::json job = nlohmann::json::array();
  for (bool tied : {true, false}) {
    for (GgufQuant quant : {GgufQuant::kF32, GgufQuant::kF16, GgufQuant::kQ8_0, GgufQuant::kQ4_0}) {
      const std::string file = std::string(tied ? "tied" : "untied") + "_" + gguf_quant_name(quant) + ".gguf";
      const bool quantized = quant == GgufQuant::kQ8_0 || quant == GgufQuant::kQ4_0;
      TransformerOptions o = small_options(family, tied);
      if (quantized) o.init_std = 0.1;
      Transformer model = make_model(o, tied ? 21 : 22);
      if (quantized) train_previous_token_map(model, kTrainSteps);
      export_gguf(model, family, tokenizer, quant, dir / file, "parity");
      nlohmann::json item = {{"path", (dir / file).string()}, {"n_ctx", 256}};
      Case c{family_label + " " + file, quant, {}};
      if (quantized) {
        item["sequence"] = sequence;
        c.expected = argmax_per_position(model, sequence);  // float32
      } else {
        if (quant == GgufQuant::kF16) round_to_fp16(model);
        SamplingOptions greedy;
        greedy.max_new_tokens = kNew;
        c.expected = generate(model, prompt, greedy).tokens;
        item["prompt"] = prompt;
        item["new_tokens"] = kNew;
      }
      cases.push_back(std::move(c));
      job.push_back(item);
    }
  }
  write_file_atomic(dir / "job.json", job.dump());
  auto run = run_check("llama", dir / "job.json");
  if (run.exit_code == 3) GTEST_SKIP() << run.output;
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const auto results = last_json_line(run.output);
  ASSERT_EQ(results.size(), cases.size()) << run.output;

  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    if (c.quant == GgufQuant::kF32 || c.quant == GgufQuant::kF16) {
      const std::vector<int64_t> theirs = results[i]["greedy"].get<std::vector<int64_t>>();
      const std::set<int64_t> distinct(c.expected.begin(), c.expected.end());
      std::cout << "[gguf parity] " << c.label << ": greedy " << (c.expected == theirs ? "equal" : "DIFFERENT")
                << " (" << distinct.size() << " distinct tokens of " << kNew << ")\n";
      EXPECT_EQ(c.expected, theirs) << c.label;
      EXPECT_GE(distinct.size(), 8u) << c.label << ": the continuation is too repetitive to test much";
    } else {
      const std::vector<int64_t> theirs = results[i]["argmax"].get<std::vector<int64_t>>();
      ASSERT_EQ(c.expected.size(), theirs.size()) << c.label;
      int64_t agree = 0;
      for (size_t p = 0; p < theirs.size(); ++p) agree += c.expected[p] == theirs[p];
      const double agreement = static_cast<double>(agree) / static_cast<double>(theirs.size());
      std::cout << "[gguf parity] " << c.label << ": top-1 agreement with brigade float32 " << agreement * 100
                << "% over " << theirs.size() << " positions\n";
      if (c.quant == GgufQuant::kQ8_0) {
        EXPECT_GE(agreement, 0.95) << c.label;
      }
    }
  }
}

TEST(GgufLlamaCpp, LlamaMatchesBrigade) { llama_cpp_parity(HfFamily::kLlama, "llama"); }
TEST(GgufLlamaCpp, Qwen2MatchesBrigade) { llama_cpp_parity(HfFamily::kQwen2, "qwen2"); }
TEST(GgufLlamaCpp, Qwen3MatchesBrigade) { llama_cpp_parity(HfFamily::kQwen3, "qwen3"); }

}  // namespace
}  // namespace brigade::model
