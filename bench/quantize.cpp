// bench_quantize: FP8 quantization throughput on the CPU against memcpy bandwidth
// measured in the same run (the target: >= 40% for 1x128 and 128x128).
//
//   bench_quantize [--rows 8192] [--cols 8192] [--threads 2] [--reps 7]
//
// Bandwidth of a pass = bytes it must move / seconds: memcpy reads and writes 4
// bytes per float32 element; quantize reads 4 and writes 1 (the code) per element,
// plus the scales. Both write into existing buffers, as a training step that
// reuses them does (quantize_into); the "fresh output" rows allocate the codes
// every call. Prints one
// table with medians and the ratio. The allocator is configured as in `brigade`
// (launch::configure_allocator), so freed buffers are reused from the heap.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include <torch/torch.h>

#include "bench/timing.h"
#include "launch/commands.h"
#include "precision/quantize.h"

using brigade::bench::median_seconds;

int main(int argc, char** argv) {
  CLI::App app{"FP8 quantization throughput vs memcpy bandwidth"};
  int64_t rows = 8192, cols = 8192;
  int threads = 2, reps = 7;
  app.add_option("--rows", rows);
  app.add_option("--cols", cols);
  app.add_option("--threads", threads);
  app.add_option("--reps", reps);
  CLI11_PARSE(app, argc, argv);
  using namespace brigade::precision;
  // As the brigade executable does: freed large blocks stay in the heap, so a fresh
  // output buffer is not faulted in page by page on every call.
  brigade::launch::configure_allocator();
  at::set_num_threads(threads);
  auto x = torch::randn({rows, cols});
  auto copy = torch::empty_like(x);
  const double n = static_cast<double>(rows * cols);
  const double memcpy_s = median_seconds(reps, [&] { copy.copy_(x); });
  const double memcpy_bw = 8.0 * n / memcpy_s;
  std::printf("FP8 E4M3 quantization, %lld x %lld float32, %d threads, median of %d\n", static_cast<long long>(rows),
              static_cast<long long>(cols), threads, reps);
  std::printf("| pass | ms | GB/s | of memcpy |\n|---|---|---|---|\n");
  std::printf("| memcpy (tensor copy) | %.1f | %.1f | 100%% |\n", 1e3 * memcpy_s, memcpy_bw / 1e9);
  for (auto mode : {ScalingMode::kTile1x128, ScalingMode::kBlock128x128, ScalingMode::kPerTensorCurrent}) {
    QuantizeOptions o{Fp8Format::kE4M3, mode, false, "x"};
    QuantizedTensor q;
    const double s = median_seconds(reps, [&] { quantize_into(x, o, q); });
    const double fresh_s = median_seconds(reps, [&] { auto fresh = quantize(x, o); });
    const double bytes = 5.0 * n + static_cast<double>(q.scales.numel() * 4);
    std::printf("| quantize %s | %.1f | %.1f | %.0f%% |\n", to_string(mode).c_str(), 1e3 * s, bytes / s / 1e9,
                100.0 * bytes / s / memcpy_bw);
    std::printf("| ... fresh output buffer | %.1f | %.1f | %.0f%% |\n", 1e3 * fresh_s, bytes / fresh_s / 1e9,
                100.0 * bytes / fresh_s / memcpy_bw);
  }
  return 0;
}
