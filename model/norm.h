// RMSNorm (Zhang & Sennrich 2019), normalising in FP32 whatever the compute dtype.
#pragma once

#include <cstdint>

#include <torch/nn/module.h>

namespace brigade::model {

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  torch::Tensor forward(const torch::Tensor& x);  // [..., dim]
  torch::Tensor weight;                           // [dim]

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

}  // namespace brigade::model
