// The chunked cross-entropy against LibTorch's own, computed in float64: value and
// gradient, with ignored targets, chunks that do not divide the rows, and bfloat16
// logits (gradient written in bfloat16).
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "trainer/cross_entropy.h"

namespace brigade {
namespace {

constexpr int64_t kIgnore = -100;

struct Case {
  torch::Tensor logits, targets;
};

Case make_case(int64_t rows, int64_t vocab) {
  torch::manual_seed(7);
  Case c{torch::randn({rows, vocab}) * 3.0, torch::randint(0, vocab, {rows}, torch::kLong)};
  c.targets.index_put_({torch::arange(0, rows, 5)}, kIgnore);  // every fifth row trains nothing
  return c;
}

// Reference: float64 log-softmax of the same values.
std::pair<double, torch::Tensor> reference(const torch::Tensor& logits, const torch::Tensor& targets) {
  auto x = logits.to(torch::kDouble).detach().requires_grad_(true);
  auto loss = torch::nn::functional::cross_entropy(
      x, targets, torch::nn::functional::CrossEntropyFuncOptions().ignore_index(kIgnore).reduction(torch::kSum));
  loss.backward();
  return {loss.item<double>(), x.grad()};
}

TEST(ChunkedCrossEntropy, MatchesFloat64ForAnyChunking) {
  const auto c = make_case(37, 50);
  const auto [want, want_grad] = reference(c.logits, c.targets);
  // One chunk; 3 rows per chunk (37 = 12 * 3 + 1); a row per chunk.
  for (const int64_t chunk_bytes : {int64_t{1} << 20, int64_t{3 * 50 * 4}, int64_t{1}}) {
    auto x = c.logits.clone().requires_grad_(true);
    auto loss = trainer::chunked_cross_entropy_sum(x, c.targets, kIgnore, chunk_bytes);
    EXPECT_EQ(loss.scalar_type(), torch::kFloat);
    EXPECT_NEAR(loss.item<double>(), want, 1e-5 * want) << chunk_bytes;
    (loss * 0.5).backward();
    EXPECT_TRUE(torch::allclose(x.grad().to(torch::kDouble), want_grad * 0.5, 1e-5, 1e-7)) << chunk_bytes;
    // Ignored rows get no gradient at all.
    EXPECT_EQ(x.grad().index({torch::arange(0, 37, 5)}).abs().max().item<float>(), 0.0f);
  }
}

TEST(ChunkedCrossEntropy, RowsDoNotDependOnTheChunking) {
  const auto c = make_case(64, 33);
  torch::Tensor grads[2];
  const int64_t chunks[2] = {1 << 20, 7 * 33 * 4};
  for (int k = 0; k < 2; ++k) {
    auto x = c.logits.clone().requires_grad_(true);
    trainer::chunked_cross_entropy_sum(x, c.targets, kIgnore, chunks[k]).backward();
    grads[k] = x.grad();
  }
  EXPECT_TRUE(torch::equal(grads[0], grads[1]));
}

TEST(ChunkedCrossEntropy, Bfloat16LogitsGetABfloat16GradientWithinItsPrecision) {
  const auto c = make_case(40, 64);
  const auto logits = c.logits.to(torch::kBFloat16);
  const auto [want, want_grad] = reference(logits, c.targets);  // of the rounded values
  auto x = logits.clone().requires_grad_(true);
  auto loss = trainer::chunked_cross_entropy_sum(x, c.targets, kIgnore, 5 * 64 * 4);
  EXPECT_NEAR(loss.item<double>(), want, 1e-5 * want);
  loss.backward();
  EXPECT_EQ(x.grad().scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::allclose(x.grad().to(torch::kDouble), want_grad, 1e-2, 1e-3));
}

TEST(ChunkedCrossEntropy, NothingTrainedIsZeroWithZeroGradient) {
  auto x = torch::randn({6, 10}).requires_grad_(true);
  auto loss = trainer::chunked_cross_entropy_sum(x, torch::full({6}, kIgnore, torch::kLong), kIgnore);
  EXPECT_EQ(loss.item<float>(), 0.0f);
  loss.backward();
  EXPECT_EQ(x.grad().abs().max().item<float>(), 0.0f);
}

}  // namespace
}  // namespace brigade
