#include "precision/quantize.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "core/parallel_for.h"
#include "precision/quantize_cuda_host.h"

namespace brigade::precision {
namespace {

int64_t groups(int64_t n) { return (n + kScaleGroup - 1) / kScaleGroup; }

// max under the ordering of |x| as integers (NaN > infinity > finite), for amax
// reductions that must not lose a NaN.
bool by_bits(float a, float b) { return std::bit_cast<uint32_t>(a) < std::bit_cast<uint32_t>(b); }

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
  if (data.is_cuda()) return dequantize_cuda(*this);
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

void check_input(const torch::Tensor& x, const QuantizeOptions& o, const DelayedScaling* delayed) {
  BRIGADE_CHECK(x.dim() == 2, "quantize ", o.name, ": expected a 2-D tensor, got ", x.sizes());
  BRIGADE_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, "quantize ", o.name,
                ": expected float32 or bfloat16, got ", x.scalar_type());
  BRIGADE_CHECK(o.mode != ScalingMode::kPerTensorDelayed || delayed != nullptr, "quantize ", o.name,
                ": delayed scaling needs its amax history");
}

// The one pass behind quantize() and fake_quantize(): group maxima, scales, and
// sink(row, col, n, scales, every) for every piece of every row, where element j of
// the piece uses scales[j / every]. Each group is encoded while it is still in cache
// (1x128: a row; 128x128: 128 rows; 128x1: 128 rows of 1024 columns), so x is read
// from memory once; per-tensor current scaling needs the global maximum first and
// reads it twice. Rows of groups run in parallel.
template <typename Sink>
QuantizedTensor quantize_pass(const torch::Tensor& xf, const QuantizeOptions& o, DelayedScaling* delayed, bool record,
                              Sink&& sink) {
  const int64_t rows = xf.size(0), cols = xf.size(1);
  const int64_t row_groups = groups(rows), col_groups = groups(cols);
  const int64_t row_grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(cols, 1));  // ~16K elements per task
  const float* in = xf.data_ptr<float>();
  QuantizedTensor q;
  q.mode = o.mode;
  q.format = o.format;
  auto scale_of = [&](float amax) { return std::isfinite(amax) ? scale_for(amax, o.format, o.power_of_two_scales) : 1.0f; };
  auto check_finite = [&](bool finite) {
    // amax is NaN or infinite exactly when x holds a NaN or infinity.
    if (auto* deferred = DeferredFiniteCheck::active()) return deferred->record(finite, nonfinite_site(o));
    BRIGADE_CHECK(finite, "non-finite value (NaN or Inf) in ", nonfinite_site(o));
  };
  std::atomic<bool> finite{true};
  switch (o.mode) {
    case ScalingMode::kTile1x128: {
      q.amax = torch::empty({rows, col_groups});
      q.scales = torch::empty({rows, col_groups});
      float* amax = q.amax.data_ptr<float>();
      float* scales = q.scales.data_ptr<float>();
      parallel_for(0, rows, row_grain, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
          float* a = amax + i * col_groups;
          float* s = scales + i * col_groups;
          group_abs_max(in + i * cols, cols, kScaleGroup, a);
          for (int64_t g = 0; g < col_groups; ++g) {
            if (!std::isfinite(a[g])) finite = false;
            s[g] = scale_of(a[g]);
          }
          sink(i, 0, cols, s, kScaleGroup);  // the row is still in cache
        }
      });
      break;
    }
    case ScalingMode::kBlock128x128:
    case ScalingMode::kTile128x1: {
      // 128x128: a block of 128 rows is read row by row for its maxima, then encoded
      // while it is still in the last-level cache (both passes stream). 128x1 needs
      // per-column maxima: 1024 columns at a time, which stay in L2.
      const bool blocks = o.mode == ScalingMode::kBlock128x128;
      const int64_t width = blocks ? std::max<int64_t>(cols, 1) : 8 * kScaleGroup;
      const int64_t scale_cols = blocks ? col_groups : cols;
      q.amax = torch::empty({row_groups, scale_cols});
      q.scales = torch::empty({row_groups, scale_cols});
      float* amax = q.amax.data_ptr<float>();
      float* scales = q.scales.data_ptr<float>();
      parallel_for(0, row_groups, 1, [&](int64_t b0, int64_t b1) {
        std::vector<float> column(blocks ? groups(width) : width);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t r = b * kScaleGroup, m = std::min(kScaleGroup, rows - r);
          for (int64_t c = 0; c < cols; c += width) {
            const int64_t n = std::min(width, cols - c);
            // This chunk's maxima and scales: 128x128 blocks, or single columns.
            float* a = amax + b * scale_cols + (blocks ? c / kScaleGroup : c);
            float* s = scales + b * scale_cols + (blocks ? c / kScaleGroup : c);
            const int64_t count = blocks ? groups(n) : n;
            if (blocks) {  // each row's 128-wide maxima (in registers), then their maximum over the rows
              std::fill(a, a + count, 0.0f);
              for (int64_t i = r; i < r + m; ++i) {
                group_abs_max(in + i * cols + c, n, kScaleGroup, column.data());
                for (int64_t g = 0; g < count; ++g) a[g] = std::max(a[g], column[g], by_bits);
              }
            } else {
              std::fill(column.begin(), column.end(), 0.0f);
              column_abs_max(in + r * cols + c, m, cols, n, column.data());
              std::copy(column.begin(), column.begin() + n, a);
            }
            for (int64_t g = 0; g < count; ++g) {
              if (!std::isfinite(a[g])) finite = false;
              s[g] = scale_of(a[g]);
            }
            for (int64_t i = r; i < r + m; ++i) sink(i, c, n, s, blocks ? kScaleGroup : 1);
          }
        }
      });
      break;
    }
    case ScalingMode::kPerTensorCurrent: {
      // Row maxima in parallel, then their maximum.
      std::vector<float> row_amax(rows, 0.0f);
      parallel_for(0, rows, row_grain, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) row_amax[i] = abs_max(in + i * cols, cols);
      });
      const float a = abs_max(row_amax.data(), rows);
      check_finite(std::isfinite(a));
      q.amax = torch::tensor(a);
      q.scales = torch::tensor(scale_of(a));
      const float* s = q.scales.data_ptr<float>();
      parallel_for(0, rows, row_grain, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) sink(i, 0, cols, s, std::max<int64_t>(cols, 1));
      });
      return q;
    }
    case ScalingMode::kPerTensorDelayed: {
      // The scale is known before the pass; this step's amax is gathered in it.
      q.scales = torch::tensor(delayed->scale(o.format, o.power_of_two_scales));
      const float* s = q.scales.data_ptr<float>();
      std::vector<float> row_amax(rows, 0.0f);
      parallel_for(0, rows, row_grain, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
          row_amax[i] = abs_max(in + i * cols, cols);
          sink(i, 0, cols, s, std::max<int64_t>(cols, 1));
        }
      });
      const float a = abs_max(row_amax.data(), rows);
      check_finite(std::isfinite(a));
      q.amax = torch::tensor(a);
      if (record) delayed->record(a);
      return q;
    }
  }
  check_finite(finite);
  return q;
}

}  // namespace

std::string nonfinite_site(const QuantizeOptions& o) {
  return detail::concat(o.name, " reached the FP8 quantizer (", to_string(o.mode), ")");
}

namespace {
std::atomic<DeferredFiniteCheck*> active_check{nullptr};
}  // namespace

DeferredFiniteCheck::DeferredFiniteCheck() {
  DeferredFiniteCheck* none = nullptr;
  BRIGADE_ASSERT(active_check.compare_exchange_strong(none, this), "a DeferredFiniteCheck is already active");
}

DeferredFiniteCheck::~DeferredFiniteCheck() { active_check.store(nullptr); }

DeferredFiniteCheck* DeferredFiniteCheck::active() { return active_check.load(); }

int DeferredFiniteCheck::site_id(const std::string& site) {
  auto [it, added] = ids_.try_emplace(site, static_cast<int>(sites_.size()) + 1);
  if (added) sites_.push_back(site);
  return it->second;
}

void DeferredFiniteCheck::record(const torch::Tensor& nonfinite, const std::string& site) {
  std::lock_guard<std::mutex> lock(mutex_);
  const int id = site_id(site);
  if (!first_.defined()) first_ = torch::zeros({}, nonfinite.options().dtype(torch::kInt));
  // Queued on the device: keeps the first site that saw a NaN or infinity.
  first_ = torch::where(first_.eq(0).logical_and(nonfinite.ne(0)), id, first_);
}

void DeferredFiniteCheck::record(bool finite, const std::string& site) {
  std::lock_guard<std::mutex> lock(mutex_);
  const int id = site_id(site);
  if (!finite && host_first_ == 0) host_first_ = id;
}

void DeferredFiniteCheck::check() {
  torch::Tensor flag = device_flag();
  check(flag.defined() ? flag.item<int>() : 0);
}

torch::Tensor DeferredFiniteCheck::device_flag() {
  std::lock_guard<std::mutex> lock(mutex_);
  return first_;
}

void DeferredFiniteCheck::check(int device_first) {
  std::lock_guard<std::mutex> lock(mutex_);
  const int first = host_first_ != 0 ? host_first_ : device_first;
  first_ = torch::Tensor();
  host_first_ = 0;
  BRIGADE_CHECK(first == 0, "non-finite value (NaN or Inf) in ", sites_.at(static_cast<size_t>(first - 1)));
}

QuantizedTensor quantize(const torch::Tensor& x, const QuantizeOptions& o, DelayedScaling* delayed, bool record) {
  QuantizedTensor q;
  quantize_into(x, o, q, delayed, record);
  return q;
}

void quantize_into(const torch::Tensor& x, const QuantizeOptions& o, QuantizedTensor& out, DelayedScaling* delayed,
                   bool record) {
  if (x.is_cuda()) {
    out = quantize_cuda(x, o, delayed, record);
    return;
  }
  check_input(x, o, delayed);
  auto xf = x.to(torch::kFloat).contiguous();
  const int64_t cols = xf.size(1);
  auto data = out.data;
  if (!data.defined() || data.sizes() != xf.sizes() || data.scalar_type() != torch::kByte || !data.is_contiguous()) {
    data = torch::empty(xf.sizes(), torch::TensorOptions().dtype(torch::kByte));
  }
  const float* in = xf.data_ptr<float>();
  uint8_t* codes = data.data_ptr<uint8_t>();
  out = quantize_pass(xf, o, delayed, record, [&](int64_t i, int64_t c, int64_t n, const float* s, int64_t every) {
    encode_row(in + i * cols + c, codes + i * cols + c, n, s, every, o.format);
  });
  out.data = data;
}

torch::Tensor fake_quantize(const torch::Tensor& x, const QuantizeOptions& o, DelayedScaling* delayed, bool record) {
  if (x.is_cuda()) return fake_quantize_cuda(x, o, delayed, record);
  check_input(x, o, delayed);
  auto xf = x.to(torch::kFloat).contiguous();
  const int64_t cols = xf.size(1);
  auto out = torch::empty(xf.sizes(), torch::TensorOptions().dtype(torch::kFloat));
  const float* in = xf.data_ptr<float>();
  float* values = out.data_ptr<float>();
  // Non-finite groups get scale 1 and are encoded before the check throws; the
  // result is discarded then, and x is never written.
  quantize_pass(xf, o, delayed, record, [&](int64_t i, int64_t c, int64_t n, const float* s, int64_t every) {
    fake_quantize_row(in + i * cols + c, values + i * cols + c, n, s, every, o.format);
  });
  return out;
}

}  // namespace brigade::precision
