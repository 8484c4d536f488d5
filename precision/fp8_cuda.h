// CUDA back end of the FP8 module, launcher tier (DESIGN.md: kernels take raw
// pointers and a stream; the host wrappers in quantize_cuda_host.h and fp8_gemm.h
// check tensors and own memory). No torch and no CUDA headers here: streams travel
// as void* (a cudaStream_t). Built from fp8_cuda.cu when the toolkit is found, from
// fp8_nocuda.cpp (every function throws "brigade was built without CUDA") otherwise.
//
// Quantization matches the CPU codec bit for bit (precision/fp8.cpp,
// precision/quantize.cpp): a group's scale is s = amax / max of the format, rounded
// once from float64 to float32, 1 when amax is 0, optionally rounded up to a power
// of two; codes are encode(x * (1 / s)) with round-to-nearest-even and saturation to
// +-max; a partial last group behaves as if zero-padded.
//
// GEMM layouts. fp8_gemm computes D[m, n] = sum_k A[m, k] * B[n, k] (D = A B^T),
// every matrix row-major. cuBLASLt is column-major and its FP8 kernels take only
// the "TN" form (op(A) = A^T, op(B) = B), so brigade's product is handed to it
// transposed, D^T = B A^T:
//
//   cuBLASLt A = our B: FP8 [k rows, n cols] column-major, lda = k, TRANSA = T
//   cuBLASLt B = our A: FP8 [k rows, m cols] column-major, ldb = k, TRANSB = N
//   cuBLASLt D = our D: [n rows, m cols] column-major, ldd = n (bf16 or fp32)
//
// cuBLASLt then needs k % 16 == 0 and 16-byte aligned leading dimensions of D
// (n % 8 for bf16, n % 4 for fp32); block scaling also needs m % 4 == n % 4 == 0.
// The host tier pads with zero codes when a shape does not fit.
//
// Scales (CUBLASLT_MATMUL_DESC_{A,B}_SCALE_POINTER, mode CUBLASLT_MATMUL_DESC_{A,B}_SCALE_MODE),
// always float32, 16-byte aligned, L = ceil(k / 128):
//   kScalar        CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F: one float.
//   kVec128        CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F: one scale per row and 128
//                  consecutive k (our 1x128 tiles). cuBLASLt wants them "outer-major"
//                  (M-major for its A, N-major for its B): scale of (row r, k-group g)
//                  at g * rows + r, i.e. a row-major [L, rows] buffer, the transpose
//                  of QuantizedTensor's logical [rows, L].
//   kBlock128x128  CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F: one scale per 128x128
//                  block, k-major: block (row block p, k-group g) at p * L4 + g with
//                  L4 = L rounded up to a multiple of 4, i.e. a row-major
//                  [ceil(rows / 128), L4] buffer (QuantizedTensor's [R, L] padded).
// cuBLASLt (>= 12.9, Hopper) accepts VEC128 x VEC128, VEC128 x BLK128x128 and
// BLK128x128 x VEC128 (not BLK x BLK), or SCALAR x SCALAR.
//
// The FP8 Linear's three GEMMs in this form (T tokens, weight W [out, in]):
//   Fprop  Y[T, out]   = X[T, in]      * W[out, in]^T     A: X 1x128 tiles,   B: W 128x128 blocks
//   Dgrad  dX[T, in]   = dY[T, out]    * (W^T)[in, out]^T A: dY 1x128 tiles,  B: W^T 128x128 blocks
//   Wgrad  dW[out, in] = (dY^T)[out,T] * (X^T)[in, T]^T   A: dY^T, B: X^T, both 1x128 tiles
// Wgrad contracts over tokens: dY and X are quantized in 128x1 tiles (128 tokens
// of one column), which in the transposed, token-contiguous view are exactly 1x128
// tiles, and whose [ceil(T/128), cols] scales are already the VEC128 layout of the
// transposed operand. Per-tensor recipes use kScalar for both operands.
#pragma once

#include <cstdint>

namespace brigade::precision::fp8_cuda {

enum class Format { kE4M3, kE5M2 };
enum class InputType { kFloat32, kBFloat16 };
// How quantization groups elements of a [rows, cols] matrix.
enum class Grouping { kTensor, kTile1x128, kTile128x1, kBlock128x128 };

// Element strides of a 2-D array: element (i, j) lives at i * row + j * col.
struct Strides2 {
  int64_t row = 0;
  int64_t col = 0;
};

struct QuantizeArgs {
  const void* x = nullptr;  // [rows, cols] row-major, contiguous, x_type
  InputType x_type = InputType::kFloat32;
  int64_t rows = 0;
  int64_t cols = 0;
  Format format = Format::kE4M3;
  Grouping grouping = Grouping::kTensor;
  bool power_of_two_scales = false;
  // kTensor only: use this scale (delayed scaling) instead of one from this
  // tensor's amax; the amax is still measured. One pass over x instead of two.
  bool scale_given = false;
  float given_scale = 1.0f;

  uint8_t* codes = nullptr;       // [rows, cols] row-major, or null
  float* dequantized = nullptr;   // [rows, cols] row-major: decode(code) * scale, or null
  float* scales = nullptr;        // one per group, at scale_strides (group row, group col)
  Strides2 scale_strides;
  // One per group, at amax_strides. kTensor: a single float the kernels combine
  // with atomicMax, so the caller zeroes it first.
  float* amax = nullptr;
  Strides2 amax_strides;
  int* nonfinite = nullptr;  // zeroed by the caller; set non-zero when x holds a NaN or infinity
};

// Quantizes as args say, on `stream` (a cudaStream_t) of the current device.
void quantize(const QuantizeArgs& args, void* stream);

struct DequantizeArgs {
  const uint8_t* codes = nullptr;  // [rows, cols] row-major
  int64_t rows = 0;
  int64_t cols = 0;
  Format format = Format::kE4M3;
  Grouping grouping = Grouping::kTensor;
  const float* scales = nullptr;  // at scale_strides (group row, group col)
  Strides2 scale_strides;
  float* out = nullptr;  // [rows, cols] row-major float32
};

void dequantize(const DequantizeArgs& args, void* stream);

enum class ScaleLayout { kScalar, kVec128, kBlock128x128 };
enum class OutType { kFloat32, kBFloat16 };

struct GemmOperand {
  const uint8_t* codes = nullptr;  // [rows, k] row-major FP8 codes, 16-byte aligned
  Format format = Format::kE4M3;
  ScaleLayout scale_layout = ScaleLayout::kScalar;
  const float* scales = nullptr;  // device memory, in the layout described at the top
};

// D[m, n] = A[m, k] B[n, k]^T with FP32 accumulation (fast accumulation off).
struct GemmArgs {
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  GemmOperand a;  // m rows
  GemmOperand b;  // n rows
  void* d = nullptr;  // [m, n] row-major, out_type
  OutType out_type = OutType::kBFloat16;
};

// Runs on `stream` with this process's cuBLASLt handle for the current device and
// a 32 MiB workspace per (device, stream), created on first use and kept for the
// life of the process.
void gemm(const GemmArgs& args, void* stream);

}  // namespace brigade::precision::fp8_cuda
