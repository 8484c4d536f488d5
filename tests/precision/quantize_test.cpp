// FP8 quantization: scales per mode against a float64 reference written element
// by element, codes against the codec applied by hand, odd shapes, power-of-two
// scales, delayed scaling's history, non-finite input.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include <torch/torch.h>

#include "precision/quantize.h"
#include "tests/testing.h"

namespace brigade::precision {
namespace {

// Group index of element (i, j) along each axis for a mode: (row group, col group).
std::pair<int64_t, int64_t> group_of(ScalingMode mode, int64_t i, int64_t j) {
  switch (mode) {
    case ScalingMode::kTile1x128: return {i, j / 128};
    case ScalingMode::kTile128x1: return {i / 128, j};
    case ScalingMode::kBlock128x128: return {i / 128, j / 128};
    default: return {0, 0};
  }
}

void check_mode(ScalingMode mode, int64_t rows, int64_t cols, Fp8Format format, bool pow2) {
  SCOPED_TRACE(to_string(mode) + " " + std::to_string(rows) + "x" + std::to_string(cols) + " " + to_string(format) +
               (pow2 ? " pow2" : ""));
  // Groups with very different magnitudes, so a wrong grouping shows.
  auto x = torch::randn({rows, cols}) * torch::exp2(torch::randint(-6, 7, {rows, 1}).to(torch::kFloat)) *
           torch::exp2(torch::randint(-6, 7, {1, cols}).to(torch::kFloat));
  auto q = quantize(x, {format, mode, pow2, "x"});

  // Reference: group maxima in float64, element by element.
  const bool per_tensor = mode == ScalingMode::kPerTensorCurrent;
  const int64_t gr = per_tensor ? 1 : (mode == ScalingMode::kTile1x128 ? rows : (rows + 127) / 128);
  const int64_t gc = per_tensor ? 1 : (mode == ScalingMode::kTile128x1 ? cols : (cols + 127) / 128);
  std::vector<double> amax(gr * gc, 0.0);
  auto xa = x.accessor<float, 2>();
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      auto [a, b] = group_of(mode, i, j);
      amax[a * gc + b] = std::max(amax[a * gc + b], std::fabs(static_cast<double>(xa[i][j])));
    }
  }
  auto scales = q.scales.reshape({-1});
  ASSERT_EQ(scales.numel(), gr * gc);
  const double max = format_info(format).max;
  for (int64_t g = 0; g < gr * gc; ++g) {
    double s = amax[g] == 0 ? 1.0 : amax[g] / max;
    if (pow2 && amax[g] != 0) s = std::exp2(std::ceil(std::log2(s)));
    ASSERT_EQ(scales[g].item<float>(), static_cast<float>(s)) << "group " << g;
    ASSERT_EQ(q.amax.reshape({-1})[g].item<float>(), static_cast<float>(amax[g])) << "group " << g;
  }
  // Codes: the codec applied to x * (1 / s); no element overflows its group's range.
  auto codes = q.data.accessor<uint8_t, 2>();
  int mismatches = 0;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      auto [a, b] = group_of(mode, i, j);
      const float s = scales[a * gc + b].item<float>();
      if (codes[i][j] != encode_fp8(xa[i][j] * (1.0f / s), format)) ++mismatches;
    }
  }
  EXPECT_EQ(mismatches, 0);
  // Dequantized values are within the format's relative precision of x (half an
  // ulp of the mantissa), or its subnormal step, per group.
  auto back = q.dequantize();
  ASSERT_EQ(back.sizes(), x.sizes());
  const double rel = std::ldexp(1.0, -format_info(format).mantissa_bits - 1);
  auto bound = x.abs() * rel + 1e-30;
  auto err = (back - x).abs();
  auto expanded = torch::empty_like(x);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      auto [a, b] = group_of(mode, i, j);
      expanded[i][j] = scales[a * gc + b].item<float>();
    }
  }
  auto sub = expanded * format_info(format).min_subnormal;
  EXPECT_TRUE((err <= torch::maximum(bound, sub) * 1.0001).all().item<bool>());
  // The one-pass fake quantizer gives the same values.
  EXPECT_TRUE(torch::equal(fake_quantize(x, {format, mode, pow2, "x"}), back));
}

TEST(Fp8Quantize, ScalesAndCodesMatchTheReferenceForEveryMode) {
  torch::manual_seed(9);
  for (auto mode : {ScalingMode::kPerTensorCurrent, ScalingMode::kTile1x128, ScalingMode::kTile128x1,
                    ScalingMode::kBlock128x128}) {
    for (auto [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{{256, 384}, {130, 200}, {1, 5}, {129, 129}}) {
      check_mode(mode, rows, cols, Fp8Format::kE4M3, false);
    }
    check_mode(mode, 200, 130, Fp8Format::kE5M2, false);
    check_mode(mode, 130, 260, Fp8Format::kE4M3, true);
    // Wider than the quantizer's 1024-column chunks, with a partial last chunk and group.
    check_mode(mode, 131, 1100, Fp8Format::kE4M3, false);
  }
}

TEST(Fp8Quantize, ScaleShapesAndZeroGroups) {
  auto x = torch::zeros({130, 260});
  x[129][259] = 3.0f;
  auto t = quantize(x, {Fp8Format::kE4M3, ScalingMode::kTile1x128});
  EXPECT_EQ(t.scales.sizes(), (std::vector<int64_t>{130, 3}));
  auto c = quantize(x, {Fp8Format::kE4M3, ScalingMode::kTile128x1});
  EXPECT_EQ(c.scales.sizes(), (std::vector<int64_t>{2, 260}));
  auto b = quantize(x, {Fp8Format::kE4M3, ScalingMode::kBlock128x128});
  EXPECT_EQ(b.scales.sizes(), (std::vector<int64_t>{2, 3}));
  // All-zero groups get scale 1; the one non-zero element round-trips exactly (it is the group max).
  EXPECT_EQ(b.scales[0][0].item<float>(), 1.0f);
  EXPECT_EQ(b.scales[1][2].item<float>(), 3.0f / 448.0f);
  EXPECT_TRUE(torch::equal(b.dequantize(), x));
}

TEST(Fp8Quantize, NonFiniteInputIsAnErrorNamingTheTensor) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    auto x = torch::ones({4, 1300});
    x[2][1250] = bad;  // in the last group of a later chunk
    for (auto mode : {ScalingMode::kPerTensorCurrent, ScalingMode::kTile1x128, ScalingMode::kTile128x1,
                      ScalingMode::kBlock128x128}) {
      EXPECT_BRIGADE_ERROR(quantize(x, {Fp8Format::kE4M3, mode, false, "layers.3.mlp.up_proj input"}),
                           "non-finite value (NaN or Inf) in layers.3.mlp.up_proj input");
      EXPECT_BRIGADE_ERROR(fake_quantize(x, {Fp8Format::kE4M3, mode, false, "layers.3.mlp.up_proj input"}),
                           "non-finite value (NaN or Inf) in layers.3.mlp.up_proj input");
    }
    DelayedScaling delayed(4, 0.0, DelayedScaling::Algorithm::kMax);
    EXPECT_BRIGADE_ERROR(quantize(x, {Fp8Format::kE5M2, ScalingMode::kPerTensorDelayed, false, "grad"}, &delayed),
                         "non-finite value (NaN or Inf) in grad");
    EXPECT_EQ(delayed.recorded(), 0);  // nothing recorded from a rejected tensor
  }
}

// Deferred: no call stops; check() names the first tensor that held a NaN or
// infinity, once, and starts clean.
TEST(Fp8Quantize, DeferredCheckNamesTheFirstNonFiniteTensorOnce) {
  auto good = torch::ones({4, 256});
  auto bad = torch::ones({4, 256});
  bad[1][200] = std::numeric_limits<float>::quiet_NaN();
  DeferredFiniteCheck deferred;
  EXPECT_EQ(DeferredFiniteCheck::active(), &deferred);
  EXPECT_NO_THROW(quantize(good, {Fp8Format::kE4M3, ScalingMode::kTile1x128, false, "layers.0.attn input"}));
  EXPECT_NO_THROW(fake_quantize(bad, {Fp8Format::kE4M3, ScalingMode::kBlock128x128, false, "layers.1.mlp weight"}));
  EXPECT_NO_THROW(quantize(bad, {Fp8Format::kE5M2, ScalingMode::kTile128x1, false, "layers.2.mlp grad"}));
  EXPECT_BRIGADE_ERROR(deferred.check(), "non-finite value (NaN or Inf) in layers.1.mlp weight reached the FP8 quantizer (128x128 blocks)");
  EXPECT_NO_THROW(deferred.check());
  EXPECT_NO_THROW(quantize(good, {Fp8Format::kE4M3, ScalingMode::kPerTensorCurrent, false, "x"}));
  EXPECT_NO_THROW(deferred.check());
}

TEST(Fp8Quantize, DelayedScalingUsesTheHistory) {
  DelayedScaling max_algo(3, 1.0, DelayedScaling::Algorithm::kMax);
  DelayedScaling recent(3, 0.0, DelayedScaling::Algorithm::kMostRecent);
  const QuantizeOptions o{Fp8Format::kE4M3, ScalingMode::kPerTensorDelayed, false, "w"};
  std::vector<float> amaxes = {10.0f, 40.0f, 5.0f, 2.0f, 1.0f};
  std::vector<float> seen;
  for (size_t step = 0; step < amaxes.size(); ++step) {
    auto x = torch::full({2, 3}, amaxes[step]);
    x[0][0] = -amaxes[step];
    // The scale in use was fixed by earlier steps.
    double expect_max = 1.0, expect_recent = 1.0;
    if (!seen.empty()) {
      float m = 0.0f;
      for (size_t k = seen.size() >= 3 ? seen.size() - 3 : 0; k < seen.size(); ++k) m = std::max(m, seen[k]);
      expect_max = m / 448.0 * 2.0;  // margin 1: a factor 2 of headroom
      expect_recent = seen.back() / 448.0;
    }
    auto a = quantize(x, o, &max_algo);
    auto b = quantize(x, o, &recent);
    EXPECT_EQ(a.scales.item<float>(), static_cast<float>(expect_max)) << "step " << step;
    EXPECT_EQ(b.scales.item<float>(), static_cast<float>(expect_recent)) << "step " << step;
    EXPECT_EQ(a.amax.item<float>(), amaxes[step]);
    seen.push_back(amaxes[step]);
  }
  EXPECT_EQ(max_algo.recorded(), 5);
  // Values beyond the range the history allows saturate to +-max (finite): a scale
  // from amax 1 gives range 1, so 1000 comes back as 1.
  auto x = torch::full({1, 2}, 1000.0f);
  DelayedScaling small(1, 0.0, DelayedScaling::Algorithm::kMax);
  small.record(1.0f);
  auto q = quantize(x, o, &small);
  EXPECT_EQ(q.dequantize()[0][0].item<float>(), 1.0f);  // 448 codes * (1/448)

  // Checkpoint round trip.
  DelayedScaling restored(3, 1.0, DelayedScaling::Algorithm::kMax);
  restored.restore(max_algo.history(), max_algo.position(), max_algo.recorded());
  EXPECT_EQ(restored.scale(Fp8Format::kE4M3, false), max_algo.scale(Fp8Format::kE4M3, false));
  EXPECT_BRIGADE_ERROR(DelayedScaling(4, 0.0, DelayedScaling::Algorithm::kMax)
                           .restore(max_algo.history(), 0, 1),
                       "does not match the recipe's 4");
  EXPECT_BRIGADE_ERROR(DelayedScaling(0, 0.0, DelayedScaling::Algorithm::kMax), "history length must be >= 1");
}

}  // namespace
}  // namespace brigade::precision
