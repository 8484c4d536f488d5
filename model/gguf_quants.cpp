// Dequantization of GGUF's block types beyond Q8_0 / Q4_0, written from the block
// layouts as gguf-py (gguf/quants.py, dequantize_blocks) documents them, with its
// float32 operations in its order so the results are bit for bit the same:
//
//   Q4_1    d, m (fp16), 16 bytes of nibbles (values 0..15 low, 16..31 high)  d*q + m
//   Q5_0    d, qh (uint32: bit j is value j's fifth bit), nibbles as Q4_1     d*(q - 16)
//   Q5_1    d, m, qh, nibbles                                                 d*q + m
//   IQ4_NL  d, nibbles indexing a 16-value non-linear table                   d*table[q]
//   Q2_K    16 scale bytes (low nibble scale, high nibble min, per 16 values),
//           64 bytes of 2-bit values, d, dmin                                 (d*sc)*q - dmin*mn
//   Q3_K    32 bytes of high bits (set bit = no -4 offset), 64 bytes of 2-bit values,
//           12 bytes of sixteen 6-bit scales (offset -32), d                  (d*sc)*q
//   Q4_K    d, dmin, 12 bytes of eight 6-bit scales and mins, 128 bytes of nibbles
//                                                                             (d*sc)*q - dmin*mn
//   Q5_K    as Q4_K plus 32 bytes of fifth bits
//   Q6_K    128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, d    (d*sc)*(q - 32)
//   IQ4_XS  d, 2 + 4 bytes of eight 6-bit scales (offset -32), 128 bytes of nibbles
//           indexing IQ4_NL's table                                           (d*sc)*table[q]
//
// Standard library only (the parser and this code are fuzzed together).
#include <cstdint>
#include <cstring>

#include "core/error.h"
#include "model/gguf_format.h"

namespace brigade::model::gguf {
namespace {

constexpr int8_t kIq4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_fp32(h);
}

uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Q4_K / Q5_K: the eight 6-bit scales and mins packed in 12 bytes.
void scale_min_k4(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 0x3f;
    mn[j] = s[4 + j] & 0x3f;
    sc[4 + j] = static_cast<uint8_t>((s[8 + j] & 0x0f) | ((s[j] >> 2) & 0x30));
    mn[4 + j] = static_cast<uint8_t>((s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30));
  }
}

// Value j of a 32-value nibble block: low nibbles first, then high.
int nibble(const uint8_t* qs, int j) { return j < 16 ? qs[j] & 0x0f : qs[j - 16] >> 4; }

}  // namespace

void dequantize_block(GgmlType type, const uint8_t* p, float* out) {
  switch (type) {
    case GgmlType::kQ4_1: {
      const float d = half(p), m = half(p + 2);
      for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(nibble(p + 4, j)) + m;
      return;
    }
    case GgmlType::kQ5_0: {
      const float d = half(p);
      const uint32_t qh = u32_at(p + 2);
      for (int j = 0; j < 32; ++j) {
        const int q = nibble(p + 6, j) | static_cast<int>(((qh >> j) & 1u) << 4);
        out[j] = d * static_cast<float>(q - 16);
      }
      return;
    }
    case GgmlType::kQ5_1: {
      const float d = half(p), m = half(p + 2);
      const uint32_t qh = u32_at(p + 4);
      for (int j = 0; j < 32; ++j) {
        const int q = nibble(p + 8, j) | static_cast<int>(((qh >> j) & 1u) << 4);
        out[j] = d * static_cast<float>(q) + m;
      }
      return;
    }
    case GgmlType::kIQ4_NL: {
      const float d = half(p);
      for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(kIq4Values[nibble(p + 2, j)]);
      return;
    }
    case GgmlType::kQ2_K: {
      const uint8_t* scales = p;
      const uint8_t* qs = p + 16;
      const float d = half(p + 80), dmin = half(p + 82);
      for (int e = 0; e < 256; ++e) {
        const int g = e / 128, s = (e / 32) % 4, b = e % 32, sub = e / 16;
        const float dl = d * static_cast<float>(scales[sub] & 0x0f);
        const float ml = dmin * static_cast<float>(scales[sub] >> 4);
        const int q = (qs[g * 32 + b] >> (2 * s)) & 3;
        out[e] = dl * static_cast<float>(q) - ml;
      }
      return;
    }
    case GgmlType::kQ3_K: {
      const uint8_t* hmask = p;
      const uint8_t* qs = p + 32;
      const uint8_t* packed = p + 96;
      const float d = half(p + 108);
      float dl[16];
      for (int k = 0; k < 16; ++k) {
        const int low = (packed[k % 8] >> (4 * (k / 8))) & 0x0f;
        const int high = (packed[8 + k % 4] >> (2 * (k / 4))) & 0x03;
        dl[k] = d * static_cast<float>(static_cast<int8_t>(low | (high << 4)) - 32);
      }
      for (int e = 0; e < 256; ++e) {
        const int g = e / 128, s = (e / 32) % 4, b = e % 32;
        const int low = (qs[g * 32 + b] >> (2 * s)) & 3;
        const int offset = ((hmask[b] >> (e / 32)) & 1) ^ 1;  // the offset applies where the bit is clear
        out[e] = dl[e / 16] * static_cast<float>(low - (offset << 2));
      }
      return;
    }
    case GgmlType::kQ4_K:
    case GgmlType::kQ5_K: {
      const bool five = type == GgmlType::kQ5_K;
      const float d = half(p), dmin = half(p + 2);
      uint8_t sc[8], mn[8];
      scale_min_k4(p + 4, sc, mn);
      const uint8_t* qh = p + 16;
      const uint8_t* qs = p + (five ? 48 : 16);
      for (int e = 0; e < 256; ++e) {
        const int g = e / 64, s = (e / 32) % 2, b = e % 32, sub = e / 32;
        int q = (qs[g * 32 + b] >> (4 * s)) & 0x0f;
        if (five) q |= ((qh[b] >> sub) & 1) << 4;
        const float ds = d * static_cast<float>(sc[sub]), dm = dmin * static_cast<float>(mn[sub]);
        out[e] = ds * static_cast<float>(q) - dm;
      }
      return;
    }
    case GgmlType::kQ6_K: {
      const uint8_t* ql = p;
      const uint8_t* qh = p + 128;
      const auto* scales = reinterpret_cast<const int8_t*>(p + 192);
      const float d = half(p + 208);
      for (int e = 0; e < 256; ++e) {
        const int g = e / 128, r = e % 128;
        const int low = (ql[g * 64 + r % 64] >> (4 * (r / 64))) & 0x0f;
        const int high = (qh[g * 32 + r % 32] >> (2 * (r / 32))) & 0x03;
        const float ds = d * static_cast<float>(scales[e / 16]);
        out[e] = ds * static_cast<float>(static_cast<int8_t>(low | (high << 4)) - 32);
      }
      return;
    }
    case GgmlType::kIQ4_XS: {
      const float d = half(p);
      uint16_t scales_h;
      std::memcpy(&scales_h, p + 2, 2);
      const uint8_t* scales_l = p + 4;
      const uint8_t* qs = p + 8;
      for (int g = 0; g < 8; ++g) {
        const int low = (scales_l[g / 2] >> (4 * (g % 2))) & 0x0f;
        const int high = (scales_h >> (2 * g)) & 0x03;
        const float dl = d * static_cast<float>(static_cast<int8_t>(low | (high << 4)) - 32);
        for (int j = 0; j < 32; ++j) {
          const int q = (qs[g * 16 + j % 16] >> (4 * (j / 16))) & 0x0f;
          out[g * 32 + j] = dl * static_cast<float>(kIq4Values[q]);
        }
      }
      return;
    }
    default:
      BRIGADE_ASSERT(false, "dequantize_block: ", ggml_type_name(type), " is decoded elsewhere");
  }
}

}  // namespace brigade::model::gguf
