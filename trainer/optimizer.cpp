#include "trainer/optimizer.h"

#include <ATen/ops/_fused_adamw.h>

#include "core/error.h"

namespace brigade::trainer {

AdamW::AdamW(model::NamedTensors params, std::vector<bool> decay, AdamWOptions options)
    : params_(std::move(params)), options_(options) {
  BRIGADE_ASSERT(decay.size() == params_.size(), "one decay flag per parameter");
  groups_.resize(2);
  groups_[0].weight_decay = options_.weight_decay;
  groups_[1].weight_decay = 0.0;
  BRIGADE_CHECK(options_.state_dtype == torch::kFloat || options_.state_dtype == torch::kBFloat16,
                "AdamW state dtype must be float32 or bfloat16, got ", options_.state_dtype);
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& p = params_[i].second;
    exp_avg_.push_back(torch::zeros_like(p, options_.state_dtype));
    exp_avg_sq_.push_back(torch::zeros_like(p, options_.state_dtype));
    steps_.push_back(torch::zeros({}, torch::kFloat));
    groups_[decay[i] ? 0 : 1].index.push_back(i);
  }
}

void AdamW::zero_grad() {
  // Dropping the gradients (rather than zeroing them) lets the first backward write
  // them directly instead of accumulating into zeros.
  for (auto& [name, p] : params_) p.mutable_grad() = torch::Tensor();
}

void AdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  for (const auto& group : groups_) {
    std::vector<torch::Tensor> p, g, m, v, s;
    for (size_t i : group.index) {
      const auto& param = params_[i].second;
      if (!param.grad().defined()) continue;
      p.push_back(param);
      g.push_back(param.grad());
      m.push_back(exp_avg_[i]);
      v.push_back(exp_avg_sq_[i]);
      s.push_back(steps_[i]);
    }
    if (p.empty()) continue;
    // The fused kernel reads the step count for bias correction but does not advance it.
    for (auto& step : s) step.add_(1);
    auto update = [&](at::TensorList p, at::TensorList g, at::TensorList m, at::TensorList v, at::TensorList s) {
      at::_fused_adamw_(p, g, m, v, /*max_exp_avg_sqs=*/{}, s, lr, options_.beta1, options_.beta2,
                        group.weight_decay, options_.eps, /*amsgrad=*/false, /*maximize=*/false);
    };
    if (options_.state_dtype == torch::kFloat) {
      // The fused kernel does the whole group in one pass per tensor (multi-threaded on CPU).
      update(p, g, m, v, s);
      continue;
    }
    // bfloat16 moments: widened to float32 for the update (the fused kernel wants
    // one dtype) and rounded back to nearest-even, one parameter at a time so the
    // float32 copies never exceed one parameter's worth.
    for (size_t k = 0; k < p.size(); ++k) {
      auto m32 = m[k].to(torch::kFloat), v32 = v[k].to(torch::kFloat);
      update({p[k]}, {g[k]}, {m32}, {v32}, {s[k]});
      m[k].copy_(m32);
      v[k].copy_(v32);
    }
  }
}

model::NamedTensors AdamW::state() const {
  model::NamedTensors out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& name = params_[i].first;
    out.emplace_back("exp_avg." + name, exp_avg_[i]);
    out.emplace_back("exp_avg_sq." + name, exp_avg_sq_[i]);
    out.emplace_back("step." + name, steps_[i]);
  }
  return out;
}

void AdamW::load_state(const std::map<std::string, torch::Tensor>& state, const std::string& source) {
  auto take = [&](const std::string& key, torch::Tensor& into) {
    auto it = state.find(key);
    BRIGADE_CHECK(it != state.end(), source, ": optimizer state has no '", key, "'");
    BRIGADE_CHECK(it->second.sizes() == into.sizes(), source, ": optimizer state '", key, "' has shape ",
                  it->second.sizes(), " but the model needs ", into.sizes());
    // A checkpoint written with the other moment dtype converts (float32 -> bfloat16
    // rounds); with the same dtype the copy is exact.
    into.copy_(it->second);
  };
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& name = params_[i].first;
    take("exp_avg." + name, exp_avg_[i]);
    take("exp_avg_sq." + name, exp_avg_sq_[i]);
    take("step." + name, steps_[i]);
  }
}

}  // namespace brigade::trainer
