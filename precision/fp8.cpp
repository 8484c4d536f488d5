#include "precision/fp8.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>

#include <ATen/Parallel.h>

#include "core/error.h"

namespace brigade::precision {
namespace {

constexpr Fp8FormatInfo kE4M3{"e4m3", 4, 3, 7, 448.0f, 0x1p-6f, 0x1p-9f, 0x7E};
constexpr Fp8FormatInfo kE5M2{"e5m2", 5, 2, 15, 57344.0f, 0x1p-14f, 0x1p-16f, 0x7B};

constexpr uint8_t kE4M3NaN = 0x7F;
constexpr uint8_t kE5M2NaN = 0x7F;
constexpr uint8_t kE5M2Inf = 0x7C;

// Magnitude code of |value| (finite, <= max): round to nearest even on the
// format's grid. Subnormals are scaled onto an integer grid (exact: a power of
// two) and rounded there; normals round the float32 mantissa by bit arithmetic.
uint8_t encode_magnitude(float magnitude, const Fp8FormatInfo& f) {
  if (magnitude < f.min_normal) {
    // The integer is the code itself: m = 2^mantissa_bits lands on the smallest normal.
    return static_cast<uint8_t>(std::nearbyint(magnitude / f.min_subnormal));
  }
  const uint32_t bits = std::bit_cast<uint32_t>(magnitude);
  int exponent = static_cast<int>(bits >> 23) - 127;
  const uint32_t mantissa = bits & 0x7FFFFFu;
  const int shift = 23 - f.mantissa_bits;
  uint32_t kept = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  if (rest > half || (rest == half && (kept & 1u))) ++kept;
  if (kept == (1u << f.mantissa_bits)) {
    kept = 0;
    ++exponent;
  }
  const uint32_t code = (static_cast<uint32_t>(exponent + f.bias) << f.mantissa_bits) | kept;
  return static_cast<uint8_t>(std::min<uint32_t>(code, f.max_code));
}

uint8_t encode(float value, Fp8Format format) {
  const auto& f = format_info(format);
  const uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  if (std::isnan(value)) return sign | (format == Fp8Format::kE4M3 ? kE4M3NaN : kE5M2NaN);
  if (std::isinf(value)) return sign | (format == Fp8Format::kE4M3 ? kE4M3NaN : kE5M2Inf);
  const float magnitude = std::fabs(value);
  if (magnitude >= f.max) return sign | f.max_code;
  return sign | encode_magnitude(magnitude, f);
}

float decode_slow(uint8_t code, Fp8Format format) {
  const auto& f = format_info(format);
  const float sign = (code & 0x80) ? -1.0f : 1.0f;
  const int exponent = (code & 0x7F) >> f.mantissa_bits;
  const int mantissa = code & ((1 << f.mantissa_bits) - 1);
  const int max_exponent = (1 << f.exponent_bits) - 1;
  if (format == Fp8Format::kE4M3 && exponent == max_exponent && mantissa == (1 << f.mantissa_bits) - 1) {
    return std::numeric_limits<float>::quiet_NaN();
  }
  if (format == Fp8Format::kE5M2 && exponent == max_exponent) {
    return mantissa == 0 ? sign * std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
  }
  if (exponent == 0) return sign * static_cast<float>(mantissa) * f.min_subnormal;
  return sign * std::ldexp(1.0f + static_cast<float>(mantissa) / static_cast<float>(1 << f.mantissa_bits),
                           exponent - f.bias);
}

using Table = std::array<float, 256>;

const Table& decode_table(Fp8Format format) {
  static const auto build = [](Fp8Format fmt) {
    Table t{};
    for (int c = 0; c < 256; ++c) t[c] = decode_slow(static_cast<uint8_t>(c), fmt);
    return t;
  };
  static const Table e4m3 = build(Fp8Format::kE4M3);
  static const Table e5m2 = build(Fp8Format::kE5M2);
  return format == Fp8Format::kE4M3 ? e4m3 : e5m2;
}

}  // namespace

const Fp8FormatInfo& format_info(Fp8Format format) { return format == Fp8Format::kE4M3 ? kE4M3 : kE5M2; }

std::string to_string(Fp8Format format) { return format_info(format).name; }

Fp8Format parse_fp8_format(const std::string& name) {
  if (name == "e4m3") return Fp8Format::kE4M3;
  if (name == "e5m2") return Fp8Format::kE5M2;
  BRIGADE_FAIL("unknown FP8 format '", name, "' (expected e4m3 or e5m2)");
}

uint8_t encode_fp8(float value, Fp8Format format) { return encode(value, format); }

float decode_fp8(uint8_t code, Fp8Format format) { return decode_table(format)[code]; }

const float* fp8_values(Fp8Format format) { return decode_table(format).data(); }

void encode_row(const float* in, uint8_t* codes, int64_t n, const float* scales, int64_t scale_every,
                Fp8Format format) {
  for (int64_t start = 0, g = 0; start < n; start += scale_every, ++g) {
    const float inverse = 1.0f / scales[g];
    const int64_t end = std::min(n, start + scale_every);
    for (int64_t j = start; j < end; ++j) codes[j] = encode(in[j] * inverse, format);
  }
}

void fake_quantize_row(const float* in, float* out, int64_t n, const float* scales, int64_t scale_every,
                       Fp8Format format) {
  const float* table = decode_table(format).data();
  for (int64_t start = 0, g = 0; start < n; start += scale_every, ++g) {
    const float scale = scales[g], inverse = 1.0f / scale;
    const int64_t end = std::min(n, start + scale_every);
    for (int64_t j = start; j < end; ++j) out[j] = table[encode(in[j] * inverse, format)] * scale;
  }
}

torch::Tensor encode_fp8(const torch::Tensor& values, Fp8Format format) {
  BRIGADE_CHECK(values.device().is_cpu(), "encode_fp8: tensor on ", values.device(), "; the CPU codec needs CPU input");
  BRIGADE_CHECK(values.scalar_type() == torch::kFloat || values.scalar_type() == torch::kBFloat16,
                "encode_fp8: expected float32 or bfloat16, got ", values.scalar_type());
  auto src = values.to(torch::kFloat).contiguous();  // bfloat16 widens exactly
  auto out = torch::empty(values.sizes(), torch::TensorOptions().dtype(torch::kByte));
  const float* in = src.data_ptr<float>();
  uint8_t* codes = out.data_ptr<uint8_t>();
  at::parallel_for(0, src.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) codes[i] = encode(in[i], format);
  });
  return out;
}

torch::Tensor decode_fp8(const torch::Tensor& codes, Fp8Format format) {
  BRIGADE_CHECK(codes.device().is_cpu() && codes.scalar_type() == torch::kByte,
                "decode_fp8: expected uint8 codes on the CPU, got ", codes.scalar_type(), " on ", codes.device());
  auto src = codes.contiguous();
  auto out = torch::empty(codes.sizes(), torch::TensorOptions().dtype(torch::kFloat));
  const auto& table = decode_table(format);
  const uint8_t* in = src.data_ptr<uint8_t>();
  float* values = out.data_ptr<float>();
  at::parallel_for(0, src.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) values[i] = table[in[i]];
  });
  return out;
}

}  // namespace brigade::precision
