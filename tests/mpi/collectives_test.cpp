// Every collective of the MPI communicator against values computed locally.
// These tests run when the suite is started under mpirun (CTest does, with 2 and
// 4 ranks: tests/CMakeLists.txt); started alone they skip.
#include <gtest/gtest.h>

#include <chrono>
#include <string>

#include <torch/torch.h>

#include "launch/world.h"
#include "parallel/communicator.h"
#include "tests/mpi/mpi_world.h"
#include "tests/testing.h"

namespace brigade::parallel {
namespace {

using testing::mpi_world;

#define REQUIRE_MPI_WORLD(var)                                              \
  Communicator* var = mpi_world();                                          \
  if (var == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun"

// Rank r's test tensor: [rows, 3] with values that identify rank, row and column.
torch::Tensor rank_tensor(int r, int64_t rows, torch::ScalarType dtype = torch::kFloat) {
  return (torch::arange(rows * 3, torch::kDouble).view({rows, 3}) + 1000.0 * r).to(dtype);
}

TEST(MpiCollectives, AllReduceSumMaxMinInEveryDtype) {
  REQUIRE_MPI_WORLD(world);
  const int n = world->size();
  for (auto dtype : {torch::kFloat, torch::kDouble, torch::kLong, torch::kBFloat16}) {
    auto expected_sum = torch::zeros({4, 3}, torch::kDouble);
    for (int r = 0; r < n; ++r) expected_sum += rank_tensor(r, 4, dtype).to(torch::kDouble);
    auto t = rank_tensor(world->rank(), 4, dtype);
    world->all_reduce(t, ReduceOp::kSum).wait();
    EXPECT_TRUE(torch::equal(t, expected_sum.to(dtype))) << dtype;
    auto hi = rank_tensor(world->rank(), 4, dtype), lo = rank_tensor(world->rank(), 4, dtype);
    auto h1 = world->all_reduce(hi, ReduceOp::kMax);
    auto h2 = world->all_reduce(lo, ReduceOp::kMin);  // two in flight at once
    h2.wait();
    h1.wait();
    EXPECT_TRUE(torch::equal(hi, rank_tensor(n - 1, 4, dtype))) << dtype;
    EXPECT_TRUE(torch::equal(lo, rank_tensor(0, 4, dtype))) << dtype;
  }
}

TEST(MpiCollectives, ReduceScatterAndAllGather) {
  REQUIRE_MPI_WORLD(world);
  const int n = world->size(), me = world->rank();
  auto input = rank_tensor(me, 2 * n);
  auto out = torch::empty({2, 3});
  world->reduce_scatter(input, out, ReduceOp::kSum).wait();
  auto expected = torch::zeros({2 * n, 3});
  for (int r = 0; r < n; ++r) expected += rank_tensor(r, 2 * n);
  EXPECT_TRUE(torch::equal(out, expected.narrow(0, 2 * me, 2)));

  auto gathered = torch::empty({3 * n, 3});
  world->all_gather(rank_tensor(me, 3), gathered).wait();
  for (int r = 0; r < n; ++r) EXPECT_TRUE(torch::equal(gathered.narrow(0, 3 * r, 3), rank_tensor(r, 3))) << r;
}

TEST(MpiCollectives, BroadcastFromEveryRoot) {
  REQUIRE_MPI_WORLD(world);
  for (int root = 0; root < world->size(); ++root) {
    auto t = rank_tensor(world->rank(), 5, torch::kBFloat16);
    world->broadcast(t, root).wait();
    EXPECT_TRUE(torch::equal(t, rank_tensor(root, 5, torch::kBFloat16))) << "root " << root;
  }
}

TEST(MpiCollectives, AllToAllWithUnevenAndEmptySplits) {
  REQUIRE_MPI_WORLD(world);
  const int n = world->size(), me = world->rank();
  // Rank s sends (s + r) % 3 rows to rank r (zero for some pairs, itself included);
  // row i of the block from s to r holds 100 s + 10 r + i in every column.
  auto rows = [](int s, int r) { return static_cast<int64_t>((s + r) % 3); };
  auto block = [](int s, int r, int64_t count) {
    return (torch::arange(count, torch::kFloat) + 100.0f * s + 10.0f * r).unsqueeze(1).expand({count, 4}).contiguous();
  };
  std::vector<int64_t> send(n), recv(n);
  std::vector<torch::Tensor> parts, expected_parts;
  for (int r = 0; r < n; ++r) {
    send[r] = rows(me, r);
    recv[r] = rows(r, me);
    parts.push_back(block(me, r, send[r]));
    expected_parts.push_back(block(r, me, recv[r]));
  }
  auto input = torch::cat(parts);
  auto expected = torch::cat(expected_parts);
  auto output = torch::full(expected.sizes(), -1.0f);
  world->all_to_all(input, send, output, recv).wait();
  EXPECT_TRUE(torch::equal(output, expected));

  // Nothing to send or receive at all.
  auto none = torch::empty({0, 4});
  auto none_out = torch::empty({0, 4});
  world->all_to_all(none, std::vector<int64_t>(n, 0), none_out, std::vector<int64_t>(n, 0)).wait();
}

TEST(MpiCollectives, SendRecvAroundARing) {
  REQUIRE_MPI_WORLD(world);
  const int n = world->size(), me = world->rank();
  auto out = rank_tensor(me, 2);
  auto in = torch::empty({2, 3});
  auto r = world->recv(in, (me + n - 1) % n, 7);
  auto s = world->send(out, (me + 1) % n, 7);
  s.wait();
  r.wait();
  EXPECT_TRUE(torch::equal(in, rank_tensor((me + n - 1) % n, 2)));
}

TEST(MpiCollectives, SplitGroupsAreIndependent) {
  REQUIRE_MPI_WORLD(world);
  const int me = world->rank();
  auto group = world->split(me % 2, me, "dp");
  EXPECT_EQ(group->name(), "dp");
  EXPECT_EQ(group->size(), (world->size() + 1 - me % 2) / 2);
  EXPECT_EQ(group->rank(), me / 2);
  auto t = torch::tensor({static_cast<double>(me)});
  group->all_reduce(t, ReduceOp::kSum).wait();
  double expected = 0;
  for (int r = me % 2; r < world->size(); r += 2) expected += r;
  EXPECT_EQ(t.item<double>(), expected);
  group->barrier().wait();
  world->barrier().wait();
}

TEST(MpiCollectives, ALateRankIsATimeoutNamingTheCollective) {
  REQUIRE_MPI_WORLD(world);
  const int n = world->size();
  // A second handle on the world with a 2 s timeout, and a group of its own so the
  // operation rank 0 gives up on cannot disturb later tests.
  auto impatient = make_world_communicator(launch::detect_world().world, {Backend::kMpi, std::chrono::seconds(2)});
  auto group = impatient->split(0, world->rank(), "timeout-test");
  auto t = torch::ones({4});
  if (world->rank() == 0) {
    const auto start = std::chrono::steady_clock::now();
    auto h = group->all_reduce(t, ReduceOp::kSum);
    try {
      h.wait();
      ADD_FAILURE() << "the all_reduce finished without the other ranks";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("all_reduce on rank 0/" + std::to_string(n) +
                                           " of timeout-test did not finish within 2 s"),
                std::string::npos)
          << e.what();
    }
    const auto waited = std::chrono::steady_clock::now() - start;
    EXPECT_GE(waited, std::chrono::seconds(2));
    EXPECT_LT(waited, std::chrono::seconds(10));
    world->barrier().wait();  // now the others join the all_reduce...
    world->barrier().wait();  // ...and have finished it
    h.wait();                 // so the one rank 0 abandoned completes too
  } else {
    world->barrier().wait();  // only after rank 0 timed out
    group->all_reduce(t, ReduceOp::kSum).wait();
    world->barrier().wait();
  }
  EXPECT_EQ(t[0].item<float>(), static_cast<float>(n));
}

}  // namespace
}  // namespace brigade::parallel
