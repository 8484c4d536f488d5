// safetensors: round trips, a hand-built file per the spec, and deliberately broken files.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/fs.h"
#include "model/safetensors.h"
#include "tests/testing.h"

namespace brigade::model {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

// A file from a raw header text and data area, exactly as given (no padding).
std::string make_file(const std::string& header, const std::string& data) {
  std::string bytes(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(bytes.data(), &n, 8);
  return bytes + header + data;
}

bool same(const torch::Tensor& a, const torch::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() && torch::equal(a, b);
}

NamedTensors sample_tensors() {
  torch::manual_seed(0);
  return {
      {"f64", torch::randn({3, 2}, torch::kDouble)},
      {"f32", torch::randn({2, 3, 4})},
      {"f16", torch::randn({5}).to(torch::kHalf)},
      {"bf16", torch::randn({4, 1}).to(torch::kBFloat16)},
      {"i64", torch::tensor({int64_t{-1}, int64_t{1} << 40, int64_t{7}})},
      {"i32", torch::arange(-3, 3, torch::kInt)},
      {"i16", torch::tensor({-32768, 32767}, torch::kShort)},
      {"i8", torch::tensor({-128, 0, 127}, torch::kChar)},
      {"u8", torch::tensor({0, 200, 255}, torch::kByte)},
      {"bool", torch::tensor({true, false, true})},
      {"empty", torch::zeros({0, 4})},
      {"scalar", torch::tensor(3.5)},
      {"layers.0.self_attn.q_proj.weight", torch::randn({8, 8}).t()},  // non-contiguous
  };
}

TEST(Safetensors, RoundTripsDtypesShapesAndMetadata) {
  TempDir dir;
  const auto tensors = sample_tensors();
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"brigade.step", "42"}, {"empty", ""}};
  save_safetensors(dir / "a.safetensors", tensors, meta);
  auto file = load_safetensors(dir / "a.safetensors");
  EXPECT_EQ(file.metadata, meta);
  ASSERT_EQ(file.tensors.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    ASSERT_TRUE(file.tensors.count(name)) << name;
    EXPECT_TRUE(same(file.tensors.at(name), t)) << name;
    EXPECT_TRUE(file.tensors.at(name).is_contiguous()) << name;
  }
  EXPECT_EQ(file.tensors.at("scalar").dim(), 0);
  EXPECT_EQ(file.tensors.at("empty").numel(), 0);
}

TEST(Safetensors, LoadedTensorsOwnTheirMemory) {
  TempDir dir;
  auto t = torch::arange(6, torch::kFloat);
  save_safetensors(dir / "a.safetensors", {{"t", t}});
  auto file = load_safetensors(dir / "a.safetensors");
  fs::remove(dir / "a.safetensors");
  file.tensors.at("t").add_(1);  // must be writable, not a view of a freed buffer
  EXPECT_TRUE(torch::equal(file.tensors.at("t"), t + 1));
}

TEST(Safetensors, NoTensorsNoMetadata) {
  TempDir dir;
  save_safetensors(dir / "e.safetensors", {});
  auto file = load_safetensors(dir / "e.safetensors");
  EXPECT_TRUE(file.tensors.empty());
  EXPECT_TRUE(file.metadata.empty());
}

TEST(Safetensors, WrittenLayoutFollowsTheSpec) {
  TempDir dir;
  save_safetensors(dir / "a.safetensors",
                   {{"b", torch::tensor({1.0f, 2.0f})}, {"a", torch::tensor({int16_t{3}}, torch::kShort)}},
                   {{"k", "v"}});
  const std::string bytes = read_file(dir / "a.safetensors");
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ((8 + n) % 8, 0u) << "data area should start 8-byte aligned";
  auto header = nlohmann::json::parse(bytes.substr(8, n));
  EXPECT_EQ(header["__metadata__"]["k"], "v");
  EXPECT_EQ(header["b"]["dtype"], "F32");
  EXPECT_EQ(header["b"]["shape"], nlohmann::json::array({2}));
  EXPECT_EQ(header["b"]["data_offsets"], nlohmann::json::array({0, 8}));
  EXPECT_EQ(header["a"]["dtype"], "I16");
  EXPECT_EQ(header["a"]["data_offsets"], nlohmann::json::array({8, 10}));
  ASSERT_EQ(bytes.size(), 8 + n + 10);
  float f[2];
  std::memcpy(f, bytes.data() + 8 + n, 8);
  EXPECT_EQ(f[0], 1.0f);
  EXPECT_EQ(f[1], 2.0f);
}

// A file written by hand per the spec: unpadded header, entries not in offset order.
TEST(Safetensors, ReadsAHandBuiltFile) {
  TempDir dir;
  std::string data(12, '\0');
  const int32_t ints[2] = {-5, 9};
  const float one = 1.5f;
  std::memcpy(data.data(), &one, 4);
  std::memcpy(data.data() + 4, ints, 8);
  const std::string header =
      R"({"ints":{"dtype":"I32","shape":[1,2],"data_offsets":[4,12]},)"
      R"("__metadata__":{"format":"pt"},"x":{"dtype":"F32","shape":[],"data_offsets":[0,4]}})";
  write_file_atomic(dir / "h.safetensors", make_file(header, data));
  auto file = load_safetensors(dir / "h.safetensors");
  EXPECT_EQ(file.metadata.at("format"), "pt");
  EXPECT_TRUE(same(file.tensors.at("ints"), torch::tensor({{-5, 9}}, torch::kInt)));
  EXPECT_TRUE(same(file.tensors.at("x"), torch::tensor(1.5f)));
}

TEST(Safetensors, PythonSafetensorsReadsOurFile) {
  const fs::path python = BRIGADE_VENV_PYTHON;
  if (!fs::exists(python) ||
      testing::run_command(python.string() + " -c 'import safetensors.numpy'").exit_code != 0) {
    GTEST_SKIP() << "the project venv has no `safetensors` package; cross-check skipped";
  }
  TempDir dir;
  save_safetensors(dir / "a.safetensors",
                   {{"w", torch::tensor({{1.0f, -2.0f}, {3.5f, 0.25f}})}, {"n", torch::tensor({int64_t{7}})}},
                   {{"format", "pt"}});
  const std::string script =
      "from safetensors.numpy import load_file; from safetensors import safe_open; import sys; "
      "t = load_file(sys.argv[1]); "
      "assert t['w'].tolist() == [[1.0, -2.0], [3.5, 0.25]], t['w']; "
      "assert t['n'].tolist() == [7] and str(t['n'].dtype) == 'int64'; "
      "assert safe_open(sys.argv[1], 'np').metadata() == {'format': 'pt'}; print('ok')";
  auto result = testing::run_command(python.string() + " -c \"" + script + "\" " + (dir / "a.safetensors").string());
  EXPECT_EQ(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("ok"), std::string::npos) << result.output;
}

// ---------------------------------------------------------------------------------
// Corrupted files: each gives an Error naming the file and what is wrong.

class SafetensorsCorrupt : public ::testing::Test {
 protected:
  // Writes `bytes` and expects loading to fail with `message` (and the file's path).
  void expect_error(const std::string& bytes, const std::string& message) {
    const fs::path path = dir_ / "bad.safetensors";
    write_file_atomic(path, bytes);
    try {
      load_safetensors(path);
      ADD_FAILURE() << "expected brigade::Error containing '" << message << "'";
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(message), std::string::npos) << "error was: " << what;
      EXPECT_NE(what.find(path.string()), std::string::npos) << "error does not name the file: " << what;
    } catch (const std::exception& e) {
      // A torch or JSON exception here means a field slipped past validation.
      ADD_FAILURE() << "expected brigade::Error containing '" << message << "', got another exception: "
                    << std::string(e.what()).substr(0, 200);
    }
  }
  TempDir dir_;
  const std::string four_floats_ = std::string(16, '\0');
};

TEST_F(SafetensorsCorrupt, TruncatedBelowEightBytes) {
  expect_error("", "truncated (0 bytes; the 8-byte header length is missing)");
  expect_error(std::string("\x05\x00\x00", 3), "truncated (3 bytes; the 8-byte header length is missing)");
}

TEST_F(SafetensorsCorrupt, HeaderLengthBeyondFile) {
  std::string bytes = make_file("{}", "");
  const uint64_t n = 1000;
  std::memcpy(bytes.data(), &n, 8);
  expect_error(bytes, "header length 1000 runs past the end of the 10-byte file");
  std::string huge = make_file("{}", "");
  const uint64_t max = ~uint64_t{0};  // must not wrap around when added to 8
  std::memcpy(huge.data(), &max, 8);
  expect_error(huge, "exceeds the 100000000-byte limit");
}

TEST_F(SafetensorsCorrupt, InvalidJson) {
  expect_error(make_file(R"({"a": {"dtype": "F32",)", four_floats_), "header is not valid JSON");
  expect_error(make_file("[1, 2]", ""), "header is not a JSON object");
}

TEST_F(SafetensorsCorrupt, OffsetsOutsideData) {
  expect_error(make_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[4,20]}})", four_floats_),
               "data_offsets [4, 20] fall outside the data area of 16 bytes");
  expect_error(make_file(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})", four_floats_),
               "fall outside the data area");
  expect_error(make_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[-4,12]}})", four_floats_),
               "data_offsets must be two non-negative integers");
  expect_error(make_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0]}})", four_floats_),
               "data_offsets must be two non-negative integers");
}

TEST_F(SafetensorsCorrupt, ByteCountMismatchForShape) {
  expect_error(make_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", four_floats_),
               "tensor 'a': data_offsets hold 16 bytes but F32 shape [3] needs 12");
  expect_error(make_file(R"({"a":{"dtype":"F64","shape":[2,2],"data_offsets":[0,16]}})", four_floats_),
               "16 bytes but F64 shape [2,2] needs 32");
  expect_error(make_file(R"({"a":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", four_floats_),
               "shape entries must be non-negative integers");
}

// Shape entries whose product overflows 64 bits must not slip past the byte-count
// check (2^32 * 2^32 wraps to 0 elements, matching an empty data range).
TEST_F(SafetensorsCorrupt, ShapeProductOverflow) {
  expect_error(make_file(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", ""),
               "tensor 'a'");
  expect_error(make_file(R"({"a":{"dtype":"U8","shape":[0,9223372036854775808],"data_offsets":[0,0]}})", ""),
               "tensor 'a'");
}

TEST_F(SafetensorsCorrupt, UnknownDtype) {
  expect_error(make_file(R"({"a":{"dtype":"F8_E4M3X","shape":[4],"data_offsets":[0,4]}})", four_floats_),
               "tensor 'a': unsupported dtype \"F8_E4M3X\"");
  expect_error(make_file(R"({"a":{"dtype":4,"shape":[4],"data_offsets":[0,16]}})", four_floats_),
               "dtype is not a string");
}

TEST_F(SafetensorsCorrupt, OverlappingRanges) {
  expect_error(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                         four_floats_),
               "the data of tensors 'a' and 'b' overlap");
  expect_error(make_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                         R"("b":{"dtype":"I32","shape":[2],"data_offsets":[4,12]}})",
                         four_floats_),
               "the data of tensors 'a' and 'b' overlap");
}

TEST_F(SafetensorsCorrupt, DuplicateNamesAndHugeHeaders) {
  expect_error(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                         four_floats_),
               "header names 'a' twice");
  std::string bytes(64, ' ');
  const uint64_t n = 200'000'000;
  std::memcpy(bytes.data(), &n, 8);
  expect_error(bytes, "header length 200000000 exceeds the 100000000-byte limit");
}

// Every prefix of a valid file fails cleanly (a truncated download).
TEST_F(SafetensorsCorrupt, EveryTruncationIsAnError) {
  const std::string whole = make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("b":{"dtype":"BF16","shape":[4],"data_offsets":[8,16]}})",
                                      four_floats_);
  for (size_t cut = 0; cut < whole.size(); cut += 3) expect_error(whole.substr(0, cut), "");
}

TEST_F(SafetensorsCorrupt, MissingFieldsAndBadMetadata) {
  expect_error(make_file(R"({"a":{"dtype":"F32","shape":[4]}})", four_floats_),
               "tensor 'a' needs dtype, shape and data_offsets");
  expect_error(make_file(R"({"a":[1,2]})", four_floats_), "needs dtype, shape and data_offsets");
  expect_error(make_file(R"({"__metadata__":{"step":3}})", ""), "__metadata__['step'] is not a string");
  expect_error(make_file(R"({"__metadata__":[1]})", ""), "__metadata__ must be an object of strings");
  expect_error(make_file(R"({"a":{"dtype":"F32","shape":4,"data_offsets":[0,4]}})", four_floats_),
               "shape is not an array");
}

TEST(Safetensors, MissingFileAndUnsupportedDtype) {
  TempDir dir;
  EXPECT_BRIGADE_ERROR(load_safetensors(dir / "nope.safetensors"), "nope.safetensors");
  EXPECT_BRIGADE_ERROR(save_safetensors(dir / "c.safetensors", {{"c", torch::zeros({2}, torch::kComplexFloat)}}),
                       "unsupported dtype");
}

}  // namespace
}  // namespace brigade::model
