#include "parallel/ordered_sum.h"

#include <torch/torch.h>

#include "core/error.h"

namespace brigade::parallel {

PairwiseSum::Block PairwiseSum::merge(Block left, Block right) {
  Block out{left.terms + right.terms, {}};
  if (!left.sum.defined()) {
    out.sum = std::move(right.sum);
  } else if (!right.sum.defined()) {
    out.sum = std::move(left.sum);
  } else {
    // a + b == b + a in IEEE arithmetic: only the grouping matters, not which
    // operand is written to.
    out.sum = std::move(left.sum);
    out.sum.add_(right.sum);
  }
  return out;
}

void PairwiseSum::add(torch::Tensor term) {
  stack_.push_back({1, std::move(term)});
  ++terms_;
  while (stack_.size() >= 2 && stack_[stack_.size() - 2].terms == stack_.back().terms) {
    Block right = std::move(stack_.back());
    stack_.pop_back();
    stack_.back() = merge(std::move(stack_.back()), std::move(right));
  }
}

torch::Tensor PairwiseSum::take() {
  if (stack_.empty()) return {};
  Block acc = std::move(stack_.back());
  stack_.pop_back();
  while (!stack_.empty()) {
    acc = merge(std::move(stack_.back()), std::move(acc));
    stack_.pop_back();
  }
  terms_ = 0;
  return std::move(acc.sum);
}

MicroBatchGradients::MicroBatchGradients(std::vector<torch::Tensor> params)
    : params_(std::move(params)), sums_(params_.size()) {}

void MicroBatchGradients::stash() {
  for (size_t i = 0; i < params_.size(); ++i) {
    sums_[i].add(params_[i].grad());
    params_[i].mutable_grad() = torch::Tensor();
  }
}

void MicroBatchGradients::stash(const std::vector<size_t>& indices) {
  for (size_t i : indices) {
    sums_[i].add(params_[i].grad());
    params_[i].mutable_grad() = torch::Tensor();
  }
}

void MicroBatchGradients::finish(size_t i) {
  if (sums_[i].terms() == 0) return;
  torch::NoGradGuard no_grad;
  sums_[i].add(params_[i].grad());
  params_[i].mutable_grad() = sums_[i].take();
}

void MicroBatchGradients::finish_all() {
  for (size_t i = 0; i < params_.size(); ++i) finish(i);
}

torch::Tensor block_squares(const torch::Tensor& flat) {
  BRIGADE_ASSERT(flat.dim() == 1 && flat.is_contiguous() && flat.scalar_type() == torch::kFloat &&
                     flat.numel() % kNormBlock == 0,
                 "block_squares needs [k * ", kNormBlock, "] contiguous float32, got ", flat.sizes(), " ",
                 flat.scalar_type());
  const int64_t blocks = flat.numel() / kNormBlock;
  if (!flat.device().is_cpu()) {
    // The LibTorch form for other devices (the same value, summed in the device's order).
    return flat.view({blocks, kNormBlock}).to(torch::kDouble).square().sum(1);
  }
  auto out = torch::empty({blocks}, torch::kDouble);
  const float* x = flat.data_ptr<float>();
  double* sums = out.data_ptr<double>();
  at::parallel_for(0, blocks, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const float* block = x + b * kNormBlock;
      double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = 0; i < kNormBlock; i += 8) {
        for (int j = 0; j < 8; ++j) {
          const double v = block[i + j];
          lane[j] += v * v;
        }
      }
      sums[b] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    }
  });
  return out;
}

torch::Tensor tree_sum(const torch::Tensor& values) {
  BRIGADE_ASSERT(values.dim() == 1 && values.scalar_type() == torch::kDouble, "tree_sum needs [n] float64, got ",
                 values.sizes(), " ", values.scalar_type());
  if (values.numel() == 0) return torch::zeros({1}, values.options());
  auto level = values;
  while (level.numel() > 1) {
    if (level.numel() % 2 == 1) level = torch::cat({level, torch::zeros({1}, level.options())});
    const auto pairs = level.reshape({-1, 2});
    level = pairs.select(1, 0) + pairs.select(1, 1);
  }
  return level.reshape({1});
}

}  // namespace brigade::parallel
