#include "model/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"

namespace brigade::model {

std::string to_string(RopeScalingType type) {
  switch (type) {
    case RopeScalingType::kNone: return "none";
    case RopeScalingType::kLinear: return "linear";
    case RopeScalingType::kLlama3: return "llama3";
    case RopeScalingType::kYarn: return "yarn";
  }
  return "?";
}

RopeScalingType parse_rope_scaling_type(const std::string& name) {
  if (name == "none") return RopeScalingType::kNone;
  if (name == "linear") return RopeScalingType::kLinear;
  if (name == "llama3") return RopeScalingType::kLlama3;
  if (name == "yarn") return RopeScalingType::kYarn;
  BRIGADE_FAIL("model.rope_scaling.type '", name, "' is not one of none, linear, llama3, yarn");
}

void RopeScaling::validate() const {
  if (!enabled()) return;
  BRIGADE_CHECK(factor >= 1.0, "model.rope_scaling.factor must be >= 1 (the context extension ratio), got ", factor);
  BRIGADE_CHECK(original_max_seq_len >= 0, "model.rope_scaling.original_max_seq_len must be >= 0, got ",
                original_max_seq_len);
  if (type == RopeScalingType::kYarn) {
    BRIGADE_CHECK(beta_fast > beta_slow && beta_slow > 0, "model.rope_scaling.beta_fast (", beta_fast,
                  ") must exceed model.rope_scaling.beta_slow (", beta_slow, "), both positive");
    BRIGADE_CHECK(mscale >= 0 && mscale_all_dim >= 0 && attention_factor >= 0,
                  "model.rope_scaling.mscale, mscale_all_dim and attention_factor must be >= 0 (0 = unset)");
  }
  if (type == RopeScalingType::kLlama3) {
    BRIGADE_CHECK(high_freq_factor > low_freq_factor && low_freq_factor > 0, "model.rope_scaling.high_freq_factor (",
                  high_freq_factor, ") must exceed model.rope_scaling.low_freq_factor (", low_freq_factor,
                  "), both positive");
  }
}

namespace {

// YaRN's attention temperature: 0.1 * m * ln(s) + 1 for s > 1.
double yarn_mscale(double scale, double m) { return scale <= 1.0 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; }

}  // namespace

double RopeScaling::cos_sin_factor() const {
  if (type != RopeScalingType::kYarn) return 1.0;
  if (attention_factor > 0) return attention_factor;
  if (mscale > 0 && mscale_all_dim > 0) return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim);
  return yarn_mscale(factor, 1.0);
}

double RopeScaling::softmax_scale_factor() const {
  if (!enabled() || mscale_all_dim <= 0) return 1.0;
  const double m = yarn_mscale(factor, mscale_all_dim);
  return m * m;
}

RopeTables rope_tables(int64_t dim, int64_t positions, double theta, const RopeScaling& s, int64_t max_seq_len) {
  BRIGADE_ASSERT(dim % 2 == 0, "rotary dimension must be even");
  const auto f64 = torch::kDouble;
  auto exponents = torch::arange(0, dim, 2, f64) / static_cast<double>(dim);
  auto inv_freq = 1.0 / torch::pow(theta, exponents);  // [dim / 2]
  const double original = static_cast<double>(s.original_max_seq_len > 0 ? s.original_max_seq_len : max_seq_len);
  const double pi = std::numbers::pi;
  switch (s.type) {
    case RopeScalingType::kNone: break;
    case RopeScalingType::kLinear: inv_freq = inv_freq / s.factor; break;
    case RopeScalingType::kLlama3: {
      // Wavelengths longer than original / low_freq_factor are interpolated by
      // `factor`, shorter than original / high_freq_factor kept, a smooth blend between.
      auto wavelen = 2.0 * pi / inv_freq;
      const double low_wavelen = original / s.low_freq_factor, high_wavelen = original / s.high_freq_factor;
      auto scaled = torch::where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq);
      auto smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      auto blended = (1.0 - smooth) * scaled / s.factor + smooth * scaled;
      auto medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen);
      inv_freq = torch::where(medium, blended, scaled);
      break;
    }
    case RopeScalingType::kYarn: {
      // The dimension index where a frequency makes `rotations` turns over the original context.
      auto correction_dim = [&](double rotations) {
        return dim * std::log(original / (rotations * 2.0 * pi)) / (2.0 * std::log(theta));
      };
      double low = correction_dim(s.beta_fast), high = correction_dim(s.beta_slow);
      if (s.truncate) low = std::floor(low), high = std::ceil(high);
      low = std::max(low, 0.0);
      high = std::min(high, static_cast<double>(dim - 1));
      if (low == high) high += 0.001;  // a ramp of zero width would divide by zero
      auto ramp = ((torch::arange(dim / 2, f64) - low) / (high - low)).clamp(0.0, 1.0);
      auto extrapolate = 1.0 - ramp;  // 1: keep the frequency, 0: interpolate it
      inv_freq = inv_freq / s.factor * (1.0 - extrapolate) + inv_freq * extrapolate;
      break;
    }
  }
  auto angles = torch::outer(torch::arange(0, positions, f64), inv_freq);
  const double m = s.cos_sin_factor();
  auto cos = angles.cos() * m, sin = angles.sin() * m;
  return RopeTables{torch::cat({cos, cos}, -1).to(torch::kFloat), torch::cat({-sin, sin}, -1).to(torch::kFloat)};
}

// The "rotate half" convention (Llama/Qwen in transformers): x * cos + rotate_half(x) * sin.
// rotate_half's sign is folded into the sin table, which saves a negation forward and
// backward; the result is identical.
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin_signed) {
  auto half = x.size(-1) / 2;
  auto x1 = x.narrow(-1, 0, half);
  auto x2 = x.narrow(-1, half, half);
  return x * cos + torch::cat({x2, x1}, -1) * sin_signed;
}

}  // namespace brigade::model
