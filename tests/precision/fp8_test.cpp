// FP8 codecs: bit-exact against LibTorch's float8 dtypes inside the range, and
// against the format definition beyond it (saturation, NaN, infinity).
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>

#include <torch/torch.h>

#include "precision/fp8.h"
#include "tests/testing.h"

namespace brigade::precision {
namespace {

c10::ScalarType torch_type(Fp8Format f) {
  return f == Fp8Format::kE4M3 ? torch::kFloat8_e4m3fn : torch::kFloat8_e5m2;
}

// LibTorch's own cast: codes of `values` as uint8.
torch::Tensor torch_codes(const torch::Tensor& values, Fp8Format f) {
  return values.to(torch_type(f)).view(torch::kByte);
}

void expect_same_bits(const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& inputs) {
  ASSERT_EQ(a.sizes(), b.sizes());
  auto differ = (a != b).nonzero();
  if (differ.size(0) == 0) return;
  const int64_t i = differ[0][0].item<int64_t>();
  ADD_FAILURE() << differ.size(0) << " codes differ; first at input " << inputs.reshape({-1})[i].item<double>()
                << ": brigade " << a[i].item<int>() << ", LibTorch " << b[i].item<int>();
}

class Fp8Codec : public ::testing::TestWithParam<Fp8Format> {};

TEST_P(Fp8Codec, EveryCodeDecodesLikeLibTorch) {
  const auto f = GetParam();
  auto codes = torch::arange(0, 256, torch::kInt).to(torch::kByte);
  auto ours = decode_fp8(codes, f);
  auto theirs = codes.view(torch_type(f)).to(torch::kFloat);
  for (int c = 0; c < 256; ++c) {
    const float a = ours[c].item<float>(), b = theirs[c].item<float>();
    if (std::isnan(b)) {
      EXPECT_TRUE(std::isnan(a)) << "code " << c;
    } else {
      EXPECT_EQ(std::bit_cast<uint32_t>(a), std::bit_cast<uint32_t>(b)) << "code " << c << ": " << a << " vs " << b;
    }
    EXPECT_EQ(std::bit_cast<uint32_t>(decode_fp8(static_cast<uint8_t>(c), f)), std::bit_cast<uint32_t>(a))
        << "scalar and tensor decode, code " << c;
  }
  // Every finite code survives decode -> encode (both zeros included).
  auto finite = torch::isfinite(ours);
  auto round_trip = encode_fp8(ours, f);
  EXPECT_TRUE(torch::equal(round_trip.masked_select(finite), codes.masked_select(finite)));
}

TEST_P(Fp8Codec, RandomInRangeValuesEncodeLikeLibTorch) {
  const auto f = GetParam();
  const auto& info = format_info(f);
  torch::manual_seed(5);
  // Log-uniform magnitudes from below the smallest subnormal to the largest
  // finite value, random signs: normals, subnormals, underflow to zero.
  const int64_t n = 1 << 18;
  const double lo = std::log2(info.min_subnormal) - 3, hi = std::log2(info.max);
  auto magnitude = torch::exp2(torch::rand({n}, torch::kDouble) * (hi - lo) + lo).clamp_max(info.max).to(torch::kFloat);
  auto sign = torch::where(torch::rand({n}) < 0.5, -1.0f, 1.0f);
  auto values = magnitude * sign;
  // Exact ties between two neighbouring codes (midpoints), where round-to-even matters.
  auto grid = decode_fp8(torch::arange(0, 256, torch::kInt).to(torch::kByte), f);
  auto finite = std::get<0>(grid.masked_select(torch::isfinite(grid) & (grid >= 0)).sort());
  auto mids = (finite.narrow(0, 0, finite.size(0) - 1) + finite.narrow(0, 1, finite.size(0) - 1)) / 2;
  auto edges = torch::tensor(std::vector<float>{0.0f, -0.0f, info.max, -info.max, info.min_subnormal});
  values = torch::cat(std::vector<torch::Tensor>{values, mids, -mids, edges});
  expect_same_bits(encode_fp8(values, f), torch_codes(values, f), values);
  // From bfloat16: one rounding, the same as LibTorch's.
  auto bf16 = values.to(torch::kBFloat16);
  expect_same_bits(encode_fp8(bf16, f), torch_codes(bf16, f), bf16.to(torch::kFloat));
  // Signed zeros keep their sign.
  EXPECT_EQ(encode_fp8(-0.0f, f), 0x80);
  EXPECT_EQ(encode_fp8(0.0f, f), 0x00);
}

TEST_P(Fp8Codec, BeyondTheRangeSaturatesAndNonFiniteStaysNonFinite) {
  const auto f = GetParam();
  const auto& info = format_info(f);
  const float inf = std::numeric_limits<float>::infinity();
  // Anything finite at or beyond max becomes +-max, by the format's definition.
  for (float v : {info.max, std::nextafter(info.max, inf), info.max * 1.07f, info.max * 1.5f, 1e30f,
                  std::numeric_limits<float>::max()}) {
    EXPECT_EQ(encode_fp8(v, f), info.max_code) << v;
    EXPECT_EQ(encode_fp8(-v, f), 0x80 | info.max_code) << -v;
    EXPECT_EQ(decode_fp8(encode_fp8(v, f), f), info.max) << v;
  }
  EXPECT_EQ(decode_fp8(info.max_code, f), info.max);
  // NaN stays NaN; infinity is infinity in E5M2 and NaN in E4M3 (no infinity there), never finite.
  EXPECT_TRUE(std::isnan(decode_fp8(encode_fp8(std::numeric_limits<float>::quiet_NaN(), f), f)));
  const float from_inf = decode_fp8(encode_fp8(inf, f), f);
  if (f == Fp8Format::kE5M2) {
    EXPECT_EQ(from_inf, inf);
    EXPECT_EQ(decode_fp8(encode_fp8(-inf, f), f), -inf);
  } else {
    EXPECT_TRUE(std::isnan(from_inf));
  }
  // Below half the smallest subnormal: zero; at exactly half: ties to even (zero).
  EXPECT_EQ(encode_fp8(info.min_subnormal * 0.49f, f), 0x00);
  EXPECT_EQ(encode_fp8(info.min_subnormal * 0.5f, f), 0x00);
  EXPECT_EQ(encode_fp8(info.min_subnormal * 0.51f, f), 0x01);
}

INSTANTIATE_TEST_SUITE_P(Formats, Fp8Codec, ::testing::Values(Fp8Format::kE4M3, Fp8Format::kE5M2),
                         [](const auto& info) { return to_string(info.param); });

TEST(Fp8Format, InfoAndNames) {
  EXPECT_EQ(format_info(Fp8Format::kE4M3).max, 448.0f);
  EXPECT_EQ(format_info(Fp8Format::kE5M2).max, 57344.0f);
  EXPECT_EQ(format_info(Fp8Format::kE4M3).min_subnormal, std::ldexp(1.0f, -9));
  EXPECT_EQ(format_info(Fp8Format::kE5M2).min_subnormal, std::ldexp(1.0f, -16));
  EXPECT_EQ(parse_fp8_format("e5m2"), Fp8Format::kE5M2);
  EXPECT_BRIGADE_ERROR(parse_fp8_format("e3m4"), "unknown FP8 format 'e3m4'");
  EXPECT_BRIGADE_ERROR(encode_fp8(torch::zeros({2}, torch::kDouble), Fp8Format::kE4M3), "expected float32 or bfloat16");
}

}  // namespace
}  // namespace brigade::precision
