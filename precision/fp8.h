// FP8 formats (OCP 8-bit floating point, as NVIDIA Hopper implements them):
//
//   E4M3 ("fn", finite-only): 1 sign, 4 exponent bits (bias 7), 3 mantissa bits.
//        Largest finite 448 (S.1111.110); S.1111.111 is NaN; there is no infinity.
//        Subnormals m/8 * 2^-6, smallest 2^-9. Used for weights and activations.
//   E5M2: 1 sign, 5 exponent bits (bias 15), 2 mantissa bits, IEEE-like.
//        Largest finite 57344 (S.11110.11); S.11111.00 is infinity, S.11111.{01,10,11}
//        NaN. Subnormals m/4 * 2^-14, smallest 2^-16. Used for gradients.
//
// Encoding rounds to nearest, ties to even (one rounding, also from bfloat16,
// which widens to float32 exactly). Finite values beyond the largest finite value
// saturate to +-max: that is what a scaled FP8 recipe wants (LibTorch's plain cast
// gives NaN or infinity instead). NaN stays NaN and infinity never becomes a finite
// number: +-inf encodes as infinity in E5M2 and as NaN in E4M3, which has none.
#pragma once

#include <cstdint>
#include <string>

#include <torch/types.h>

namespace brigade::precision {

enum class Fp8Format { kE4M3, kE5M2 };

struct Fp8FormatInfo {
  const char* name;
  int exponent_bits;
  int mantissa_bits;
  int bias;
  float max;            // largest finite value
  float min_normal;     // 2^(1 - bias)
  float min_subnormal;  // 2^(1 - bias - mantissa_bits)
  uint8_t max_code;     // the code of +max
};

const Fp8FormatInfo& format_info(Fp8Format format);
std::string to_string(Fp8Format format);
// "e4m3" | "e5m2"; anything else is an Error.
Fp8Format parse_fp8_format(const std::string& name);

uint8_t encode_fp8(float value, Fp8Format format);
float decode_fp8(uint8_t code, Fp8Format format);
// The CPU quantizer's hot loops. They vectorise and are compiled for AVX-512,
// AVX2 and baseline x86-64, the best one picked when the program loads.
//
// One row of a scaled tensor: element j uses scales[j / scale_every].
// encode_row: codes[j] = encode(in[j] * (1 / scale)); fake_quantize_row: out[j] =
// decode(that) * scale, computed without materialising the code. fake_quantize_row
// expects finite input (the quantizer checks the group maxima first).
void encode_row(const float* in, uint8_t* codes, int64_t n, const float* scales, int64_t scale_every,
                Fp8Format format);
void fake_quantize_row(const float* in, float* out, int64_t n, const float* scales, int64_t scale_every,
                       Fp8Format format);
// The largest |in[j]|: NaN if any element is NaN, else infinity if any is infinite
// (|x| compared as integers: NaN > infinity > every finite magnitude).
float abs_max(const float* in, int64_t n);
// out[g] = abs_max of in[g * every, min(n, (g + 1) * every)), for every group g.
void group_abs_max(const float* in, int64_t n, int64_t every, float* out);
// acc[j] = max(acc[j], |in[r * stride + j]|) over rows r < rows, for j < n, under
// the same ordering; acc starts at 0.
void column_abs_max(const float* in, int64_t rows, int64_t stride, int64_t n, float* acc);

// float32 or bfloat16 tensor (any shape, CPU) -> uint8 codes of the same shape.
torch::Tensor encode_fp8(const torch::Tensor& values, Fp8Format format);
// uint8 codes (CPU) -> float32 values of the same shape.
torch::Tensor decode_fp8(const torch::Tensor& codes, Fp8Format format);

}  // namespace brigade::precision
