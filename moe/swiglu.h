// The SwiGLU feed-forward, down(silu(gate(x)) * up(x)): the dense MLP of a
// transformer block and the shared experts of an MoE layer (Hugging Face names
// gate_proj / up_proj / down_proj).
#pragma once

#include <cstdint>
#include <string>

#include <torch/nn/module.h>

#include "precision/linear.h"

namespace brigade::moe {

class SwiGLUImpl : public torch::nn::Module {
 public:
  SwiGLUImpl(int64_t d_model, int64_t d_ff);
  torch::Tensor forward(const torch::Tensor& x);  // [..., d_model] -> [..., d_model]
  precision::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
  // Runs the three GEMMs in FP8 under `options`; `name` prefixes their names.
  void enable_fp8(const precision::Fp8Options& options, const std::string& name);
};
TORCH_MODULE(SwiGLU);

}  // namespace brigade::moe
