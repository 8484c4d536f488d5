// AdamW with decoupled weight decay over parameter groups. The moments are kept in
// float32 or bfloat16; the update always runs in float32 on float32 master weights.
// Under ZeRO-1 it runs over pieces of parameters (flat views of the elements this
// rank owns) with gradients passed in, and reads its state from a checkpoint of
// any layout by element range.
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

class OptimizerStateReader;

class AdamW {
 public:
  // `params` are (name, tensor) pairs; `decay[i]` says whether params[i] gets weight
  // decay. Pieces of parameters (ZeRO-1): params[i] is a 1-D view of elements
  // [begins[i], begins[i] + numel) of the flattened parameter `name`; empty `begins`:
  // whole parameters.
  AdamW(model::NamedTensors params, std::vector<bool> decay, AdamWOptions options, std::vector<int64_t> begins = {});

  void zero_grad();
  // One update at learning rate `lr` for every parameter that has a gradient.
  void step(double lr);
  // The same with gradients given: grads[i] for params[i] (undefined: not updated).
  void step(double lr, const std::vector<torch::Tensor>& grads);

  // State as named tensors ("exp_avg.NAME", "exp_avg_sq.NAME", "step.NAME"; a piece's
  // moments are its elements only) and back.
  model::NamedTensors state() const;
  // Restores the state of every parameter (or piece) from `reader`; a missing entry
  // or a shape that differs from `shapes[i]` (the whole parameter's) is an Error.
  void load_state(const OptimizerStateReader& reader, const std::vector<std::vector<int64_t>>& shapes,
                  const std::string& source);

  const model::NamedTensors& params() const { return params_; }
  const std::vector<int64_t>& begins() const { return begins_; }

 private:
  struct Group {
    std::vector<size_t> index;  // into params_
    double weight_decay = 0.0;
  };
  model::NamedTensors params_;
  std::vector<int64_t> begins_;
  std::vector<torch::Tensor> exp_avg_, exp_avg_sq_, steps_;  // steps_: float32 scalars (fused kernel's format)
  std::vector<Group> groups_;
  AdamWOptions options_;
};

}  // namespace brigade::trainer
