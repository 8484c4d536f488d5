#include "precision/precision.h"

#include <ATen/autocast_mode.h>

#include "core/error.h"

namespace brigade::precision {

std::string to_string(ComputeDtype dtype) {
  return dtype == ComputeDtype::kBFloat16 ? "bfloat16" : "float32";
}

ComputeDtype parse_compute_dtype(const std::string& name) {
  if (name == "float32" || name == "fp32") return ComputeDtype::kFloat32;
  if (name == "bfloat16" || name == "bf16") return ComputeDtype::kBFloat16;
  BRIGADE_FAIL("unknown compute dtype '", name, "' (expected float32 or bfloat16)");
}

c10::ScalarType to_scalar_type(ComputeDtype dtype) {
  return dtype == ComputeDtype::kBFloat16 ? c10::kBFloat16 : c10::kFloat;
}

c10::ScalarType autocast_dtype_for(const torch::Tensor& x) {
  const auto device = x.device().type();
  if (at::autocast::is_autocast_enabled(device)) return at::autocast::get_autocast_dtype(device);
  return x.scalar_type();
}

AutocastGuard::AutocastGuard(ComputeDtype dtype) {
  if (dtype == ComputeDtype::kFloat32) return;
  active_ = true;
  // Both device types: the guard does not know where the module's tensors live, and
  // enabling autocast for a device with no tensors in the forward costs nothing.
  previous_cpu_ = at::autocast::is_autocast_enabled(at::kCPU);
  previous_cuda_ = at::autocast::is_autocast_enabled(at::kCUDA);
  for (const auto device : {at::kCPU, at::kCUDA}) {
    at::autocast::set_autocast_enabled(device, true);
    at::autocast::set_autocast_dtype(device, to_scalar_type(dtype));
  }
}

AutocastGuard::~AutocastGuard() {
  if (!active_) return;
  at::autocast::set_autocast_enabled(at::kCPU, previous_cpu_);
  at::autocast::set_autocast_enabled(at::kCUDA, previous_cuda_);
  // Autocast caches casted weights per forward; drop them so updated weights are seen.
  at::autocast::clear_cache();
}

}  // namespace brigade::precision
