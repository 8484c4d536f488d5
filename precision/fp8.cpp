#include "precision/fp8.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>

#include "core/error.h"
#include "core/parallel_for.h"

namespace brigade::precision {
namespace {

constexpr Fp8FormatInfo kE4M3{"e4m3", 4, 3, 7, 448.0f, 0x1p-6f, 0x1p-9f, 0x7E};
constexpr Fp8FormatInfo kE5M2{"e5m2", 5, 2, 15, 57344.0f, 0x1p-14f, 0x1p-16f, 0x7B};

constexpr uint8_t kE4M3NaN = 0x7F;
constexpr uint8_t kE5M2NaN = 0x7F;
constexpr uint8_t kE5M2Inf = 0x7C;

// Branch-free encoding (the compiler vectorises loops of it). For |x| in the
// normal range, rounding the float32 bit pattern to M mantissa bits with
// round-half-even is integer arithmetic (a carry into the exponent is exactly
// right), and the exponent is re-biased by subtraction. Subnormals: |x| scaled to
// units of the smallest subnormal (exact, a power of two) is rounded to an integer
// by the classic add-2^23 trick (the float adder rounds half to even).
template <Fp8Format F>
inline uint8_t encode(float value) {
  constexpr const Fp8FormatInfo& f = F == Fp8Format::kE4M3 ? kE4M3 : kE5M2;
  constexpr int shift = 23 - f.mantissa_bits;
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t u = bits & 0x7FFFFFFFu;
  const uint32_t rounded = u + ((1u << (shift - 1)) - 1) + ((u >> shift) & 1u);
  const uint32_t normal = (rounded >> shift) - (static_cast<uint32_t>(127 - f.bias) << f.mantissa_bits);
  const float magnitude = std::bit_cast<float>(u);
  const uint32_t subnormal = std::bit_cast<uint32_t>(magnitude * (1.0f / f.min_subnormal) + 8388608.0f) - 0x4B000000u;
  // Selections as masks (all ones or zero): GCC vectorises these, not ?: chains.
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(u < std::bit_cast<uint32_t>(f.min_normal));
  const uint32_t saturates = 0u - static_cast<uint32_t>(u >= std::bit_cast<uint32_t>(f.max));  // also caps rounding past max
  const uint32_t nonfinite = 0u - static_cast<uint32_t>(u >= 0x7F800000u);
  constexpr uint32_t nan = F == Fp8Format::kE4M3 ? kE4M3NaN : kE5M2NaN;
  // E5M2 has an infinity (u == 0x7F800000 exactly); E4M3 encodes infinity as NaN.
  const uint32_t special = F == Fp8Format::kE5M2 ? nan - (static_cast<uint32_t>(u == 0x7F800000u) * (nan - kE5M2Inf)) : nan;
  uint32_t code = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  code = (f.max_code & saturates) | (code & ~saturates);
  code = (special & nonfinite) | (code & ~nonfinite);
  return static_cast<uint8_t>(sign | code);
}

inline uint8_t encode(float value, Fp8Format format) {
  return format == Fp8Format::kE4M3 ? encode<Fp8Format::kE4M3>(value) : encode<Fp8Format::kE5M2>(value);
}

// decode(encode(value)) for finite value, as arithmetic on the same rounding
// (no table lookup, so it vectorises): the rounded float32 pattern with the low
// mantissa bits cleared is the FP8 value itself; subnormals are the rounded
// integer times the smallest subnormal.
template <Fp8Format F>
inline float round_to_fp8(float value) {
  constexpr const Fp8FormatInfo& f = F == Fp8Format::kE4M3 ? kE4M3 : kE5M2;
  constexpr int shift = 23 - f.mantissa_bits;
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  const uint32_t u = bits & 0x7FFFFFFFu;
  const uint32_t rounded = (u + ((1u << (shift - 1)) - 1) + ((u >> shift) & 1u)) & ~((1u << shift) - 1);
  const float magnitude = std::bit_cast<float>(u);
  const float steps = (magnitude * (1.0f / f.min_subnormal) + 8388608.0f) - 8388608.0f;
  const uint32_t subnormal = std::bit_cast<uint32_t>(steps * f.min_subnormal);
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(u < std::bit_cast<uint32_t>(f.min_normal));
  const uint32_t saturates = 0u - static_cast<uint32_t>(u >= std::bit_cast<uint32_t>(f.max));
  uint32_t out = (subnormal & is_subnormal) | (rounded & ~is_subnormal);
  out = (std::bit_cast<uint32_t>(f.max) & saturates) | (out & ~saturates);
  return std::bit_cast<float>((bits & 0x80000000u) | out);
}

// Row kernels, compiled per instruction set (GCC/Clang function multi-versioning).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BRIGADE_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BRIGADE_VECTOR_CLONES
#endif

template <Fp8Format F>
BRIGADE_VECTOR_CLONES void encode_row_as(const float* in, uint8_t* codes, int64_t n, const float* scales,
                                         int64_t every) {
  if (every == 1) {  // one scale per element (128x1 tiles)
    for (int64_t j = 0; j < n; ++j) codes[j] = encode<F>(in[j] * (1.0f / scales[j]));
    return;
  }
  for (int64_t start = 0, g = 0; start < n; start += every, ++g) {
    const float inverse = 1.0f / scales[g];
    const int64_t end = std::min(n, start + every);
    for (int64_t j = start; j < end; ++j) codes[j] = encode<F>(in[j] * inverse);
  }
}

template <Fp8Format F>
BRIGADE_VECTOR_CLONES void fake_quantize_row_as(const float* in, float* out, int64_t n, const float* scales,
                                                int64_t every) {
  if (every == 1) {
    for (int64_t j = 0; j < n; ++j) out[j] = round_to_fp8<F>(in[j] * (1.0f / scales[j])) * scales[j];
    return;
  }
  for (int64_t start = 0, g = 0; start < n; start += every, ++g) {
    const float scale = scales[g], inverse = 1.0f / scale;
    const int64_t end = std::min(n, start + every);
    for (int64_t j = start; j < end; ++j) out[j] = round_to_fp8<F>(in[j] * inverse) * scale;
  }
}

// The largest |x| as a bit pattern (NaN > infinity > every finite magnitude).
inline uint32_t abs_max_bits(const float* in, int64_t n) {
  uint32_t m = 0;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, std::bit_cast<uint32_t>(in[j]) & 0x7FFFFFFFu);
  return m;
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

void encode_row(const float* in, uint8_t* codes, int64_t n, const float* scales, int64_t scale_every,
                Fp8Format format) {
  if (format == Fp8Format::kE4M3) {
    encode_row_as<Fp8Format::kE4M3>(in, codes, n, scales, scale_every);
  } else {
    encode_row_as<Fp8Format::kE5M2>(in, codes, n, scales, scale_every);
  }
}

void fake_quantize_row(const float* in, float* out, int64_t n, const float* scales, int64_t scale_every,
                       Fp8Format format) {
  if (format == Fp8Format::kE4M3) {
    fake_quantize_row_as<Fp8Format::kE4M3>(in, out, n, scales, scale_every);
  } else {
    fake_quantize_row_as<Fp8Format::kE5M2>(in, out, n, scales, scale_every);
  }
}

BRIGADE_VECTOR_CLONES float abs_max(const float* in, int64_t n) { return std::bit_cast<float>(abs_max_bits(in, n)); }

BRIGADE_VECTOR_CLONES void group_abs_max(const float* in, int64_t n, int64_t every, float* out) {
  for (int64_t start = 0, g = 0; start < n; start += every, ++g) {
    out[g] = std::bit_cast<float>(abs_max_bits(in + start, std::min(every, n - start)));
  }
}

BRIGADE_VECTOR_CLONES void column_abs_max(const float* in, int64_t rows, int64_t stride, int64_t n, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = in + r * stride;
    for (int64_t j = 0; j < n; ++j) {
      acc[j] = std::bit_cast<float>(
          std::max(std::bit_cast<uint32_t>(acc[j]), std::bit_cast<uint32_t>(row[j]) & 0x7FFFFFFFu));
    }
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
  const float one = 1.0f;  // x * 1 is x exactly, NaN and infinity included
  parallel_for(0, src.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    encode_row(in + begin, codes + begin, end - begin, &one, end - begin, format);
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
  parallel_for(0, src.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) values[i] = table[in[i]];
  });
  return out;
}

}  // namespace brigade::precision
