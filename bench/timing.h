// Timing for the benchmarks: the median wall time of repeated runs.
#pragma once

#include <algorithm>
#include <chrono>
#include <functional>
#include <vector>

namespace brigade::bench {

// One warm-up call, then the median of `reps` timed calls, in seconds.
inline double median_seconds(int reps, const std::function<void()>& run) {
  run();
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    const auto start = std::chrono::steady_clock::now();
    run();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace brigade::bench
