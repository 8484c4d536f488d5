// The MoE layer written the slow, obvious way: per token, per expert, scalar
// selection logic in plain C++, no permutation. Tests compare MoELayer against it
// in float64 (forward and, through autograd, backward); the benchmark times it.
#pragma once

#include <vector>

#include <torch/types.h>

#include "moe/options.h"

namespace brigade::moe {

struct ReferenceWeights {
  torch::Tensor router;       // [experts, d]
  torch::Tensor bias;         // [experts] selection bias
  torch::Tensor gate_up;      // [experts, 2 ff, d]
  torch::Tensor down;         // [experts, d, ff]
  torch::Tensor shared_gate;  // [shared_ff, d] (undefined: no shared experts)
  torch::Tensor shared_up;    // [shared_ff, d]
  torch::Tensor shared_down;  // [d, shared_ff]
};

struct ReferenceOutput {
  torch::Tensor y;                               // [tokens, d]
  std::vector<std::vector<int64_t>> selected;    // per token, the chosen experts (best first)
  std::vector<std::vector<int64_t>> computed;    // per token, the experts kept after capacity drops
};

// x: [tokens, d]. Dropless when options.dropless; otherwise copies are dropped in
// the order the policy defines (token order, or descending weight).
ReferenceOutput reference_moe(const torch::Tensor& x, const ReferenceWeights& w, const MoEOptions& options);

}  // namespace brigade::moe
