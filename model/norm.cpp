#include "model/norm.h"

#include <ATen/ops/rms_norm.h>

namespace brigade::model {

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
  weight = register_parameter("weight", torch::ones({dim}));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  // Normalise in FP32 whatever the compute dtype: the mean of squares is where BF16 loses.
  auto y = at::rms_norm(x.to(torch::kFloat), {weight.size(0)}, weight.to(torch::kFloat), eps_);
  return y.to(x.scalar_type());
}

}  // namespace brigade::model
