// AdamW with decoupled weight decay over parameter groups. The moments are kept in
// float32 or bfloat16; the update always runs in float32 on float32 master weights.
#pragma once

#include <string>
#include <vector>

#include <torch/types.h>

#include "model/safetensors.h"

namespace brigade::trainer {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  c10::ScalarType state_dtype = c10::kFloat;  // exp_avg and exp_avg_sq: kFloat or kBFloat16
};

class AdamW {
 public:
  // `params` are (name, tensor) pairs; `decay[i]` says whether params[i] gets weight decay.
  AdamW(model::NamedTensors params, std::vector<bool> decay, AdamWOptions options);

  void zero_grad();
  // One update at learning rate `lr` for every parameter that has a gradient.
  void step(double lr);

  // State as named tensors ("exp_avg.NAME", "exp_avg_sq.NAME", "step.NAME") and back.
  model::NamedTensors state() const;
  // Restores state saved by state(); a missing entry or shape mismatch is an Error.
  void load_state(const std::map<std::string, torch::Tensor>& state, const std::string& source);

  const model::NamedTensors& params() const { return params_; }

 private:
  struct Group {
    std::vector<size_t> index;  // into params_
    double weight_decay = 0.0;
  };
  model::NamedTensors params_;
  std::vector<torch::Tensor> exp_avg_, exp_avg_sq_, steps_;  // steps_: float32 scalars (fused kernel's format)
  std::vector<Group> groups_;
  AdamWOptions options_;
};

}  // namespace brigade::trainer
