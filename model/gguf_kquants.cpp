// Encoders for the K-quant super-blocks Q4_K, Q5_K and Q6_K, and for Q5_0 / Q5_1 (the
// types llama.cpp falls back to when a row does not fill whole super-blocks), written
// from ggml's reference quantizers as llama.cpp's quantizer runs them without an
// importance matrix (ggml-quants.c, quantize_row_*_ref), so the bytes are the same.
//
//   Q4_K / Q5_K  eight sub-blocks of 32 values, each x ~ scale * q - min with q in
//                [0, 15] (Q5_K: [0, 31]); each sub-block's (scale, min) is found by a
//                weighted least-squares search over candidate step sizes; the eight
//                scales and mins are then stored as 6-bit multiples of two fp16
//                super-block factors d and dmin, and q is recomputed from the stored
//                values.
//   Q6_K         sixteen sub-blocks of 16 values, x ~ scale * q with q in [-32, 31];
//                each sub-block's signed scale is searched, then stored as an int8
//                multiple of one fp16 factor d; q recomputed from the stored scale.
//   Q5_0 / Q5_1  one block of 32: d = max / -16 (Q5_0), or d = (max - min) / 31 and the
//                min (Q5_1); q rounded directly.
//
// Byte equality needs ggml's float operations in ggml's order: every sum below is
// accumulated left to right as ggml does, rounding ties go to even (ggml's
// nearest_int), and floating-point contraction is off in this file: a fused
// multiply-add rounds once instead of twice and tips searches to other scales
// (measured with -march=native and contraction on: 436 of 7680 Q4_K and 2220 of 7680
// Q5_K blocks differed from llama.cpp's, whose ggml-base is built without FMA on
// x86-64). The pragmas below do it for GCC and for clang's default; clang's
// -ffp-contract=fast and -ffast-math override them and must not reach this file.
//
// Standard library only (fuzzed with the parser).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "core/error.h"
#include "model/gguf_format.h"

namespace brigade::model::gguf {
namespace {

// Below this largest magnitude a sub-block or super-block counts as all zeros
// (ggml's GROUP_MAX_EPS).
constexpr float kZeroGroup = 1e-15f;

// ggml's nearest_int: round to nearest, ties to even, by adding 1.5 * 2^23 so the
// float addition itself rounds. Exact for |x| < 2^22, the range the encoders produce
// for finite input; anything else (non-finite input) gives the same bits ggml gives.
int nearest_int(float x) {
  const float shifted = x + 12582912.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, 4);
  return (bits & 0x007fffff) - 0x00400000;
}

void put_half(uint8_t* at, float value) {
  const uint16_t h = fp32_to_fp16(value);
  std::memcpy(at, &h, 2);
}

float half_at(const uint8_t* at) {
  uint16_t h;
  std::memcpy(&h, at, 2);
  return fp16_to_fp32(h);
}

// A sub-block's asymmetric fit x ~ scale * q - offset, q in [0, qmax] (ggml's
// make_qkx2_quants with squared error). The start is the plain min/max grid (the
// minimum clipped to at most 0); then for each of steps + 1 candidate inverse steps
// (qmax + first + k * stride) / (max - minimum) the values are rounded on that grid
// from the current best minimum, the weighted least-squares scale and minimum for
// those q are solved in closed form (the minimum clipped to 0 again), and a fit with
// a smaller weighted squared error replaces the best (its minimum then anchors the
// next candidate grids). Returns the scale; `offset` receives -minimum (>= 0), `q`
// the levels.
struct OffsetSearch {
  int qmax;
  float first;
  float stride;
  int steps;
};

float fit_scale_offset(const float* x, const float* weight, int n, const OffsetSearch& search, uint8_t* q,
                       float& offset) {
  float lo = x[0], hi = x[0];
  float sum_w = weight[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    sum_w += weight[i];
    sum_x += weight[i] * x[i];
  }
  if (lo > 0) lo = 0;
  if (hi == lo) {
    std::fill(q, q + n, 0);
    offset = -lo;
    return 0.0f;
  }
  float minimum = lo;
  auto level = [&](float inverse, float v) {
    return static_cast<uint8_t>(std::clamp(nearest_int(inverse * (v - minimum)), 0, search.qmax));
  };
  float inverse = static_cast<float>(search.qmax) / (hi - minimum);
  float scale = 1 / inverse;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    q[i] = level(inverse, x[i]);
    const float diff = scale * static_cast<float>(q[i]) + lo - x[i];
    best_error += weight[i] * (diff * diff);
  }
  uint8_t trial[32];
  for (int k = 0; k <= search.steps; ++k) {
    inverse = (search.first + search.stride * static_cast<float>(k) + static_cast<float>(search.qmax)) / (hi - minimum);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      trial[i] = level(inverse, x[i]);
      const float wl = weight[i] * static_cast<float>(trial[i]);
      sum_l += wl;
      sum_l2 += wl * static_cast<float>(trial[i]);
      sum_xl += wl * x[i];
    }
    const float det = sum_w * sum_l2 - sum_l * sum_l;
    if (!(det > 0)) continue;
    float trial_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
    float trial_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
    if (trial_min > 0) {
      trial_min = 0;
      trial_scale = sum_xl / sum_l2;
    }
    float error = 0;
    for (int i = 0; i < n; ++i) {
      const float diff = trial_scale * static_cast<float>(trial[i]) + trial_min - x[i];
      error += weight[i] * (diff * diff);
    }
    if (error < best_error) {
      std::copy(trial, trial + n, q);
      best_error = error;
      scale = trial_scale;
      minimum = trial_min;
    }
  }
  offset = -minimum;
  return scale;
}

// A 16-value sub-block's symmetric fit x ~ scale * (q - 32), q - 32 in [-32, 31],
// weighting each value by x^2 (ggml's make_qx_quants, rmse type 1, no importance
// matrix). The grid that maps the largest-magnitude value to -32 is the start; the
// 18 grids -(32 + 0.1 k) / max, k = -9..9 without 0, are tried, and a grid whose
// least-squares scale explains more of the weighted signal (sum_xl^2 / sum_l2)
// replaces the best. Returns the (signed) scale; `q` receives the offset levels.
float fit_signed_scale(const float* x, int8_t* q) {
  constexpr int kN = 16, kHalf = 32;
  float amax = 0, max = 0;
  for (int i = 0; i < kN; ++i) {
    if (std::fabs(x[i]) > amax) {
      amax = std::fabs(x[i]);
      max = x[i];
    }
  }
  if (amax < kZeroGroup) {
    std::fill(q, q + kN, int8_t{0});
    return 0.0f;
  }
  auto level = [](float inverse, float v) { return std::clamp(nearest_int(inverse * v), -kHalf, kHalf - 1); };
  // Sums of w x l and w l^2 for the grid `inverse`, w = x^2.
  auto fit = [&](float inverse, float& sum_xl, float& sum_l2) {
    sum_xl = sum_l2 = 0;
    for (int i = 0; i < kN; ++i) {
      const auto l = static_cast<float>(level(inverse, x[i]));
      const float w = x[i] * x[i];
      sum_xl += w * x[i] * l;
      sum_l2 += w * l * l;
    }
  };
  auto store = [&](float inverse) {
    for (int i = 0; i < kN; ++i) q[i] = static_cast<int8_t>(kHalf + level(inverse, x[i]));
  };
  float inverse = static_cast<float>(-kHalf) / max;
  float sum_xl, sum_l2;
  fit(inverse, sum_xl, sum_l2);
  store(inverse);
  float scale = sum_l2 != 0 ? sum_xl / sum_l2 : 0.0f;
  float best = scale * sum_xl;
  for (int k = -9; k <= 9; ++k) {
    if (k == 0) continue;
    inverse = -(static_cast<float>(kHalf) + 0.1f * static_cast<float>(k)) / max;
    fit(inverse, sum_xl, sum_l2);
    if (sum_l2 > 0 && sum_xl * sum_xl > best * sum_l2) {
      store(inverse);
      scale = sum_xl / sum_l2;
      best = scale * sum_xl;
    }
  }
  return scale;
}

// Q4_K and Q5_K: d, dmin (fp16), 12 bytes of eight 6-bit scales and mins, [Q5_K: 32
// bytes of fifth bits], 128 bytes of nibbles.
void quantize_q45_k(const float* x, uint8_t* out, bool five) {
  constexpr int kSub = 32, kSubs = 8;
  const OffsetSearch search = five ? OffsetSearch{31, -0.5f, 0.1f, 15} : OffsetSearch{15, -1.0f, 0.1f, 20};
  uint8_t q[256];
  float scales[kSubs], offsets[kSubs], weight[kSub];
  float max_scale = 0, max_offset = 0;
  for (int j = 0; j < kSubs; ++j) {
    const float* xs = x + kSub * j;
    float sum_x2 = 0;
    for (int i = 0; i < kSub; ++i) sum_x2 += xs[i] * xs[i];
    const float rms = std::sqrt(sum_x2 / kSub);
    for (int i = 0; i < kSub; ++i) weight[i] = rms + std::fabs(xs[i]);
    scales[j] = fit_scale_offset(xs, weight, kSub, search, q + kSub * j, offsets[j]);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (offsets[j] > max_offset) max_offset = offsets[j];
  }
  const float to_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
  const float to_offset = max_offset > 0 ? 63.0f / max_offset : 0.0f;
  uint8_t* packed = out + 4;
  uint8_t sc[kSubs], mn[kSubs];
  for (int j = 0; j < kSubs; ++j) {
    // The uint8 truncation comes before the clamp, as in ggml.
    sc[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(to_scale * scales[j])));
    mn[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(to_offset * offsets[j])));
  }
  // Sub-blocks 0-3 keep their scale and min in the low 6 bits of bytes 0-3 and 4-7;
  // 4-7 keep their low 4 bits in bytes 8-11 and their top 2 bits in the top of 0-7.
  for (int j = 0; j < 4; ++j) {
    packed[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
    packed[j + 4] = static_cast<uint8_t>(mn[j] | ((mn[j + 4] >> 4) << 6));
    packed[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0x0f) | ((mn[j + 4] & 0x0f) << 4));
  }
  put_half(out, max_scale / 63.0f);
  put_half(out + 2, max_offset / 63.0f);
  const float d = half_at(out), dmin = half_at(out + 2);
  const int qmax = five ? 31 : 15;
  for (int j = 0; j < kSubs; ++j) {
    const float step = d * static_cast<float>(sc[j]);
    if (step == 0) continue;  // the search's levels stay
    const float shift = dmin * static_cast<float>(mn[j]);
    for (int i = 0; i < kSub; ++i)
      q[kSub * j + i] = static_cast<uint8_t>(std::clamp(nearest_int((x[kSub * j + i] + shift) / step), 0, qmax));
  }
  uint8_t* high = out + 16;
  uint8_t* nibbles = out + (five ? 48 : 16);
  if (five) std::memset(high, 0, 32);
  // Each 64 values share 32 bytes: the first 32 in the low nibbles, the next 32 in
  // the high ones; Q5_K's fifth bit of value i of chunk c is bit 2c (+1) of high[i].
  for (int c = 0; c < 4; ++c) {
    for (int i = 0; i < 32; ++i) {
      const uint8_t a = q[64 * c + i], b = q[64 * c + 32 + i];
      nibbles[32 * c + i] = static_cast<uint8_t>((a & 0x0f) | ((b & 0x0f) << 4));
      if (five) high[i] |= static_cast<uint8_t>(((a >> 4) << (2 * c)) | ((b >> 4) << (2 * c + 1)));
    }
  }
}

// Q6_K: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, d (fp16).
void quantize_q6_k(const float* x, uint8_t* out) {
  constexpr int kSub = 16, kSubs = 16;
  int8_t q[256];
  float scales[kSubs];
  float max_scale = 0, max_abs = 0;
  for (int j = 0; j < kSubs; ++j) {
    scales[j] = fit_signed_scale(x + kSub * j, q + kSub * j);
    if (std::fabs(scales[j]) > max_abs) {
      max_abs = std::fabs(scales[j]);
      max_scale = scales[j];
    }
  }
  std::memset(out, 0, 210);
  if (max_abs < kZeroGroup) return;  // all zeros, d = 0
  uint8_t* low = out;
  uint8_t* high = out + 128;
  auto* sub_scales = reinterpret_cast<int8_t*>(out + 192);
  const float inverse = -128.0f / max_scale;
  put_half(out + 208, 1 / inverse);
  for (int j = 0; j < kSubs; ++j)
    sub_scales[j] = static_cast<int8_t>(std::min(127, nearest_int(inverse * scales[j])));
  const float d = half_at(out + 208);
  for (int j = 0; j < kSubs; ++j) {
    const float step = d * static_cast<float>(sub_scales[j]);
    if (step == 0) continue;  // the search's levels stay
    for (int i = 0; i < kSub; ++i)
      q[kSub * j + i] = static_cast<int8_t>(32 + std::clamp(nearest_int(x[kSub * j + i] / step), -32, 31));
  }
  // Each half of 128 values: value r's low nibble in low[64h + r % 64] (shifted by 4
  // for r >= 64), its top two bits in high[32h + r % 32] at bit 2 (r / 32).
  for (int h = 0; h < 2; ++h) {
    for (int r = 0; r < 128; ++r) {
      const auto v = static_cast<uint8_t>(q[128 * h + r]);
      low[64 * h + r % 64] |= static_cast<uint8_t>((v & 0x0f) << (4 * (r / 64)));
      high[32 * h + r % 32] |= static_cast<uint8_t>((v >> 4) << (2 * (r / 32)));
    }
  }
}

// Q5_0: d = max / -16 where max is the value of largest magnitude, 32-bit fifth bits,
// 16 bytes of nibbles; q = min(31, trunc(x / d + 16.5)).
void quantize_q5_0(const float* x, uint8_t* out) {
  float amax = 0, max = 0;
  for (int i = 0; i < 32; ++i) {
    if (amax < std::fabs(x[i])) {
      amax = std::fabs(x[i]);
      max = x[i];
    }
  }
  const float d = max / -16;
  const float inverse = d != 0 ? 1.0f / d : 0.0f;
  put_half(out, d);
  uint32_t fifth = 0;
  for (int i = 0; i < 16; ++i) {
    // ggml truncates through int8 before the clamp; the shifted value is in [0.5, 32.5].
    const auto a = static_cast<uint8_t>(std::min(31, static_cast<int>(static_cast<int8_t>(x[i] * inverse + 16.5f))));
    const auto b =
        static_cast<uint8_t>(std::min(31, static_cast<int>(static_cast<int8_t>(x[i + 16] * inverse + 16.5f))));
    out[6 + i] = static_cast<uint8_t>((a & 0x0f) | ((b & 0x0f) << 4));
    fifth |= static_cast<uint32_t>(a >> 4) << i;
    fifth |= static_cast<uint32_t>(b >> 4) << (i + 16);
  }
  std::memcpy(out + 2, &fifth, 4);
}

// Q5_1: d = (max - min) / 31, m = min (fp16 each), fifth bits, nibbles;
// q = trunc((x - min) / d + 0.5).
void quantize_q5_1(const float* x, uint8_t* out) {
  float lo = std::numeric_limits<float>::max(), hi = -std::numeric_limits<float>::max();
  for (int i = 0; i < 32; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  const float d = (hi - lo) / 31;
  const float inverse = d != 0 ? 1.0f / d : 0.0f;
  put_half(out, d);
  put_half(out + 2, lo);
  uint32_t fifth = 0;
  for (int i = 0; i < 16; ++i) {
    const auto a = static_cast<uint8_t>((x[i] - lo) * inverse + 0.5f);
    const auto b = static_cast<uint8_t>((x[i + 16] - lo) * inverse + 0.5f);
    out[8 + i] = static_cast<uint8_t>((a & 0x0f) | ((b & 0x0f) << 4));
    fifth |= static_cast<uint32_t>((a & 0x10) >> 4) << i;
    fifth |= static_cast<uint32_t>((b & 0x10) >> 4) << (i + 16);
  }
  std::memcpy(out + 4, &fifth, 4);
}

}  // namespace

void quantize_block(GgmlType type, const float* values, uint8_t* block) {
  switch (type) {
    case GgmlType::kQ4_K: return quantize_q45_k(values, block, /*five=*/false);
    case GgmlType::kQ5_K: return quantize_q45_k(values, block, /*five=*/true);
    case GgmlType::kQ6_K: return quantize_q6_k(values, block);
    case GgmlType::kQ5_0: return quantize_q5_0(values, block);
    case GgmlType::kQ5_1: return quantize_q5_1(values, block);
    default: BRIGADE_ASSERT(false, "quantize_block: ", ggml_type_name(type), " is encoded elsewhere");
  }
}

}  // namespace brigade::model::gguf
