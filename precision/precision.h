// precision/: numeric formats and how compute runs: the compute dtype (FP32 or
// BF16 autocast over FP32 master weights) and FP8 GEMM recipes (fp8_recipe.h,
// quantize.h, linear.h).
#pragma once

#include <string>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include "precision/fp8_recipe.h"

namespace brigade::precision {

enum class ComputeDtype { kFloat32, kBFloat16 };

struct PrecisionOptions {
  ComputeDtype compute_dtype = ComputeDtype::kFloat32;
  Fp8Options fp8;  // recipe none: no FP8 GEMMs
  // AdamW moments (exp_avg, exp_avg_sq): float32, or bfloat16 as DeepSeek-V3 keeps
  // them (half the memory; the update itself still runs in float32).
  ComputeDtype optimizer_state_dtype = ComputeDtype::kFloat32;
};

std::string to_string(ComputeDtype dtype);
// "float32" | "bfloat16" (also "fp32", "bf16"); anything else is an Error.
ComputeDtype parse_compute_dtype(const std::string& name);
c10::ScalarType to_scalar_type(ComputeDtype dtype);
// The dtype a matmul on `x` runs in right now: the autocast dtype when autocast is
// on for x's device, else x's own. Custom autograd functions that exclude autocast
// read it first (excluding autocast is what "off" means).
c10::ScalarType autocast_dtype_for(const torch::Tensor& x);

// Enables CPU/CUDA autocast to the compute dtype for its lifetime (no-op for FP32),
// so matmuls run in BF16 while parameters and optimizer state stay FP32.
class AutocastGuard {
 public:
  explicit AutocastGuard(ComputeDtype dtype);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool active_ = false;
  bool previous_cpu_ = false;
  bool previous_cuda_ = false;
};

}  // namespace brigade::precision
