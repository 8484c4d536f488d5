// FP8 GEMM on quantized operands: D = A B^T with FP32 accumulation, one entry
// point for both back ends.
//
//   CPU   emulation: dequantize both operands, multiply in float32.
//   CUDA  cuBLASLt FP8 GEMM (layouts and modes: precision/fp8_cuda.h), on torch's
//         current stream; operands whose shapes break cuBLASLt's alignment rules
//         are zero-padded (a copy) and the result cut back.
//
// Scale groups must run along K, the contracted dimension: both operands per
// tensor, or each one 1x128 tiles or 128x128 blocks (not both blocks: cuBLASLt has
// no 128x128 x 128x128 kernel). 128x1 operands are the transposes of 1x128 ones:
// pass transposed(q).
#pragma once

#include <torch/types.h>

#include "precision/quantize.h"

namespace brigade::precision {

// a: [M, K], b: [N, K] -> [M, N] in out_dtype (float32 or bfloat16 on CUDA).
torch::Tensor fp8_gemm(const QuantizedTensor& a, const QuantizedTensor& b, torch::ScalarType out_dtype);

// The same quantized values as an operand of x^T: codes transposed (a copy),
// scales and amax transposed (views), 1x128 <-> 128x1; 128x128 and per-tensor
// modes keep their mode.
QuantizedTensor transposed(const QuantizedTensor& q);

}  // namespace brigade::precision
