// Parallel loops for brigade's own CPU kernels.
//
// Why not at::parallel_for: in the LibTorch we build against (OpenMP back end) it
// is an inline template around `#pragma omp parallel`, compiled into *our* code,
// which is built without -fopenmp (linking a second OpenMP runtime beside
// LibTorch's bundled one would fight over the cores). There it silently runs
// serially. This splits the range into at::get_num_threads() chunks: one on the
// calling thread, the others on LibTorch's inter-op pool (at::launch), whose
// threads persist between calls.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <latch>
#include <mutex>

#include <ATen/Parallel.h>

namespace brigade {

// Calls f(b, e) on disjoint subranges covering [begin, end), each at least `grain`
// long (except the last), in parallel; rethrows the first exception after all
// chunks finished.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (chunks <= 1 || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  const int64_t size = (n + chunks - 1) / chunks;
  std::latch done(chunks - 1);
  std::mutex mutex;
  std::exception_ptr error;
  auto run = [&](int64_t b, int64_t e) {
    try {
      if (b < e) f(b, e);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex);
      if (!error) error = std::current_exception();
    }
  };
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t b = begin + c * size, e = std::min(end, b + size);
    at::launch([&, b, e] {
      run(b, e);
      done.count_down();
    });
  }
  run(begin, std::min(end, begin + size));
  done.wait();
  if (error) std::rethrow_exception(error);
}

}  // namespace brigade
