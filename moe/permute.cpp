#include "moe/permute.h"

#include <cmath>

#include "core/error.h"

namespace brigade::moe {

int64_t expert_capacity(const MoEOptions& o, int64_t tokens) {
  return static_cast<int64_t>(
      std::ceil(o.capacity_factor * static_cast<double>(tokens * o.top_k) / static_cast<double>(o.num_experts)));
}

DispatchPlan plan_dispatch(const torch::Tensor& indices, const torch::Tensor& weights, int64_t num_experts,
                           int64_t capacity, DropPolicy policy) {
  torch::NoGradGuard no_grad;
  BRIGADE_ASSERT(indices.dim() == 2 && weights.sizes() == indices.sizes(), "routing indices ", indices.sizes(),
                 " and weights ", weights.sizes(), " must both be [tokens, top_k]");
  DispatchPlan plan;
  plan.tokens = indices.size(0);
  const int64_t top_k = indices.size(1);
  auto experts = indices.reshape({-1});  // [copies]

  // Stable sort by expert; under the probs policy, copies of one expert are first
  // ordered by descending weight so the strongest survive the capacity cut.
  torch::Tensor copy;
  if (capacity >= 0 && policy == DropPolicy::kProbs) {
    auto by_weight = std::get<1>(weights.reshape({-1}).sort(/*stable=*/true, 0, /*descending=*/true));
    auto by_expert = std::get<1>(experts.index_select(0, by_weight).sort(/*stable=*/true, 0, false));
    copy = by_weight.index_select(0, by_expert);
  } else {
    copy = std::get<1>(experts.sort(/*stable=*/true, 0, false));
  }
  plan.routed = torch::bincount(experts, {}, num_experts);
  // One device-to-host copy: the per-expert GEMM sizes must be known on the host.
  auto routed_host = plan.routed.to(torch::kCPU);
  const int64_t* routed = routed_host.data_ptr<int64_t>();

  plan.counts.assign(num_experts, 0);
  plan.offsets.assign(num_experts + 1, 0);
  for (int64_t e = 0; e < num_experts; ++e) {
    plan.counts[e] = capacity >= 0 ? std::min(routed[e], capacity) : routed[e];
    plan.offsets[e + 1] = plan.offsets[e] + plan.counts[e];
  }
  plan.dropped = experts.numel() - plan.offsets.back();
  if (plan.dropped > 0) {
    // Keep the first counts[e] rows of each expert's sorted run.
    std::vector<torch::Tensor> kept;
    int64_t start = 0;
    for (int64_t e = 0; e < num_experts; ++e) {
      if (plan.counts[e] > 0) kept.push_back(copy.narrow(0, start, plan.counts[e]));
      start += routed[e];
    }
    copy = kept.empty() ? copy.narrow(0, 0, 0) : torch::cat(kept);
  }
  plan.copy = copy;
  plan.token = torch::div(copy, top_k, "floor");
  return plan;
}

torch::Tensor permute(const torch::Tensor& x, const DispatchPlan& plan) { return x.index_select(0, plan.token); }

torch::Tensor row_weights(const torch::Tensor& weights, const DispatchPlan& plan) {
  return weights.reshape({-1}).index_select(0, plan.copy);
}

torch::Tensor unpermute(const torch::Tensor& y, const DispatchPlan& plan) {
  return torch::zeros({plan.tokens, y.size(1)}, y.options()).index_add(0, plan.token, y);
}

}  // namespace brigade::moe
