#include "precision/quantize.h"

#include <cmath>

#include <ATen/Parallel.h>

#include "core/error.h"

namespace brigade::precision {
namespace {

int64_t groups(int64_t n) { return (n + kScaleGroup - 1) / kScaleGroup; }

// x zero-padded to multiples of 128 in the dimensions the mode groups.
torch::Tensor pad_for(const torch::Tensor& x, ScalingMode mode) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const bool pad_rows = mode == ScalingMode::kTile128x1 || mode == ScalingMode::kBlock128x128;
  const bool pad_cols = mode == ScalingMode::kTile1x128 || mode == ScalingMode::kBlock128x128;
  const int64_t r = pad_rows ? groups(rows) * kScaleGroup : rows;
  const int64_t c = pad_cols ? groups(cols) * kScaleGroup : cols;
  if (r == rows && c == cols) return x;
  auto out = torch::zeros({r, c}, x.options());
  out.narrow(0, 0, rows).narrow(1, 0, cols).copy_(x);
  return out;
}

// Group maxima of |x| ([rows, cols], padded) in the mode's scale shape: max(max,
// -min) per group, which reads x once and allocates no |x| copy. NaN propagates.
torch::Tensor group_amax(const torch::Tensor& padded, ScalingMode mode) {
  const int64_t r = padded.size(0), c = padded.size(1);
  auto amax_over = [](const torch::Tensor& t, int64_t dim) {
    auto [lo, hi] = torch::aminmax(t, dim);
    return torch::maximum(hi, lo.neg());
  };
  switch (mode) {
    case ScalingMode::kPerTensorCurrent:
    case ScalingMode::kPerTensorDelayed: return amax_over(padded.reshape({-1}), 0);
    case ScalingMode::kTile1x128: return amax_over(padded.view({r, c / kScaleGroup, kScaleGroup}), -1);
    case ScalingMode::kTile128x1: return amax_over(padded.view({r / kScaleGroup, kScaleGroup, c}), 1);
    case ScalingMode::kBlock128x128:
      return amax_over(amax_over(padded.view({r / kScaleGroup, kScaleGroup, c / kScaleGroup, kScaleGroup}), 3), 1);
  }
  BRIGADE_FAIL("unreachable scaling mode");
}

// Scales broadcast back to every element of [rows, cols].
torch::Tensor expand_scales(const torch::Tensor& scales, ScalingMode mode, int64_t rows, int64_t cols) {
  switch (mode) {
    case ScalingMode::kPerTensorCurrent:
    case ScalingMode::kPerTensorDelayed: return scales.expand({rows, cols});
    case ScalingMode::kTile1x128:
      return scales.repeat_interleave(kScaleGroup, 1).narrow(1, 0, cols);
    case ScalingMode::kTile128x1:
      return scales.repeat_interleave(kScaleGroup, 0).narrow(0, 0, rows);
    case ScalingMode::kBlock128x128:
      return scales.repeat_interleave(kScaleGroup, 0).repeat_interleave(kScaleGroup, 1).narrow(0, 0, rows).narrow(1, 0, cols);
  }
  BRIGADE_FAIL("unreachable scaling mode");
}

}  // namespace

std::string to_string(ScalingMode mode) {
  switch (mode) {
    case ScalingMode::kPerTensorCurrent: return "per-tensor current";
    case ScalingMode::kPerTensorDelayed: return "per-tensor delayed";
    case ScalingMode::kTile1x128: return "1x128 tiles";
    case ScalingMode::kTile128x1: return "128x1 tiles";
    case ScalingMode::kBlock128x128: return "128x128 blocks";
  }
  return "?";
}

float scale_for(float amax, Fp8Format format, bool power_of_two) {
  if (amax == 0.0f) return 1.0f;
  // In float64, rounded once to float32.
  double s = static_cast<double>(amax) / static_cast<double>(format_info(format).max);
  if (power_of_two) s = std::exp2(std::ceil(std::log2(s)));
  return static_cast<float>(s);
}

torch::Tensor QuantizedTensor::dequantize() const {
  return decode_fp8(data, format) * expand_scales(scales, mode, data.size(0), data.size(1));
}

DelayedScaling::DelayedScaling(int64_t history, double margin, Algorithm algorithm)
    : margin_(margin), algorithm_(algorithm) {
  BRIGADE_CHECK(history >= 1, "amax history length must be >= 1, got ", history);
  BRIGADE_CHECK(std::isfinite(margin) && margin >= 0, "scaling margin must be finite and >= 0, got ", margin);
  history_ = torch::zeros({history});
}

float DelayedScaling::scale(Fp8Format format, bool power_of_two) const {
  if (recorded_ == 0) return 1.0f;
  const float amax = algorithm_ == Algorithm::kMax ? history_.max().item<float>() : history_[position_].item<float>();
  if (amax == 0.0f) return 1.0f;
  double s = static_cast<double>(amax) / static_cast<double>(format_info(format).max) * std::exp2(margin_);
  if (power_of_two) s = std::exp2(std::ceil(std::log2(s)));
  return static_cast<float>(s);
}

void DelayedScaling::record(float amax) {
  position_ = (position_ + 1) % history_.size(0);
  history_[position_] = amax;
  recorded_ += 1;
}

void DelayedScaling::restore(const torch::Tensor& history, int64_t position, int64_t recorded) {
  BRIGADE_CHECK(history.dim() == 1 && history.size(0) == history_.size(0), "amax history of length ",
                history.numel(), " does not match the recipe's ", history_.size(0));
  BRIGADE_CHECK(position >= -1 && position < history_.size(0) && recorded >= 0, "invalid amax history position ",
                position, " / count ", recorded);
  history_.copy_(history);
  position_ = position;
  recorded_ = recorded;
}

namespace {

// Checks x, computes the group maxima and the scales (recording delayed amax).
QuantizedTensor scales_for(const torch::Tensor& x, const QuantizeOptions& o, DelayedScaling* delayed, bool record) {
  BRIGADE_CHECK(x.dim() == 2, "quantize ", o.name, ": expected a 2-D tensor, got ", x.sizes());
  BRIGADE_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, "quantize ", o.name,
                ": expected float32 or bfloat16, got ", x.scalar_type());
  BRIGADE_CHECK(o.mode != ScalingMode::kPerTensorDelayed || delayed != nullptr, "quantize ", o.name,
                ": delayed scaling needs its amax history");
  QuantizedTensor q;
  q.mode = o.mode;
  q.format = o.format;
  q.amax = group_amax(pad_for(x, o.mode), o.mode).to(torch::kFloat).contiguous();
  // amax is NaN or infinite exactly when x holds a NaN or infinity.
  BRIGADE_CHECK(torch::isfinite(q.amax).all().item<bool>(), "non-finite value (NaN or Inf) in ", o.name,
                " reached the FP8 quantizer (", to_string(o.mode), ")");
  if (o.mode == ScalingMode::kPerTensorDelayed) {
    q.scales = torch::tensor(delayed->scale(o.format, o.power_of_two_scales));
    if (record) delayed->record(q.amax.item<float>());
  } else {
    q.scales = torch::empty_like(q.amax);
    const float* a = q.amax.data_ptr<float>();
    float* s = q.scales.data_ptr<float>();
    for (int64_t i = 0; i < q.amax.numel(); ++i) s[i] = scale_for(a[i], o.format, o.power_of_two_scales);
  }
  return q;
}

// Calls fn(row, scales of that row, elements per scale) for every row, rows in parallel.
template <typename Fn>
void for_each_row(int64_t rows, int64_t cols, const QuantizedTensor& q, Fn&& fn) {
  const float* s = q.scales.data_ptr<float>();
  const int64_t scale_cols = q.scales.dim() == 2 ? q.scales.size(1) : 1;
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(cols, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      switch (q.mode) {
        case ScalingMode::kTile1x128: fn(i, s + i * scale_cols, kScaleGroup); break;
        case ScalingMode::kTile128x1: fn(i, s + (i / kScaleGroup) * scale_cols, 1); break;
        case ScalingMode::kBlock128x128: fn(i, s + (i / kScaleGroup) * scale_cols, kScaleGroup); break;
        default: fn(i, s, std::max<int64_t>(cols, 1)); break;
      }
    }
  });
}

}  // namespace

QuantizedTensor quantize(const torch::Tensor& x, const QuantizeOptions& o, DelayedScaling* delayed, bool record) {
  auto q = scales_for(x, o, delayed, record);
  auto xf = x.to(torch::kFloat).contiguous();
  const int64_t rows = xf.size(0), cols = xf.size(1);
  q.data = torch::empty({rows, cols}, torch::TensorOptions().dtype(torch::kByte));
  const float* in = xf.data_ptr<float>();
  uint8_t* codes = q.data.data_ptr<uint8_t>();
  // x * (1 / s): the reciprocal once per group's scale, as a GEMM prologue would.
  for_each_row(rows, cols, q, [&](int64_t i, const float* scales, int64_t every) {
    encode_row(in + i * cols, codes + i * cols, cols, scales, every, o.format);
  });
  return q;
}

torch::Tensor fake_quantize(const torch::Tensor& x, const QuantizeOptions& o, DelayedScaling* delayed, bool record) {
  auto q = scales_for(x, o, delayed, record);
  auto xf = x.to(torch::kFloat).contiguous();
  const int64_t rows = xf.size(0), cols = xf.size(1);
  auto out = torch::empty({rows, cols}, torch::TensorOptions().dtype(torch::kFloat));
  const float* in = xf.data_ptr<float>();
  float* values = out.data_ptr<float>();
  for_each_row(rows, cols, q, [&](int64_t i, const float* scales, int64_t every) {
    fake_quantize_row(in + i * cols, values + i * cols, cols, scales, every, o.format);
  });
  return out;
}

}  // namespace brigade::precision
