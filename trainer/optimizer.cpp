#include "trainer/optimizer.h"

#include <ATen/ops/_fused_adamw.h>

#include "core/error.h"
#include "trainer/checkpoint.h"

namespace brigade::trainer {

AdamW::AdamW(model::NamedTensors params, std::vector<bool> decay, AdamWOptions options, std::vector<int64_t> begins)
    : params_(std::move(params)), begins_(std::move(begins)), options_(options) {
  BRIGADE_ASSERT(decay.size() == params_.size(), "one decay flag per parameter");
  if (begins_.empty()) begins_.assign(params_.size(), 0);
  BRIGADE_ASSERT(begins_.size() == params_.size(), "one begin per parameter piece");
  groups_.resize(2);
  groups_[0].weight_decay = options_.weight_decay;
  groups_[1].weight_decay = 0.0;
  BRIGADE_CHECK(options_.state_dtype == torch::kFloat || options_.state_dtype == torch::kBFloat16,
                "AdamW state dtype must be float32 or bfloat16, got ", options_.state_dtype);
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& p = params_[i].second;
    exp_avg_.push_back(torch::zeros_like(p, options_.state_dtype));
    exp_avg_sq_.push_back(torch::zeros_like(p, options_.state_dtype));
    // On the parameter's device: the fused CUDA kernel reads the count there, and
    // advancing it needs no host round trip.
    steps_.push_back(torch::zeros({}, p.options().dtype(torch::kFloat)));
    groups_[decay[i] ? 0 : 1].index.push_back(i);
  }
}

void AdamW::zero_grad() {
  // Dropping the gradients (rather than zeroing them) lets the first backward write
  // them directly instead of accumulating into zeros.
  for (auto& [name, p] : params_) p.mutable_grad() = torch::Tensor();
}

void AdamW::step(double lr) {
  std::vector<torch::Tensor> grads;
  for (const auto& [name, p] : params_) grads.push_back(p.grad());
  step(lr, grads);
}

void AdamW::step(double lr, const std::vector<torch::Tensor>& grads) {
  BRIGADE_ASSERT(grads.size() == params_.size(), "one gradient per parameter");
  torch::NoGradGuard no_grad;
  for (const auto& group : groups_) {
    std::vector<torch::Tensor> p, g, m, v, s;
    for (size_t i : group.index) {
      const auto& param = params_[i].second;
      if (!grads[i].defined()) continue;
      p.push_back(param);
      g.push_back(grads[i]);
      m.push_back(exp_avg_[i]);
      v.push_back(exp_avg_sq_[i]);
      s.push_back(steps_[i]);
    }
    if (p.empty()) continue;
    // The fused kernel reads the step count for bias correction but does not advance it.
    torch::_foreach_add_(s, 1);
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

void AdamW::load_state(const OptimizerStateReader& reader, const std::vector<std::vector<int64_t>>& shapes,
                       const std::string& source) {
  BRIGADE_ASSERT(shapes.size() == params_.size(), "one shape per parameter");
  // Read and check everything first, so a rejected checkpoint leaves the state as it was.
  std::vector<torch::Tensor> m, v, s;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& [name, p] = params_[i];
    const auto saved = reader.shape(name);
    BRIGADE_CHECK(saved == shapes[i], source, ": optimizer state of '", name, "' has shape ",
                  c10::IntArrayRef(saved), " but the model needs ", c10::IntArrayRef(shapes[i]));
    m.push_back(reader.read("exp_avg." + name, begins_[i], p.numel()).view(p.sizes()));
    v.push_back(reader.read("exp_avg_sq." + name, begins_[i], p.numel()).view(p.sizes()));
    s.push_back(reader.step(name));
  }
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    // A checkpoint written with the other moment dtype converts (float32 -> bfloat16
    // rounds); with the same dtype the copy is exact.
    exp_avg_[i].copy_(m[i]);
    exp_avg_sq_[i].copy_(v[i]);
    steps_[i].copy_(s[i]);
  }
}

}  // namespace brigade::trainer
