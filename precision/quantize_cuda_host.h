// quantize.h on CUDA tensors (host tier of fp8_cuda.h): quantize() and
// fake_quantize() dispatch here for CUDA input. Same checks, same results bit for
// bit as the CPU path, same delayed-scaling bookkeeping; kernels run on torch's
// current stream of x's device.
//
// Scale tensors have QuantizedTensor's documented logical shapes, stored the way
// cuBLASLt reads them (fp8_cuda.h) so fp8_gemm passes them without a copy:
//   1x128    [rows, L] as a transposed view of a contiguous [L, rows] buffer
//   128x1    [R, cols] contiguous (already the 1x128 layout of the transpose)
//   128x128  [R, L] as a view of a [R, round_up(L, 4)] buffer (row stride a multiple of 4)
//
// The NaN/Inf check reads one int back from the device, so each call waits for
// its kernels, unless a DeferredFiniteCheck is active (the trainer's steps): then
// the flag is only folded into the check's device flag and read once per step.
// Delayed scaling still reads the amax back to record it, as on the CPU.
#pragma once

#include <torch/types.h>

#include "precision/quantize.h"

namespace brigade::precision {

QuantizedTensor quantize_cuda(const torch::Tensor& x, const QuantizeOptions& options, DelayedScaling* delayed,
                              bool record);
torch::Tensor fake_quantize_cuda(const torch::Tensor& x, const QuantizeOptions& options, DelayedScaling* delayed,
                                 bool record);
// float32 [rows, cols] on q's device: decode(code) * scale (QuantizedTensor::dequantize for CUDA codes).
torch::Tensor dequantize_cuda(const QuantizedTensor& q);

}  // namespace brigade::precision
