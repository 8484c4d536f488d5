// Kernels and launchers of the CUDA FP8 back end (layouts: precision/fp8_cuda.h).
#include "precision/fp8_cuda.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "core/error.h"

#define BRIGADE_CUDA_CHECK(call)                                                                    \
  do {                                                                                              \
    const cudaError_t status_ = (call);                                                             \
    BRIGADE_CHECK(status_ == cudaSuccess, #call " failed: ", cudaGetErrorName(status_), " (",      \
                  cudaGetErrorString(status_), ")");                                                \
  } while (0)

#define BRIGADE_CUBLAS_CHECK(call)                                                                  \
  do {                                                                                              \
    const cublasStatus_t status_ = (call);                                                          \
    BRIGADE_CHECK(status_ == CUBLAS_STATUS_SUCCESS, #call " failed: ", cublasLtGetStatusName(status_), \
                  " (", cublasLtGetStatusString(status_), ")");                                     \
  } while (0)

namespace brigade::precision::fp8_cuda {
namespace {

// ---------------------------------------------------------------------------
// The codec, as in precision/fp8.cpp. The __fmul_rn / __fadd_rn intrinsics keep
// nvcc from contracting into FMAs, so every rounding is the CPU's.

template <bool kE4M3>
struct Fmt {
  static constexpr int kMantissa = kE4M3 ? 3 : 2;
  static constexpr int kBias = kE4M3 ? 7 : 15;
  static constexpr float kMax = kE4M3 ? 448.0f : 57344.0f;
  static constexpr uint32_t kMaxBits = kE4M3 ? 0x43E00000u : 0x47600000u;        // bits of kMax
  static constexpr uint32_t kMinNormalBits = kE4M3 ? 0x3C800000u : 0x38800000u;  // 2^-6, 2^-14
  static constexpr float kInvMinSubnormal = kE4M3 ? 512.0f : 65536.0f;           // 2^9, 2^16
  static constexpr float kMinSubnormal = kE4M3 ? 0x1p-9f : 0x1p-16f;
  static constexpr uint32_t kMaxCode = kE4M3 ? 0x7Eu : 0x7Bu;
};

template <bool kE4M3>
__device__ __forceinline__ uint32_t encode(float value) {
  using F = Fmt<kE4M3>;
  const uint32_t bits = __float_as_uint(value);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t u = bits & 0x7FFFFFFFu;
  constexpr int kShift = 23 - F::kMantissa;
  const uint32_t rounded = u + ((1u << (kShift - 1)) - 1) + ((u >> kShift) & 1u);
  const uint32_t normal = (rounded >> kShift) - (static_cast<uint32_t>(127 - F::kBias) << F::kMantissa);
  const float magnitude = __uint_as_float(u);
  const uint32_t subnormal = __float_as_uint(__fadd_rn(__fmul_rn(magnitude, F::kInvMinSubnormal), 8388608.0f)) - 0x4B000000u;
  uint32_t code = u < F::kMinNormalBits ? subnormal : normal;
  code = u >= F::kMaxBits ? F::kMaxCode : code;
  const uint32_t nonfinite = (!kE4M3 && u == 0x7F800000u) ? 0x7Cu : 0x7Fu;
  code = u >= 0x7F800000u ? nonfinite : code;
  return sign | code;
}

template <bool kE4M3>
__device__ __forceinline__ float decode(uint32_t code) {
  using F = Fmt<kE4M3>;
  const uint32_t magnitude = code & 0x7Fu;
  const uint32_t exponent = magnitude >> F::kMantissa;
  const uint32_t mantissa = magnitude & ((1u << F::kMantissa) - 1);
  const bool negative = (code & 0x80u) != 0;
  if (kE4M3 && magnitude == 0x7Fu) return __uint_as_float(0x7FC00000u);
  if (!kE4M3 && exponent == 31) {
    return mantissa == 0 ? __uint_as_float((negative ? 0x80000000u : 0u) | 0x7F800000u) : __uint_as_float(0x7FC00000u);
  }
  if (exponent == 0) {
    const float v = __fmul_rn(static_cast<float>(mantissa), F::kMinSubnormal);
    return negative ? -v : v;
  }
  return __uint_as_float((negative ? 0x80000000u : 0u) | ((exponent - F::kBias + 127) << 23) |
                         (mantissa << (23 - F::kMantissa)));
}

// scale_for() of precision/quantize.cpp: amax / max in float64, rounded once to
// float32; the power-of-two rounding is exp2(ceil(log2(s))) done on the bits.
__device__ __forceinline__ float scale_for(float amax, float format_max, bool power_of_two) {
  if (amax == 0.0f) return 1.0f;
  double s = __ddiv_rn(static_cast<double>(amax), static_cast<double>(format_max));
  if (power_of_two) {
    int e = 0;
    const double m = frexp(s, &e);  // s = m 2^e, m in [0.5, 1)
    if (m != 0.5) s = ldexp(1.0, e);
  }
  return __double2float_rn(s);
}

// ---------------------------------------------------------------------------
// Quantize: one thread block per 128x128 tile of x. Warp w, lane l holds rows
// w + 8i (i < 16) of the tile and columns 4l..4l+3 in registers, so x is read
// once (coalesced 16-byte loads when cols % 4 == 0) whatever the grouping:
//   1x128: a tile row is one group (a warp reduction)
//   128x1: a tile column is one group (per thread, then across warps in shared memory)
//   128x128 and per tensor: the whole tile (then atomicMax across tiles for per tensor)

constexpr int kGroup = 128;
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerThread = kGroup / kWarps;

enum class Stage {
  kMeasure,  // per-tensor current scaling, pass 1: amax only
  kEncode,   // everything else: scales (groups) and codes
};

__device__ __forceinline__ void load4(const float* x, int64_t offset, bool vec, int valid, float v[4]) {
  if (vec) {
    const float4 q = *reinterpret_cast<const float4*>(x + offset);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) v[j] = j < valid ? x[offset + j] : 0.0f;
}

__device__ __forceinline__ void load4(const __nv_bfloat16* x, int64_t offset, bool vec, int valid, float v[4]) {
  if (vec) {
    const uint2 q = *reinterpret_cast<const uint2*>(x + offset);
    // bfloat16 widens exactly: its bits are the high half of the float32.
    v[0] = __uint_as_float(q.x << 16), v[1] = __uint_as_float(q.x & 0xFFFF0000u);
    v[2] = __uint_as_float(q.y << 16), v[3] = __uint_as_float(q.y & 0xFFFF0000u);
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) v[j] = j < valid ? __bfloat162float(x[offset + j]) : 0.0f;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
  return v;
}

// Non-negative floats (and +inf) order like their bit patterns as unsigned ints.
__device__ __forceinline__ void atomic_max_nonnegative(float* address, float value) {
  atomicMax(reinterpret_cast<unsigned int*>(address), __float_as_uint(value));
}

template <typename In, bool kE4M3, Grouping kGrouping, Stage kStage>
__global__ void __launch_bounds__(kThreads) quantize_tile_kernel(const QuantizeArgs a, bool vec) {
  using F = Fmt<kE4M3>;
  __shared__ float partial[kWarps][kGroup];  // 128x1: per-warp column maxima; otherwise [w][0]
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kGroup + warp;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kGroup + lane * 4;
  const int valid_cols = col >= a.cols ? 0 : (a.cols - col < 4 ? static_cast<int>(a.cols - col) : 4);
  const In* x = static_cast<const In*>(a.x);

  float v[kRowsPerThread][4];
  bool nonfinite = false;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = row0 + kWarps * i;
    if (row < a.rows && valid_cols > 0) {
      load4(x, row * a.cols + col, vec, valid_cols, v[i]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) v[i][j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) nonfinite |= !isfinite(v[i][j]);
  }
  // The same value from every writer: a plain store is enough.
  if (nonfinite) *a.nonfinite = 1;

  // Group maxima of |x| (fmaxf drops NaN; the flag above reports it).
  float row_amax[kRowsPerThread];  // 1x128
  float col_amax[4];               // 128x1
  float tile_amax = 0.0f;          // 128x128, per tensor
  if constexpr (kGrouping == Grouping::kTile1x128) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      row_amax[i] = warp_max(fmaxf(fmaxf(fabsf(v[i][0]), fabsf(v[i][1])), fmaxf(fabsf(v[i][2]), fabsf(v[i][3]))));
    }
  } else if constexpr (kGrouping == Grouping::kTile128x1) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float m = 0.0f;
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) m = fmaxf(m, fabsf(v[i][j]));
      partial[warp][lane * 4 + j] = m;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float m = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) m = fmaxf(m, partial[w][lane * 4 + j]);
      col_amax[j] = m;
    }
  } else {
    float m = 0.0f;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) m = fmaxf(m, fabsf(v[i][j]));
    }
    m = warp_max(m);
    if (lane == 0) partial[warp][0] = m;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) tile_amax = fmaxf(tile_amax, partial[w][0]);
  }

  if constexpr (kGrouping == Grouping::kTensor) {
    const bool measure = kStage == Stage::kMeasure || a.scale_given;
    if (measure && threadIdx.x == 0) atomic_max_nonnegative(a.amax, tile_amax);
    if constexpr (kStage == Stage::kMeasure) return;
  }

  // Scales, and the groups' amax and scale written once per group.
  const int64_t group_row = blockIdx.y, group_col = blockIdx.x;
  float inverse_row[kRowsPerThread], scale_row[kRowsPerThread];
  float inverse_col[4], scale_col[4];
  float inverse_tile = 1.0f, scale_tile = 1.0f;
  if constexpr (kGrouping == Grouping::kTile1x128) {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      scale_row[i] = scale_for(row_amax[i], F::kMax, a.power_of_two_scales);
      inverse_row[i] = __fdiv_rn(1.0f, scale_row[i]);
      const int64_t row = row0 + kWarps * i;
      if (lane == 0 && row < a.rows) {
        a.scales[row * a.scale_strides.row + group_col * a.scale_strides.col] = scale_row[i];
        a.amax[row * a.amax_strides.row + group_col * a.amax_strides.col] = row_amax[i];
      }
    }
  } else if constexpr (kGrouping == Grouping::kTile128x1) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      scale_col[j] = scale_for(col_amax[j], F::kMax, a.power_of_two_scales);
      inverse_col[j] = __fdiv_rn(1.0f, scale_col[j]);
      if (warp == 0 && j < valid_cols) {
        a.scales[group_row * a.scale_strides.row + (col + j) * a.scale_strides.col] = scale_col[j];
        a.amax[group_row * a.amax_strides.row + (col + j) * a.amax_strides.col] = col_amax[j];
      }
    }
  } else if constexpr (kGrouping == Grouping::kBlock128x128) {
    scale_tile = scale_for(tile_amax, F::kMax, a.power_of_two_scales);
    inverse_tile = __fdiv_rn(1.0f, scale_tile);
    if (threadIdx.x == 0) {
      a.scales[group_row * a.scale_strides.row + group_col * a.scale_strides.col] = scale_tile;
      a.amax[group_row * a.amax_strides.row + group_col * a.amax_strides.col] = tile_amax;
    }
  } else {
    // Current scaling reads the amax that pass 1 (an earlier kernel on this stream) finished.
    scale_tile = a.scale_given ? a.given_scale : scale_for(*a.amax, F::kMax, a.power_of_two_scales);
    inverse_tile = __fdiv_rn(1.0f, scale_tile);
    if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) a.scales[0] = scale_tile;
  }

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = row0 + kWarps * i;
    if (row >= a.rows || valid_cols == 0) continue;
    uint32_t codes[4];
    float scales[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float inverse = inverse_tile, scale = scale_tile;
      if constexpr (kGrouping == Grouping::kTile1x128) inverse = inverse_row[i], scale = scale_row[i];
      if constexpr (kGrouping == Grouping::kTile128x1) inverse = inverse_col[j], scale = scale_col[j];
      codes[j] = encode<kE4M3>(__fmul_rn(v[i][j], inverse));
      scales[j] = scale;
    }
    const int64_t offset = row * a.cols + col;
    if (a.codes != nullptr) {
      if (vec) {
        *reinterpret_cast<uint32_t*>(a.codes + offset) = codes[0] | (codes[1] << 8) | (codes[2] << 16) | (codes[3] << 24);
      } else {
        for (int j = 0; j < valid_cols; ++j) a.codes[offset + j] = static_cast<uint8_t>(codes[j]);
      }
    }
    if (a.dequantized != nullptr) {
      float out[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) out[j] = __fmul_rn(decode<kE4M3>(codes[j]), scales[j]);
      if (vec) {
        *reinterpret_cast<float4*>(a.dequantized + offset) = make_float4(out[0], out[1], out[2], out[3]);
      } else {
        for (int j = 0; j < valid_cols; ++j) a.dequantized[offset + j] = out[j];
      }
    }
  }
}

template <typename In, bool kE4M3, Grouping kGrouping, Stage kStage>
void launch_tiles(const QuantizeArgs& a, bool vec, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.cols + kGroup - 1) / kGroup), static_cast<unsigned>((a.rows + kGroup - 1) / kGroup));
  quantize_tile_kernel<In, kE4M3, kGrouping, kStage><<<grid, kThreads, 0, stream>>>(a, vec);
  BRIGADE_CUDA_CHECK(cudaGetLastError());
}

template <typename In, bool kE4M3>
void quantize_typed(const QuantizeArgs& a, cudaStream_t stream) {
  // 16-byte loads need cols % 4 == 0 and aligned rows; outputs are then 4-aligned too.
  const auto aligned = [](const void* p, uintptr_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; };
  const bool vec = a.cols % 4 == 0 && aligned(a.x, 4 * sizeof(In)) && (a.codes == nullptr || aligned(a.codes, 4)) &&
                   (a.dequantized == nullptr || aligned(a.dequantized, 16));
  switch (a.grouping) {
    case Grouping::kTensor:
      if (!a.scale_given) launch_tiles<In, kE4M3, Grouping::kTensor, Stage::kMeasure>(a, vec, stream);
      launch_tiles<In, kE4M3, Grouping::kTensor, Stage::kEncode>(a, vec, stream);
      return;
    case Grouping::kTile1x128: return launch_tiles<In, kE4M3, Grouping::kTile1x128, Stage::kEncode>(a, vec, stream);
    case Grouping::kTile128x1: return launch_tiles<In, kE4M3, Grouping::kTile128x1, Stage::kEncode>(a, vec, stream);
    case Grouping::kBlock128x128:
      return launch_tiles<In, kE4M3, Grouping::kBlock128x128, Stage::kEncode>(a, vec, stream);
  }
}

// ---------------------------------------------------------------------------
// Dequantize: one thread per element.

template <bool kE4M3>
__global__ void dequantize_kernel(const DequantizeArgs a) {
  const int64_t total = a.rows * a.cols;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / a.cols, c = idx % a.cols;
    int64_t gr = 0, gc = 0;
    switch (a.grouping) {
      case Grouping::kTensor: break;
      case Grouping::kTile1x128: gr = r, gc = c / kGroup; break;
      case Grouping::kTile128x1: gr = r / kGroup, gc = c; break;
      case Grouping::kBlock128x128: gr = r / kGroup, gc = c / kGroup; break;
    }
    const float scale = a.scales[gr * a.scale_strides.row + gc * a.scale_strides.col];
    a.out[idx] = __fmul_rn(decode<kE4M3>(a.codes[idx]), scale);
  }
}

// ---------------------------------------------------------------------------
// cuBLASLt.

cudaDataType_t data_type(Format f) { return f == Format::kE4M3 ? CUDA_R_8F_E4M3 : CUDA_R_8F_E5M2; }

int32_t scale_mode(ScaleLayout s) {
  switch (s) {
    case ScaleLayout::kScalar: return CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
    case ScaleLayout::kVec128: return CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    case ScaleLayout::kBlock128x128: return CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
  }
  return CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
}

const char* name(ScaleLayout s) {
  switch (s) {
    case ScaleLayout::kScalar: return "per-tensor";
    case ScaleLayout::kVec128: return "1x128";
    case ScaleLayout::kBlock128x128: return "128x128";
  }
  return "?";
}

const char* name(Format f) { return f == Format::kE4M3 ? "e4m3" : "e5m2"; }

// Largest power of two (<= 256) dividing the address: what cuBLASLt may assume.
uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 1 && address % a != 0) a /= 2;
  return a;
}

constexpr size_t kWorkspaceBytes = 32u << 20;  // cuBLAS's recommendation for Hopper

// Process-wide cuBLASLt state. Never destroyed: a static destructor running after
// the CUDA runtime shut down would fail, and the OS reclaims it all at exit.
struct LtState {
  std::mutex mutex;
  std::map<int, cublasLtHandle_t> handles;                        // per device
  std::map<std::pair<int, void*>, void*> workspaces;              // per (device, stream): concurrent streams must not share one
  std::map<std::array<int64_t, 12>, cublasLtMatmulAlgo_t> algos;  // heuristic answers per problem
};

LtState& lt_state() {
  static auto* state = new LtState;
  return *state;
}

struct MatmulDesc {
  cublasLtMatmulDesc_t desc = nullptr;
  ~MatmulDesc() {
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
  template <typename T>
  void set(cublasLtMatmulDescAttributes_t attribute, const T& value) {
    BRIGADE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)));
  }
};

struct Layout {
  cublasLtMatrixLayout_t layout = nullptr;
  Layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
    BRIGADE_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, rows, cols, ld));
  }
  ~Layout() {
    if (layout) cublasLtMatrixLayoutDestroy(layout);
  }
};

struct Preference {
  cublasLtMatmulPreference_t pref = nullptr;
  Preference() { BRIGADE_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref)); }
  ~Preference() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
  }
  template <typename T>
  void set(cublasLtMatmulPreferenceAttributes_t attribute, const T& value) {
    BRIGADE_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attribute, &value, sizeof(value)));
  }
};

}  // namespace

void quantize(const QuantizeArgs& a, void* stream_handle) {
  BRIGADE_ASSERT(a.x != nullptr && a.scales != nullptr && a.amax != nullptr && a.nonfinite != nullptr,
                 "fp8_cuda::quantize: missing input or output pointer");
  BRIGADE_ASSERT(a.rows >= 0 && a.cols >= 0 && (a.rows + kGroup - 1) / kGroup <= 65535,
                 "fp8_cuda::quantize: unsupported shape ", a.rows, " x ", a.cols);
  if (a.rows == 0 || a.cols == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  const bool e4m3 = a.format == Format::kE4M3;
  if (a.x_type == InputType::kFloat32) {
    e4m3 ? quantize_typed<float, true>(a, stream) : quantize_typed<float, false>(a, stream);
  } else {
    e4m3 ? quantize_typed<__nv_bfloat16, true>(a, stream) : quantize_typed<__nv_bfloat16, false>(a, stream);
  }
}

void dequantize(const DequantizeArgs& a, void* stream_handle) {
  BRIGADE_ASSERT(a.codes != nullptr && a.scales != nullptr && a.out != nullptr,
                 "fp8_cuda::dequantize: missing input or output pointer");
  const int64_t total = a.rows * a.cols;
  if (total == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  constexpr int kBlock = 256;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((total + kBlock - 1) / kBlock, 65536));
  if (a.format == Format::kE4M3) {
    dequantize_kernel<true><<<blocks, kBlock, 0, stream>>>(a);
  } else {
    dequantize_kernel<false><<<blocks, kBlock, 0, stream>>>(a);
  }
  BRIGADE_CUDA_CHECK(cudaGetLastError());
}

void gemm(const GemmArgs& g, void* stream_handle) {
  const bool block_scaled = g.a.scale_layout != ScaleLayout::kScalar || g.b.scale_layout != ScaleLayout::kScalar;
  BRIGADE_ASSERT(block_scaled ? (g.a.scale_layout != ScaleLayout::kScalar && g.b.scale_layout != ScaleLayout::kScalar &&
                                 !(g.a.scale_layout == ScaleLayout::kBlock128x128 &&
                                   g.b.scale_layout == ScaleLayout::kBlock128x128))
                              : true,
                 "fp8_cuda::gemm: unsupported scale combination A ", name(g.a.scale_layout), ", B ",
                 name(g.b.scale_layout));
  BRIGADE_ASSERT(g.k % 16 == 0 && g.n % (g.out_type == OutType::kBFloat16 ? 8 : 4) == 0 &&
                     (!block_scaled || (g.m % 4 == 0 && g.n % 4 == 0)),
                 "fp8_cuda::gemm: shape m ", g.m, ", n ", g.n, ", k ", g.k, " breaks cuBLASLt's FP8 alignment rules");
  if (g.m == 0 || g.n == 0) return;
  BRIGADE_CHECK(!block_scaled || cublasLtGetVersion() >= 120900, "FP8 block-scaled GEMMs need cuBLASLt >= 12.9, found ",
                cublasLtGetVersion());
  auto stream = static_cast<cudaStream_t>(stream_handle);
  int device = 0;
  BRIGADE_CUDA_CHECK(cudaGetDevice(&device));

  auto& state = lt_state();
  std::unique_lock<std::mutex> lock(state.mutex);
  cublasLtHandle_t& handle = state.handles[device];
  if (handle == nullptr) BRIGADE_CUBLAS_CHECK(cublasLtCreate(&handle));
  void*& workspace = state.workspaces[{device, stream_handle}];
  if (workspace == nullptr) BRIGADE_CUDA_CHECK(cudaMalloc(&workspace, kWorkspaceBytes));

  // cuBLASLt computes our D^T = B A^T (fp8_cuda.h): its A is our B, its B our A.
  MatmulDesc desc;
  BRIGADE_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  desc.set(CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T);
  desc.set(CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N);
  desc.set(CUBLASLT_MATMUL_DESC_FAST_ACCUM, int8_t{0});  // promote partial sums to FP32 (DeepSeek-V3's concern)
  desc.set(CUBLASLT_MATMUL_DESC_A_SCALE_MODE, scale_mode(g.b.scale_layout));
  desc.set(CUBLASLT_MATMUL_DESC_B_SCALE_MODE, scale_mode(g.a.scale_layout));
  desc.set(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(g.b.scales));
  desc.set(CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(g.a.scales));
  const cudaDataType_t out_type = g.out_type == OutType::kBFloat16 ? CUDA_R_16BF : CUDA_R_32F;
  Layout lt_a(data_type(g.b.format), g.k, g.n, g.k);
  Layout lt_b(data_type(g.a.format), g.k, g.m, g.k);
  Layout lt_d(out_type, g.n, g.m, g.n);

  const uint32_t align_a = alignment_of(g.b.codes), align_b = alignment_of(g.a.codes), align_d = alignment_of(g.d);
  const std::array<int64_t, 12> key = {device,
                                       g.m,
                                       g.n,
                                       g.k,
                                       static_cast<int64_t>(g.a.format),
                                       static_cast<int64_t>(g.b.format),
                                       static_cast<int64_t>(g.a.scale_layout),
                                       static_cast<int64_t>(g.b.scale_layout),
                                       static_cast<int64_t>(g.out_type),
                                       align_a,
                                       align_b,
                                       align_d};
  auto found = state.algos.find(key);
  if (found == state.algos.end()) {
    Preference pref;
    pref.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, kWorkspaceBytes);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d);
    cublasLtMatmulHeuristicResult_t result{};
    int returned = 0;
    BRIGADE_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, desc.desc, lt_a.layout, lt_b.layout, lt_d.layout,
                                                        lt_d.layout, pref.pref, 1, &result, &returned));
    BRIGADE_CHECK(returned > 0, "cuBLASLt has no FP8 GEMM for m ", g.m, ", n ", g.n, ", k ", g.k, ", A ",
                  name(g.a.format), " ", name(g.a.scale_layout), ", B ", name(g.b.format), " ",
                  name(g.b.scale_layout), " on device ", device,
                  " (per-tensor FP8 needs sm_89+; 1x128/128x128 block scaling needs Hopper sm_90 and cuBLAS >= 12.9)");
    found = state.algos.emplace(key, result.algo).first;
  }
  const cublasLtMatmulAlgo_t algo = found->second;
  lock.unlock();  // the workspace of this (device, stream) is ordered by the stream itself

  const float alpha = 1.0f, beta = 0.0f;
  BRIGADE_CUBLAS_CHECK(cublasLtMatmul(handle, desc.desc, &alpha, g.b.codes, lt_a.layout, g.a.codes, lt_b.layout, &beta,
                                      g.d, lt_d.layout, g.d, lt_d.layout, &algo, workspace, kWorkspaceBytes, stream));
}

}  // namespace brigade::precision::fp8_cuda
