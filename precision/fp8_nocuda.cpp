// fp8_cuda.h without the CUDA toolkit: every entry point is a clear error (the
// host tier only calls these for CUDA tensors, which such a build cannot hold).
#include "precision/fp8_cuda.h"

#include "core/error.h"

namespace brigade::precision::fp8_cuda {

void quantize(const QuantizeArgs&, void*) { BRIGADE_FAIL("FP8 quantize on CUDA: brigade was built without CUDA"); }

void dequantize(const DequantizeArgs&, void*) {
  BRIGADE_FAIL("FP8 dequantize on CUDA: brigade was built without CUDA");
}

void gemm(const GemmArgs&, void*) { BRIGADE_FAIL("FP8 GEMM on CUDA: brigade was built without CUDA"); }

}  // namespace brigade::precision::fp8_cuda
