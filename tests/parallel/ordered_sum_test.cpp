// Reproducible sums (parallel/ordered_sum.h): the canonical order decomposes into
// per-rank partial sums bit for bit, and the gradient norm does not depend on
// how the buckets are padded or split.
#include <gtest/gtest.h>

#include <cmath>
#include <tuple>
#include <vector>

#include <torch/torch.h>

#include "parallel/ordered_sum.h"
#include "parallel/reducer.h"

namespace brigade::parallel {
namespace {

// Terms whose float32 sum visibly depends on the order: magnitudes over 2^20.
std::vector<torch::Tensor> terms(int64_t count, int64_t n = 257) {
  torch::manual_seed(3);
  std::vector<torch::Tensor> out;
  for (int64_t i = 0; i < count; ++i) {
    out.push_back(torch::randn({n}) * std::pow(2.0, static_cast<double>((i * 7) % 21)));
  }
  return out;
}

torch::Tensor canonical(const std::vector<torch::Tensor>& xs, int64_t begin, int64_t count) {
  PairwiseSum sum;
  for (int64_t i = begin; i < begin + count; ++i) sum.add(xs[i].clone());
  return sum.take();
}

// Global micro-batch g = rank * accum + micro: each rank sums its accum terms, the
// ranks' sums are added in rank order, and the bits are those of one process.
TEST(PairwiseSum, RanksTimesPowerOfTwoAccumulationGiveTheBitsOfOneProcess) {
  for (const auto& [ranks, accum] : {std::tuple{2, 4}, {4, 2}, {8, 1}, {1, 8}, {3, 2}, {6, 1}, {5, 4}, {7, 1}}) {
    const auto xs = terms(ranks * accum);
    const auto whole = canonical(xs, 0, ranks * accum);
    PairwiseSum over_ranks;
    for (int r = 0; r < ranks; ++r) over_ranks.add(canonical(xs, r * accum, accum));
    EXPECT_TRUE(torch::equal(over_ranks.take(), whole)) << ranks << " ranks x " << accum;
  }
}

// The test above can fail: on these terms another grouping gives other bits.
TEST(PairwiseSum, TheOrderMattersOnTheseTerms) {
  const auto xs = terms(8);
  auto left_to_right = xs[0].clone();
  for (size_t i = 1; i < xs.size(); ++i) left_to_right += xs[i];
  const auto pairwise = canonical(xs, 0, 8);
  EXPECT_FALSE(torch::equal(left_to_right, pairwise));
  EXPECT_TRUE(torch::allclose(left_to_right, pairwise, 1e-5, 1.0));
  // Three terms: (a + b) + c, the counter's grouping for three.
  auto expected = (xs[0] + xs[1]) + xs[2];
  EXPECT_TRUE(torch::equal(canonical(xs, 0, 3), expected));
  // Seven: ((0..3) + ((4 + 5) + 6)), the leftovers folded from the right.
  auto first4 = (xs[0] + xs[1]) + (xs[2] + xs[3]);
  EXPECT_TRUE(torch::equal(canonical(xs, 0, 7), first4 + ((xs[4] + xs[5]) + xs[6])));
}

TEST(PairwiseSum, UndefinedTermsAreZeros) {
  const auto xs = terms(4);
  PairwiseSum with_gaps, with_zeros;
  for (int i = 0; i < 4; ++i) {
    with_gaps.add(i == 1 ? torch::Tensor() : xs[i].clone());
    with_zeros.add(i == 1 ? torch::zeros_like(xs[i]) : xs[i].clone());
  }
  EXPECT_EQ(with_gaps.terms(), 4);
  EXPECT_TRUE(torch::equal(with_gaps.take(), with_zeros.take()));
  EXPECT_EQ(with_gaps.terms(), 0);
  PairwiseSum none;
  none.add({});
  EXPECT_FALSE(none.take().defined());
}

TEST(MicroBatchGradients, FoldsStashedGradientsInTheCanonicalOrder) {
  auto w = torch::zeros({257}, torch::requires_grad());
  MicroBatchGradients sums({w});
  const auto xs = terms(4);
  for (int i = 0; i < 4; ++i) {
    (w * xs[i]).sum().backward();  // the gradient is xs[i]
    if (i < 3) {
      sums.stash();
      EXPECT_FALSE(w.grad().defined());
    }
  }
  sums.finish(0);
  EXPECT_TRUE(torch::equal(w.grad(), canonical(xs, 0, 4)));
  sums.finish_all();  // nothing stashed any more: unchanged
  EXPECT_TRUE(torch::equal(w.grad(), canonical(xs, 0, 4)));
}

TEST(BlockSquares, ABlockDependsOnlyOnItsElements) {
  torch::manual_seed(1);
  auto x = torch::randn({3 * kNormBlock}) * 1e3;
  const auto all = block_squares(x);
  ASSERT_EQ(all.numel(), 3);
  for (int64_t b = 0; b < 3; ++b) {
    const auto alone = block_squares(x.narrow(0, b * kNormBlock, kNormBlock).clone());
    EXPECT_EQ(alone.item<double>(), all[b].item<double>()) << "block " << b;
    const double reference = x.narrow(0, b * kNormBlock, kNormBlock).to(torch::kDouble).square().sum().item<double>();
    EXPECT_NEAR(all[b].item<double>(), reference, 1e-12 * reference);
  }
}

// The norm over one process's buckets equals the norm over the padded buckets a
// four-rank reducer would lay out, to the bit, and the float64 value.
TEST(SquareNorm, IsTheSameForAnyPaddingAndCloseToFloat64) {
  torch::manual_seed(2);
  std::vector<torch::Tensor> grads = {torch::randn({64, 33}), torch::randn({5000}), torch::Tensor(), torch::randn({7})};
  std::vector<int64_t> numels = {64 * 33, 5000, 12, 7};
  const int64_t bucket_bytes = 3000 * 4;  // the 5000-element gradient is a bucket of its own
  const double one = square_norm(make_bucket_layout(numels, bucket_bytes, 1), grads).item<double>();
  const double four = square_norm(make_bucket_layout(numels, bucket_bytes, 4), grads).item<double>();
  EXPECT_EQ(one, four);
  double reference = 0.0;
  for (const auto& g : grads) {
    if (g.defined()) reference += g.to(torch::kDouble).square().sum().item<double>();
  }
  EXPECT_NEAR(one, reference, 1e-12 * reference);
  const auto layout = make_bucket_layout(numels, bucket_bytes, 4);
  ASSERT_GE(layout.buckets.size(), 2u);
  for (const auto& b : layout.buckets) {
    EXPECT_EQ(b.shard % kNormBlock, 0);
    EXPECT_GE(b.shard * 4, b.numel);
  }
}

// The fixed tree: adjacent pairs level by level, an odd level's last value paired
// with zero; the same bits on every call and device, whatever the thread count.
TEST(TreeSum, AddsAdjacentPairsLevelByLevel) {
  auto v = torch::tensor({1e16, 1.0, -1e16, 1.0, 3.0}, torch::kDouble);
  const double a = 1e16, b = 1.0, c = -1e16, d = 1.0, e = 3.0;
  const double expected = ((a + b) + (c + d)) + ((e + 0.0) + 0.0);
  EXPECT_EQ(tree_sum(v).item<double>(), expected);
  EXPECT_EQ(tree_sum(torch::zeros({0}, torch::kDouble)).item<double>(), 0.0);
  EXPECT_EQ(tree_sum(torch::tensor({2.5}, torch::kDouble)).item<double>(), 2.5);
  at::set_num_threads(2);
  const auto many = torch::randn({100003}, torch::kDouble);
  const double two = tree_sum(many).item<double>();
  at::set_num_threads(1);
  EXPECT_EQ(tree_sum(many).item<double>(), two);
}

// A bucket whose parameters got no gradient this step counts as the zeros a reducer
// would sum there, so one process and any number of ranks still agree to the bit.
TEST(SquareNorm, ABucketWithoutGradientsIsZerosNotSkipped) {
  torch::manual_seed(3);
  std::vector<torch::Tensor> grads = {torch::randn({3000}), torch::Tensor(), torch::randn({2500}), torch::randn({9})};
  std::vector<int64_t> numels = {3000, 6000, 2500, 9};
  const int64_t bucket_bytes = 3000 * 4;
  const auto one = square_norm(make_bucket_layout(numels, bucket_bytes, 1), grads).item<double>();
  for (int ranks : {2, 3, 4}) {
    EXPECT_EQ(square_norm(make_bucket_layout(numels, bucket_bytes, ranks), grads).item<double>(), one) << ranks;
  }
  double reference = 0.0;
  for (const auto& g : grads) {
    if (g.defined()) reference += g.to(torch::kDouble).square().sum().item<double>();
  }
  EXPECT_NEAR(one, reference, 1e-12 * reference);
}

}  // namespace
}  // namespace brigade::parallel
