#include "moe/swiglu.h"

#include <torch/nn/functional/activation.h>

namespace brigade::moe {

SwiGLUImpl::SwiGLUImpl(int64_t d_model, int64_t d_ff) {
  auto linear = [](int64_t in, int64_t out) { return precision::Linear(in, out, false); };
  gate_proj = register_module("gate_proj", linear(d_model, d_ff));
  up_proj = register_module("up_proj", linear(d_model, d_ff));
  down_proj = register_module("down_proj", linear(d_ff, d_model));
}

void SwiGLUImpl::enable_fp8(const precision::Fp8Options& options, const std::string& name) {
  gate_proj->enable_fp8(options, name + ".gate_proj");
  up_proj->enable_fp8(options, name + ".up_proj");
  down_proj->enable_fp8(options, name + ".down_proj");
}

torch::Tensor SwiGLUImpl::forward(const torch::Tensor& x) { return down_proj(torch::silu(gate_proj(x)) * up_proj(x)); }

}  // namespace brigade::moe
