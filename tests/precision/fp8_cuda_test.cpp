// The CUDA FP8 back end against the CPU one on the same inputs: quantization bit
// for bit (every mode, both formats, float32 and bfloat16, odd shapes), the NaN
// error, cuBLASLt FP8 GEMMs against float64 products of the dequantized operands,
// and the FP8 Linear's forward and backward against the CPU emulation. Tests named
// *_CUDA skip without a GPU; the Fp8Gemm tests check the shared host logic (CPU
// emulation of fp8_gemm, transposed operands) everywhere.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include <torch/torch.h>

#include "core/device.h"
#include "precision/fp8_cuda.h"
#include "precision/fp8_gemm.h"
#include "precision/linear.h"
#include "precision/quantize_cuda_host.h"
#include "tests/testing.h"

namespace brigade::precision {
namespace {

#define SKIP_WITHOUT_GPU()                                                     \
  if (brigade::cuda_device_count() == 0 || !torch::cuda::is_available()) {     \
    GTEST_SKIP() << "no CUDA device (or brigade built without CUDA)";          \
  }

// Groups of very different magnitudes (a wrong grouping shows), an all-zero row
// and column (scale 1), and both signs.
torch::Tensor test_input(int64_t rows, int64_t cols) {
  auto x = torch::randn({rows, cols}) * torch::exp2(torch::randint(-6, 7, {rows, 1}).to(torch::kFloat)) *
           torch::exp2(torch::randint(-6, 7, {1, cols}).to(torch::kFloat));
  if (rows > 2) x[1].zero_();
  if (cols > 2) x.select(1, cols - 1).zero_();
  return x;
}

const std::vector<ScalingMode> kModes = {ScalingMode::kPerTensorCurrent, ScalingMode::kPerTensorDelayed,
                                         ScalingMode::kTile1x128, ScalingMode::kTile128x1,
                                         ScalingMode::kBlock128x128};

void expect_same_quantization(const torch::Tensor& x, const QuantizeOptions& o) {
  SCOPED_TRACE(to_string(o.mode) + " " + to_string(o.format) + " " + std::to_string(x.size(0)) + "x" +
               std::to_string(x.size(1)) + (o.power_of_two_scales ? " pow2" : "") + " " +
               c10::toString(x.scalar_type()));
  // Delayed: a history whose scale makes the largest values saturate.
  DelayedScaling cpu_history(4, 0.0, DelayedScaling::Algorithm::kMax);
  DelayedScaling gpu_history(4, 0.0, DelayedScaling::Algorithm::kMax);
  const float recorded = x.abs().max().item<float>() * 0.25f;
  cpu_history.record(recorded);
  gpu_history.record(recorded);
  const bool delayed = o.mode == ScalingMode::kPerTensorDelayed;
  auto cpu = quantize(x, o, delayed ? &cpu_history : nullptr);
  auto gpu = quantize(x.to(torch::kCUDA), o, delayed ? &gpu_history : nullptr);
  ASSERT_TRUE(gpu.data.is_cuda());
  EXPECT_EQ(gpu.mode, cpu.mode);
  EXPECT_EQ(gpu.scales.sizes(), cpu.scales.sizes());
  EXPECT_EQ(gpu.amax.sizes(), cpu.amax.sizes());
  auto codes = gpu.data.cpu();
  EXPECT_EQ(codes.ne(cpu.data).sum().item<int64_t>(), 0);
  EXPECT_TRUE(torch::equal(gpu.scales.cpu(), cpu.scales));
  EXPECT_TRUE(torch::equal(gpu.amax.cpu(), cpu.amax));
  if (delayed) {
    EXPECT_TRUE(torch::equal(gpu_history.history(), cpu_history.history()));
  }
  // Dequantized and fake-quantized values agree too.
  EXPECT_TRUE(torch::equal(dequantize_cuda(gpu).cpu(), cpu.dequantize()));
  if (!delayed) {
    EXPECT_TRUE(torch::equal(fake_quantize(x.to(torch::kCUDA), o).cpu(), cpu.dequantize()));
  }
}

TEST(Fp8Cuda, QuantizeIsBitEqualToTheCpu_CUDA) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(3);
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{256, 384}, {130, 201}, {1, 5}, {129, 129}, {300, 3}};
  for (auto mode : kModes) {
    for (auto format : {Fp8Format::kE4M3, Fp8Format::kE5M2}) {
      for (auto [rows, cols] : shapes) expect_same_quantization(test_input(rows, cols), {format, mode, false, "x"});
      expect_same_quantization(test_input(130, 260), {format, mode, true, "x"});
      expect_same_quantization(test_input(257, 136).to(torch::kBFloat16), {format, mode, false, "x"});
    }
  }
}

TEST(Fp8Cuda, NonFiniteInputIsAnErrorNamingTheTensor_CUDA) {
  SKIP_WITHOUT_GPU();
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    auto x = torch::ones({140, 300});
    x[133][250] = bad;
    x = x.to(torch::kCUDA);
    for (auto mode : {ScalingMode::kPerTensorCurrent, ScalingMode::kTile1x128, ScalingMode::kTile128x1,
                      ScalingMode::kBlock128x128}) {
      EXPECT_BRIGADE_ERROR(quantize(x, {Fp8Format::kE4M3, mode, false, "layers.3.mlp.up_proj input"}),
                           "non-finite value (NaN or Inf) in layers.3.mlp.up_proj input");
      EXPECT_BRIGADE_ERROR(fake_quantize(x, {Fp8Format::kE5M2, mode, false, "experts grad"}),
                           "non-finite value (NaN or Inf) in experts grad");
    }
    DelayedScaling delayed(4, 0.0, DelayedScaling::Algorithm::kMax);
    EXPECT_BRIGADE_ERROR(quantize(x, {Fp8Format::kE5M2, ScalingMode::kPerTensorDelayed, false, "grad"}, &delayed),
                         "non-finite value (NaN or Inf) in grad");
    EXPECT_EQ(delayed.recorded(), 0);  // nothing recorded from a rejected tensor
  }
}

// float64 product of the dequantized operands, and the sum of |products| that
// bounds any summation-order error.
std::pair<torch::Tensor, torch::Tensor> reference_product(const QuantizedTensor& a, const QuantizedTensor& b) {
  auto to_cpu = [](const QuantizedTensor& q) {
    QuantizedTensor c = q;
    c.data = q.data.cpu();
    c.scales = q.scales.cpu();
    c.amax = q.amax.defined() ? q.amax.cpu() : q.amax;
    return c.dequantize().to(torch::kDouble);
  };
  auto da = to_cpu(a), db = to_cpu(b);
  return {da.mm(db.t()), da.abs().mm(db.abs().t())};
}

// Hopper's FP8 tensor cores add partial products in reduced precision before
// cuBLASLt promotes them to FP32 (fast accumulation off), so the bound is looser
// than float32's: 2^-9 of the sum of |products|; bfloat16 output adds its rounding.
void expect_close_to_reference(const torch::Tensor& d, const QuantizedTensor& a, const QuantizedTensor& b) {
  auto [ref, magnitude] = reference_product(a, b);
  auto got = d.cpu().to(torch::kDouble);
  ASSERT_EQ(got.sizes(), ref.sizes());
  const double out_rounding = d.scalar_type() == torch::kBFloat16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -23);
  auto bound = magnitude * std::ldexp(1.0, -9) + ref.abs() * out_rounding + 1e-30;
  auto excess = ((got - ref).abs() - bound).max().item<double>();
  EXPECT_LE(excess, 0.0) << "largest error beyond the bound";
  // And the product is not trivially small: the operands were really multiplied.
  EXPECT_GT(ref.abs().max().item<double>(), 0.0);
}

// Deferred on the GPU: the calls queue their flags without waiting; check() reads
// once and names the first tensor that held a NaN or infinity.
TEST(Fp8Cuda, DeferredCheckNamesTheFirstNonFiniteTensor_CUDA) {
  SKIP_WITHOUT_GPU();
  auto good = torch::ones({130, 256}, torch::kCUDA);
  auto bad = good.clone();
  bad[129][7] = std::numeric_limits<float>::infinity();
  DeferredFiniteCheck deferred;
  quantize(good, {Fp8Format::kE4M3, ScalingMode::kTile1x128, false, "first"});
  fake_quantize(bad, {Fp8Format::kE4M3, ScalingMode::kTile128x1, false, "second"});
  quantize(bad, {Fp8Format::kE4M3, ScalingMode::kBlock128x128, false, "third"});
  EXPECT_BRIGADE_ERROR(deferred.check(), "non-finite value (NaN or Inf) in second reached the FP8 quantizer");
  quantize(good, {Fp8Format::kE4M3, ScalingMode::kBlock128x128, false, "fourth"});
  EXPECT_NO_THROW(deferred.check());
}

TEST(Fp8Cuda, GemmMatchesFloat64ProductsOfTheDequantizedOperands_CUDA) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(5);
  using Pair = std::tuple<ScalingMode, Fp8Format, ScalingMode, Fp8Format>;
  const std::vector<Pair> pairs = {
      {ScalingMode::kPerTensorCurrent, Fp8Format::kE4M3, ScalingMode::kPerTensorCurrent, Fp8Format::kE4M3},
      {ScalingMode::kPerTensorCurrent, Fp8Format::kE5M2, ScalingMode::kPerTensorCurrent, Fp8Format::kE4M3},
      {ScalingMode::kTile1x128, Fp8Format::kE4M3, ScalingMode::kBlock128x128, Fp8Format::kE4M3},  // Fprop, Dgrad
      {ScalingMode::kTile1x128, Fp8Format::kE4M3, ScalingMode::kTile1x128, Fp8Format::kE4M3},     // Wgrad
      {ScalingMode::kBlock128x128, Fp8Format::kE4M3, ScalingMode::kTile1x128, Fp8Format::kE4M3},
  };
  // Aligned shapes, and shapes that need padding (k % 16, n % 8, m % 4).
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> shapes = {
      {256, 384, 512}, {128, 128, 128}, {100, 72, 200}, {66, 130, 136}, {4, 16, 1040}};
  for (const auto& [am, af, bm, bf] : pairs) {
    for (const auto& [m, n, k] : shapes) {
      for (auto out : {torch::kFloat, torch::kBFloat16}) {
        SCOPED_TRACE("A " + to_string(am) + " " + to_string(af) + ", B " + to_string(bm) + " " + to_string(bf) +
                     ", m " + std::to_string(m) + " n " + std::to_string(n) + " k " + std::to_string(k) + " " +
                     c10::toString(out));
        auto qa = quantize(test_input(m, k).to(torch::kCUDA), {af, am, false, "a"});
        auto qb = quantize(test_input(n, k).to(torch::kCUDA), {bf, bm, false, "b"});
        auto d = fp8_gemm(qa, qb, out);
        EXPECT_EQ(d.scalar_type(), out);
        expect_close_to_reference(d, qa, qb);
      }
    }
  }
  // The Wgrad form: 128x1 tiles of [tokens, features] operands, transposed.
  auto dy = quantize(test_input(200, 192).to(torch::kCUDA), {Fp8Format::kE4M3, ScalingMode::kTile128x1, false, "dy"});
  auto x = quantize(test_input(200, 136).to(torch::kCUDA), {Fp8Format::kE4M3, ScalingMode::kTile128x1, false, "x"});
  auto dyt = transposed(dy), xt = transposed(x);
  expect_close_to_reference(fp8_gemm(dyt, xt, torch::kFloat), dyt, xt);
}

// The same FP8 Linear step on the CPU (emulation) and on CUDA (cuBLASLt FP8).
TEST(Fp8Cuda, LinearForwardAndBackwardMatchTheCpuEmulation_CUDA) {
  SKIP_WITHOUT_GPU();
  auto rel = [](const torch::Tensor& got, const torch::Tensor& want) {
    auto g = got.cpu().to(torch::kDouble), w = want.to(torch::kDouble);
    return ((g - w).norm() / w.norm()).item<double>();
  };
  for (auto [recipe, formats] : std::vector<std::pair<Fp8Recipe, Fp8Formats>>{
           {Fp8Recipe::kBlockwise, Fp8Formats::kE4M3},
           {Fp8Recipe::kBlockwise, Fp8Formats::kHybrid},
           {Fp8Recipe::kCurrent, Fp8Formats::kE4M3},
           {Fp8Recipe::kCurrent, Fp8Formats::kHybrid},
           {Fp8Recipe::kDelayed, Fp8Formats::kE4M3}}) {
    for (int64_t tokens : {256, 100}) {
      SCOPED_TRACE(to_string(recipe) + " " + to_string(formats) + " tokens " + std::to_string(tokens));
      Fp8Options o;
      o.recipe = recipe;
      o.formats = formats;
      torch::manual_seed(11);
      Linear cpu(256, 192, true), gpu(256, 192, true);
      torch::NoGradGuard no_grad;
      gpu->weight.copy_(cpu->weight);
      gpu->bias.copy_(cpu->bias);
      gpu->to(torch::kCUDA);
      cpu->enable_fp8(o, "layer");
      gpu->enable_fp8(o, "layer");
      auto x = torch::randn({tokens, 256}) * 2;
      auto dy = torch::randn({tokens, 192});
      std::vector<torch::Tensor> results[2];
      int side = 0;
      for (Linear* layer : {&cpu, &gpu}) {
        torch::AutoGradMode grad(true);
        const auto device = side == 0 ? torch::kCPU : torch::kCUDA;
        // Two steps, so delayed scaling runs on a recorded history.
        for (int step = 0; step < 2; ++step) {
          (*layer)->zero_grad();
          auto xi = x.to(device).requires_grad_(true);
          auto y = (*layer)->forward(xi);
          y.backward(dy.to(device));
          results[side] = {y.detach().cpu(), xi.grad().cpu(), (*layer)->weight.grad().cpu(), (*layer)->bias.grad().cpu()};
        }
        ++side;
      }
      EXPECT_TRUE(results[1][0].device().is_cpu());
      EXPECT_LT(rel(results[1][0], results[0][0]), 5e-3) << "forward";
      EXPECT_LT(rel(results[1][1], results[0][1]), 5e-3) << "input gradient";
      EXPECT_LT(rel(results[1][2], results[0][2]), 5e-3) << "weight gradient";
      EXPECT_LT(rel(results[1][3], results[0][3]), 1e-5) << "bias gradient";
      if (recipe == Fp8Recipe::kDelayed) {
        auto a = cpu->fp8()->state(), b = gpu->fp8()->state();
        ASSERT_EQ(a.size(), b.size());
        for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
      }
    }
  }
}

TEST(Fp8Cuda, GroupedExpertOperandsMatchTheCpu_CUDA) {
  SKIP_WITHOUT_GPU();
  Fp8Options o;
  o.recipe = Fp8Recipe::kBlockwise;
  Fp8GemmState cpu(o, "experts"), gpu(o, "experts");
  torch::manual_seed(2);
  auto rows = test_input(300, 192);
  const std::vector<int64_t> counts = {130, 0, 170};
  for (auto pass : {GemmPass::kForward, GemmPass::kWgrad}) {
    auto want = cpu.qdq_grouped(rows, counts, GemmOperand::kInput, pass, "input");
    auto got = gpu.qdq_grouped(rows.to(torch::kCUDA), counts, GemmOperand::kInput, pass, "input");
    EXPECT_TRUE(torch::equal(got.cpu(), want));
  }
  auto weights = torch::randn({3, 192, 256});
  EXPECT_TRUE(torch::equal(gpu.qdq_grouped(weights.to(torch::kCUDA), {}, GemmOperand::kWeight, GemmPass::kForward, "w").cpu(),
                           cpu.qdq_grouped(weights, {}, GemmOperand::kWeight, GemmPass::kForward, "w")));
}

// fp8_gemm's CPU back end and its operand rules (no GPU needed).
TEST(Fp8Gemm, CpuEmulationIsTheProductOfTheDequantizedOperands) {
  torch::manual_seed(4);
  auto qa = quantize(test_input(70, 200), {Fp8Format::kE4M3, ScalingMode::kTile1x128, false, "a"});
  auto qb = quantize(test_input(90, 200), {Fp8Format::kE4M3, ScalingMode::kBlock128x128, false, "b"});
  auto d = fp8_gemm(qa, qb, torch::kFloat);
  auto ref = qa.dequantize().to(torch::kDouble).mm(qb.dequantize().to(torch::kDouble).t());
  EXPECT_LT(((d.to(torch::kDouble) - ref).abs().max() / ref.abs().max()).item<double>(), 1e-6);
  EXPECT_EQ(fp8_gemm(qa, qb, torch::kBFloat16).scalar_type(), torch::kBFloat16);

  auto q128x1 = quantize(test_input(70, 200), {Fp8Format::kE4M3, ScalingMode::kTile128x1, false, "c"});
  EXPECT_BRIGADE_ERROR(fp8_gemm(q128x1, qb, torch::kFloat), "unsupported scaling pair");
  EXPECT_BRIGADE_ERROR(fp8_gemm(qb, qb, torch::kFloat), "not both blocks");
  auto qt = quantize(test_input(90, 200), {Fp8Format::kE4M3, ScalingMode::kPerTensorCurrent, false, "t"});
  EXPECT_BRIGADE_ERROR(fp8_gemm(qa, qt, torch::kFloat), "unsupported scaling pair");
  EXPECT_BRIGADE_ERROR(fp8_gemm(qa, quantize(test_input(90, 100), {}), torch::kFloat), "expected A [M, K] and B [N, K]");
}

TEST(Fp8Gemm, TransposedOperandsHoldTheSameValues) {
  torch::manual_seed(6);
  for (auto mode : {ScalingMode::kTile128x1, ScalingMode::kTile1x128, ScalingMode::kBlock128x128,
                    ScalingMode::kPerTensorCurrent}) {
    auto q = quantize(test_input(150, 260), {Fp8Format::kE5M2, mode, false, "x"});
    auto t = transposed(q);
    EXPECT_EQ(t.data.sizes(), (std::vector<int64_t>{260, 150}));
    EXPECT_TRUE(torch::equal(t.dequantize(), q.dequantize().t())) << to_string(mode);
  }
  // The Wgrad form: two 128x1-tiled [tokens, features] operands, transposed, multiply.
  auto dy = quantize(test_input(200, 64), {Fp8Format::kE4M3, ScalingMode::kTile128x1, false, "dy"});
  auto x = quantize(test_input(200, 48), {Fp8Format::kE4M3, ScalingMode::kTile128x1, false, "x"});
  auto dw = fp8_gemm(transposed(dy), transposed(x), torch::kFloat);
  // Against the exact product: the dequantized operands are float32 values and
  // their products are exact in float64. A float32 dot product of K terms is off
  // by at most gamma_n * sum |a_k b_k| (Higham, Accuracy and Stability of Numerical
  // Algorithms, 3.1), gamma_n = n u / (1 - n u), u = 2^-24; n = K + 4 also covers
  // the roundings of the two scales and of the per-block rescale. A fixed relative
  // tolerance failed under MKL_CBWR=AVX2 where cancellation makes an entry small.
  const auto a = dy.dequantize().t().to(torch::kDouble), b = x.dequantize().to(torch::kDouble);
  const double n = static_cast<double>(a.size(1) + 4), u = std::ldexp(1.0, -24);
  const auto bound = (n * u / (1 - n * u)) * a.abs().mm(b.abs());
  const auto error = (dw.to(torch::kDouble) - a.mm(b)).abs();
  EXPECT_TRUE((error <= bound).all().item<bool>()) << "worst error / bound " << (error / bound).max().item<double>();
}

TEST(Fp8Gemm, LaunchersFailWithAnErrorWithoutAGpu) {
  if (brigade::cuda_device_count() > 0) GTEST_SKIP() << "a GPU is visible";
  // Without a device (or without CUDA in the build) the launchers throw; they never crash.
  fp8_cuda::GemmArgs g;
  g.m = g.n = g.k = 16;
  g.out_type = fp8_cuda::OutType::kFloat32;
  EXPECT_THROW(fp8_cuda::gemm(g, nullptr), brigade::Error);
}

}  // namespace
}  // namespace brigade::precision
