// The single-process half of expert parallelism: the dispatch layout (counts,
// reorder gathers) built from given counts, dispatch/combine over a group of one,
// and input checks. tests/mpi/expert_parallel_test.cpp covers real groups.
#include <gtest/gtest.h>

#include <chrono>

#include <torch/torch.h>

#include "moe/expert_parallel.h"
#include "parallel/communicator.h"
#include "precision/quantize.h"
#include "tests/testing.h"

namespace brigade {
namespace {

std::vector<int64_t> values(const torch::Tensor& t) {
  auto c = t.to(torch::kLong).contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()};
}

// Rank 1 of 3 with 2 local experts (global experts 2 and 3); sources send
// [source][local expert] blocks: source 0: 1 and 2 rows, source 1: 0 and 3, source 2: 2 and 0.
TEST(ExpertParallel, LayoutGroupsReceivedRowsByLocalExpert) {
  auto recv = torch::tensor({1, 2, 0, 3, 2, 0}, torch::kLong).view({3, 2});
  // This rank's own rows per global expert (it sends 1 + 0, 0 + 3, 4 + 1 rows to ranks 0, 1, 2).
  const std::vector<int64_t> counts = {1, 0, 0, 3, 4, 1};
  auto l = moe::make_layout(counts, recv);
  EXPECT_EQ(l.local_experts, 2);
  EXPECT_EQ(l.send_rows, (std::vector<int64_t>{1, 3, 5}));
  EXPECT_EQ(l.recv_rows, (std::vector<int64_t>{3, 3, 2}));
  EXPECT_EQ(l.local_counts, (std::vector<int64_t>{3, 5}));
  EXPECT_EQ(l.sent(), 9);
  EXPECT_EQ(l.received(), 8);
  // Received (source-major): s0e0 | s0e1 s0e1 | s1e1 s1e1 s1e1 | s2e0 s2e0 = rows 0..7.
  // Expert 0 gets s0's row 0 then s2's rows 6, 7; expert 1 gets s0's 1, 2 then s1's 3, 4, 5.
  ASSERT_TRUE(l.to_expert_major.defined());
  EXPECT_EQ(values(l.to_expert_major), (std::vector<int64_t>{0, 6, 7, 1, 2, 3, 4, 5}));
  ASSERT_TRUE(l.to_source_major.defined());
  EXPECT_TRUE(torch::equal(l.to_expert_major.index_select(0, l.to_source_major), torch::arange(8, torch::kLong)));
}

TEST(ExpertParallel, LayoutSkipsTheReorderWhenOrdersCoincide) {
  // Each local expert fed by one source, in source order: no gather needed.
  auto l = moe::make_layout({2, 0, 0, 3}, torch::tensor({2, 0, 0, 3}, torch::kLong).view({2, 2}));
  EXPECT_FALSE(l.to_expert_major.defined());
  EXPECT_FALSE(l.to_source_major.defined());
  // Nothing received at all.
  auto none = moe::make_layout({0, 0, 0, 0}, torch::zeros({2, 2}, torch::kLong));
  EXPECT_EQ(none.received(), 0);
  EXPECT_EQ(none.local_counts, (std::vector<int64_t>{0, 0}));
}

TEST(ExpertParallel, BadCountsAreErrors) {
  EXPECT_BRIGADE_ERROR(moe::make_layout({1, 2, 3}, torch::zeros({2, 2}, torch::kLong)), "3 expert counts for 2 ranks");
  EXPECT_BRIGADE_ERROR(moe::make_layout({1, 2, 3, 4}, torch::tensor({1, -1, 0, 0}, torch::kLong).view({2, 2})),
                       "negative received counts");
  auto single = parallel::make_world_communicator({}, {parallel::Backend::kSingle, std::chrono::seconds(5)});
  EXPECT_BRIGADE_ERROR(moe::dispatch(*single, torch::zeros({4, 8}), torch::zeros({4}), {1, 2}, false),
                       "do not match the 3 rows");
  EXPECT_BRIGADE_ERROR(moe::dispatch(*single, torch::zeros({3, 8}), torch::zeros({2}), {1, 2}, false),
                       "routing weights");
}

// Over a group of one, dispatch and combine are the identity (the FP8 dispatch: the
// 1x128 quantize-dequantize), and gradients pass straight through.
TEST(ExpertParallel, GroupOfOneIsTheIdentity) {
  auto single = parallel::make_world_communicator({}, {parallel::Backend::kSingle, std::chrono::seconds(5)});
  torch::manual_seed(3);
  auto rows = torch::randn({7, 200}).requires_grad_(true);
  auto weights = torch::rand({7}).requires_grad_(true);
  for (bool fp8 : {false, true}) {
    auto d = moe::dispatch(*single, rows, weights, {3, 0, 4}, fp8);
    EXPECT_EQ(d.layout.local_counts, (std::vector<int64_t>{3, 0, 4}));
    precision::QuantizeOptions qo;
    qo.mode = precision::ScalingMode::kTile1x128;
    auto expected = fp8 ? precision::fake_quantize(rows.detach(), qo) : rows.detach();
    EXPECT_TRUE(torch::equal(d.rows, expected)) << "fp8 " << fp8;
    EXPECT_TRUE(torch::equal(d.weights, weights.detach()));
    auto back = moe::combine(*single, d.rows * d.weights.unsqueeze(1), d.layout);
    auto probe = torch::randn({7, 200});
    rows.mutable_grad() = torch::Tensor();
    weights.mutable_grad() = torch::Tensor();
    (back * probe).sum().backward();
    EXPECT_TRUE(torch::allclose(rows.grad(), probe * weights.detach().unsqueeze(1))) << "fp8 " << fp8;
    EXPECT_TRUE(torch::allclose(weights.grad(), (probe * expected).sum(1), 1e-5, 1e-5)) << "fp8 " << fp8;
  }
}

}  // namespace
}  // namespace brigade
