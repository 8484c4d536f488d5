// brigade::parallel_for: covers the range exactly once, really uses several
// threads when LibTorch has them, and hands a chunk's exception to the caller.
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include <ATen/Parallel.h>

#include "core/parallel_for.h"

namespace brigade {
namespace {

TEST(ParallelFor, CoversTheRangeOnceOnSeveralThreads) {
  const int before = at::get_num_threads();
  at::set_num_threads(2);
  std::vector<std::atomic<int>> hits(10007);
  std::mutex mutex;
  std::set<std::thread::id> threads;
  parallel_for(3, 10007, 100, [&](int64_t b, int64_t e) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      threads.insert(std::this_thread::get_id());
    }
    for (int64_t i = b; i < e; ++i) hits[i] += 1;
  });
  for (int64_t i = 0; i < 10007; ++i) ASSERT_EQ(hits[i].load(), i >= 3 ? 1 : 0) << i;
  EXPECT_EQ(threads.size(), 2u);
  // Less work than one grain: the calling thread alone.
  threads.clear();
  parallel_for(0, 50, 100, [&](int64_t, int64_t) { threads.insert(std::this_thread::get_id()); });
  EXPECT_EQ(threads.size(), 1u);
  at::set_num_threads(before);
}

TEST(ParallelFor, RethrowsAChunksException) {
  const int before = at::get_num_threads();
  at::set_num_threads(2);
  EXPECT_THROW(parallel_for(0, 1000, 10,
                            [&](int64_t b, int64_t) {
                              if (b > 0) throw std::runtime_error("chunk failed");
                            }),
               std::runtime_error);
  at::set_num_threads(before);
}

}  // namespace
}  // namespace brigade
