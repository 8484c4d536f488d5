#include "moe/router.h"

#include <algorithm>
#include <limits>

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/nn/functional/linear.h>

namespace brigade::moe {

torch::Tensor select_experts(const torch::Tensor& selection_scores, const MoEOptions& o) {
  torch::NoGradGuard no_grad;
  auto choice = selection_scores;  // [tokens, experts]
  if (o.num_groups > 1 && o.topk_group < o.num_groups) {
    const int64_t tokens = choice.size(0), per_group = o.num_experts / o.num_groups;
    auto grouped = choice.view({tokens, o.num_groups, per_group});
    auto group_scores = o.group_score == GroupScore::kMax
                            ? std::get<0>(grouped.max(-1))
                            : std::get<0>(grouped.topk(std::min<int64_t>(2, per_group), -1)).sum(-1);  // [tokens, groups]
    auto best_groups = std::get<1>(group_scores.topk(o.topk_group, -1));                        // [tokens, topk_group]
    auto allowed = torch::zeros_like(group_scores, torch::kBool).scatter_(1, best_groups, true);
    choice = grouped.masked_fill(allowed.logical_not().unsqueeze(-1), -std::numeric_limits<float>::infinity())
                 .view({tokens, o.num_experts});
  }
  return std::get<1>(choice.topk(o.top_k, -1));
}

RouterImpl::RouterImpl(int64_t d_model, MoEOptions options) : options_(options) {
  weight = register_parameter("weight", torch::empty({options_.num_experts, d_model}));
  e_score_correction_bias = register_buffer("e_score_correction_bias", torch::zeros({options_.num_experts}));
}

Routing RouterImpl::forward(const torch::Tensor& x) {
  // At least FP32 whatever autocast says: top-k choices and balancing are sensitive
  // to rounding. (Float64 stays float64, for reference tests.)
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto dtype = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  Routing r;
  r.logits = torch::nn::functional::linear(x.to(dtype), weight.to(dtype));
  r.scores = options_.score_function == ScoreFunction::kSoftmax ? r.logits.softmax(-1) : r.logits.sigmoid();
  r.indices = select_experts(r.scores.detach() + e_score_correction_bias, options_);
  r.weights = r.scores.gather(1, r.indices);
  if (options_.normalize_topk) r.weights = r.weights / (r.weights.sum(-1, true) + 1e-20);
  if (options_.routed_scaling != 1.0) r.weights = r.weights * options_.routed_scaling;
  return r;
}

}  // namespace brigade::moe
