// The single-process half of expert parallelism: the dispatch layout built from
// given counts, the expert-parallel sort keys, dispatch/combine over a group of one,
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

// Rank 1 of 3 with 2 local experts (global experts 2 and 3). Sources send, for
// local experts 0 and 1: source 0: 1 and 2 rows, source 1: 0 and 3, source 2: 2 and 0.
TEST(ExpertParallel, LayoutCountsRowsPerRankAndLocalExpert) {
  auto recv = torch::tensor({1, 0, 2, 2, 3, 0}, torch::kLong).view({2, 3});  // [local expert, source]
  // This rank's rows per key e*P + j (global expert j*2 + e): to ranks 0, 1, 2 it
  // sends 1 + 0, 0 + 3, 4 + 1 rows.
  const std::vector<int64_t> counts = {1, 0, 4, 0, 3, 1};
  auto l = moe::make_layout(counts, recv);
  EXPECT_EQ(l.local_experts, 2);
  EXPECT_TRUE(torch::equal(l.send_counts, torch::tensor({1, 0, 4, 0, 3, 1}, torch::kLong).view({2, 3})));
  EXPECT_EQ(l.send_rows, (std::vector<int64_t>{1, 3, 5}));
  EXPECT_EQ(l.recv_rows, (std::vector<int64_t>{3, 3, 2}));
  EXPECT_EQ(l.local_counts, (std::vector<int64_t>{3, 5}));
  EXPECT_EQ(l.sent(), 9);
  EXPECT_EQ(l.received(), 8);
  auto none = moe::make_layout({0, 0, 0, 0}, torch::zeros({2, 2}, torch::kLong));
  EXPECT_EQ(none.received(), 0);
  EXPECT_EQ(none.local_counts, (std::vector<int64_t>{0, 0}));
}

// Global expert j*L + e has key e*P + j; per-key vectors map back.
TEST(ExpertParallel, KeysOrderByLocalExpertThenRank) {
  auto experts = torch::arange(6, torch::kLong);  // 3 ranks of 2 experts
  auto keys = moe::expert_parallel_keys(experts, 6, 3);
  EXPECT_TRUE(torch::equal(keys, torch::tensor({0, 3, 1, 4, 2, 5}, torch::kLong)));
  auto per_key = torch::zeros({6}, torch::kLong).index_put_({keys}, experts * 10);
  EXPECT_TRUE(torch::equal(moe::global_expert_order(per_key, 3), experts * 10));
  // One rank: the keys are the experts.
  EXPECT_TRUE(torch::equal(moe::expert_parallel_keys(experts, 6, 1), experts));
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
