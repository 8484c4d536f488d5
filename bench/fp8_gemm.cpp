// bench_fp8_gemm: the CUDA FP8 back end against what it replaces, each pair
// measured in the same run (medians of CUDA-event timings on torch's current
// stream). Issue targets: quantize >= 70% of device copy bandwidth; FP8
// block-scaled GEMM >= 1.5x BF16 cuBLAS at 4096^3 and 8192^3.
//
//   bench_fp8_gemm [--reps 20] [--hidden 8192] [--tokens 8192]
//
// (a) quantize 1x128 / 128x128 (float32 in, E4M3 codes + scales out) GB/s vs a
//     device-to-device tensor copy; bytes = what each pass must move.
// (b) FP8 GEMM TFLOP/s (1x128 x 128x128 block scaling, and per tensor; bf16 out)
//     vs BF16 torch::mm, on already-quantized operands.
// (c) FP8 Linear forward+backward (blockwise recipe, quantization included) vs
//     BF16 torch linear forward+backward, [tokens, hidden] x [hidden, hidden].
// Without a GPU it prints one line and exits 0.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <vector>

#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/torch.h>

#include "core/device.h"
#include "precision/fp8_gemm.h"
#include "precision/linear.h"
#include "precision/quantize.h"

namespace {

// Median milliseconds of fn over `reps` runs, timed with CUDA events on the
// current stream (no host sync inside the timed region).
double median_ms(int reps, const std::function<void()>& fn) {
  const c10::Device device(c10::DeviceType::CUDA, 0);
  const auto stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  for (int i = 0; i < 3; ++i) fn();  // warm-up: heuristics, allocator, clocks
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    c10::Event start(c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT);
    c10::Event stop(c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT);
    start.record(stream);
    fn();
    stop.record(stream);
    stop.synchronize();
    t.push_back(start.elapsedTime(stop));
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"CUDA FP8 quantize / GEMM / Linear vs copy bandwidth and BF16"};
  int reps = 20;
  int64_t hidden = 8192, tokens = 8192;
  app.add_option("--reps", reps);
  app.add_option("--hidden", hidden);
  app.add_option("--tokens", tokens);
  CLI11_PARSE(app, argc, argv);
  if (brigade::cuda_device_count() == 0 || !torch::cuda::is_available()) {
    std::printf("bench_fp8_gemm: no CUDA device (or brigade built without CUDA); nothing to measure\n");
    return 0;
  }
  using namespace brigade::precision;
  torch::NoGradGuard no_grad;
  const auto cuda = torch::TensorOptions().device(torch::kCUDA);
  std::printf("%s, median of %d\n\n", brigade::describe_devices().c_str(), reps);

  // (a) Quantize vs device copy.
  {
    const int64_t rows = 8192, cols = 8192;
    auto x = torch::randn({rows, cols}, cuda);
    auto copy = torch::empty_like(x);
    const double n = static_cast<double>(rows * cols);
    const double copy_ms = median_ms(reps, [&] { copy.copy_(x); });
    const double copy_bw = 8.0 * n / (copy_ms * 1e-3);
    std::printf("(a) FP8 E4M3 quantization, %lld x %lld float32\n\n", static_cast<long long>(rows),
                static_cast<long long>(cols));
    std::printf("| pass | ms | GB/s | of copy |\n|---|---|---|---|\n");
    std::printf("| device copy (tensor copy_) | %.3f | %.0f | 100%% |\n", copy_ms, copy_bw / 1e9);
    for (auto mode : {ScalingMode::kTile1x128, ScalingMode::kBlock128x128, ScalingMode::kPerTensorCurrent}) {
      const QuantizeOptions o{Fp8Format::kE4M3, mode, false, "x"};
      int64_t scale_bytes = quantize(x, o).scales.numel() * 4;
      // Each call also reads back the NaN flag (one small device-to-host copy).
      const double ms = median_ms(reps, [&] { quantize(x, o); });
      const double bw = (5.0 * n + static_cast<double>(scale_bytes)) / (ms * 1e-3);
      std::printf("| quantize %s | %.3f | %.0f | %.0f%% |\n", to_string(mode).c_str(), ms, bw / 1e9,
                  100.0 * bw / copy_bw);
    }
    std::printf("\n");
  }

  // (b) GEMM TFLOP/s.
  std::printf("(b) GEMM D[M,N] = A[M,K] B[N,K]^T, bf16 out\n\n");
  std::printf("| M=N=K | BF16 torch::mm TFLOP/s | FP8 1x128 x 128x128 TFLOP/s | ratio | FP8 per-tensor TFLOP/s | ratio |\n");
  std::printf("|---|---|---|---|---|---|\n");
  for (int64_t size : {4096, 8192}) {
    auto a = torch::randn({size, size}, cuda), b = torch::randn({size, size}, cuda);
    auto a16 = a.to(torch::kBFloat16), b16 = b.to(torch::kBFloat16);
    auto qa = quantize(a, {Fp8Format::kE4M3, ScalingMode::kTile1x128, false, "a"});
    auto qb = quantize(b, {Fp8Format::kE4M3, ScalingMode::kBlock128x128, false, "b"});
    auto ta = quantize(a, {Fp8Format::kE4M3, ScalingMode::kPerTensorCurrent, false, "a"});
    auto tb = quantize(b, {Fp8Format::kE4M3, ScalingMode::kPerTensorCurrent, false, "b"});
    const double flops = 2.0 * static_cast<double>(size) * size * size;
    const double bf16_ms = median_ms(reps, [&] { torch::mm(a16, b16.t()); });
    const double block_ms = median_ms(reps, [&] { fp8_gemm(qa, qb, torch::kBFloat16); });
    const double tensor_ms = median_ms(reps, [&] { fp8_gemm(ta, tb, torch::kBFloat16); });
    auto tflops = [&](double ms) { return flops / (ms * 1e-3) / 1e12; };
    std::printf("| %lld | %.0f | %.0f | %.2fx | %.0f | %.2fx |\n", static_cast<long long>(size), tflops(bf16_ms),
                tflops(block_ms), bf16_ms / block_ms, tflops(tensor_ms), bf16_ms / tensor_ms);
  }
  std::printf("\n");

  // (c) Linear forward + backward.
  {
    torch::AutoGradMode grad(true);
    Fp8Options fp8;
    fp8.recipe = Fp8Recipe::kBlockwise;
    Linear bf16_layer(hidden, hidden, false), fp8_layer(hidden, hidden, false);
    bf16_layer->to(torch::kCUDA);
    fp8_layer->to(torch::kCUDA);
    fp8_layer->enable_fp8(fp8, "bench");
    auto x = torch::randn({tokens, hidden}, cuda.dtype(torch::kBFloat16)).requires_grad_(true);
    auto dy = torch::randn({tokens, hidden}, cuda.dtype(torch::kBFloat16));
    // BF16: master weights FP32, the GEMMs in BF16 (what autocast runs); gradients
    // flow back to the FP32 weight through the cast.
    const double bf16_ms = median_ms(reps, [&] {
      auto y = torch::nn::functional::linear(x, bf16_layer->weight.to(torch::kBFloat16));
      y.backward(dy);
    });
    const double fp8_ms = median_ms(reps, [&] {
      auto y = fp8_layer->forward(x);
      y.backward(dy);
    });
    const double flops = 3 * 2.0 * static_cast<double>(tokens) * hidden * hidden;
    std::printf("(c) Linear forward+backward, tokens %lld, hidden %lld -> %lld (3 GEMMs)\n\n",
                static_cast<long long>(tokens), static_cast<long long>(hidden), static_cast<long long>(hidden));
    std::printf("| layer | ms | TFLOP/s | speed-up |\n|---|---|---|---|\n");
    std::printf("| BF16 torch linear | %.3f | %.0f | 1.00x |\n", bf16_ms, flops / (bf16_ms * 1e-3) / 1e12);
    std::printf("| FP8 Linear (blockwise, quantization included) | %.3f | %.0f | %.2fx |\n", fp8_ms,
                flops / (fp8_ms * 1e-3) / 1e12, bf16_ms / fp8_ms);
  }
  return 0;
}
