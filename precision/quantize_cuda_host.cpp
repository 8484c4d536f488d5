#include "precision/quantize_cuda_host.h"

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "core/error.h"
#include "precision/fp8_cuda.h"

namespace brigade::precision {
namespace {

int64_t groups(int64_t n) { return (n + kScaleGroup - 1) / kScaleGroup; }

// torch's current stream on `device`, as the cudaStream_t the launchers take.
// Through c10's device-agnostic interface, so this file needs no CUDA headers.
void* current_stream(const torch::Device& device) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
}

fp8_cuda::Format to_launcher(Fp8Format f) {
  return f == Fp8Format::kE4M3 ? fp8_cuda::Format::kE4M3 : fp8_cuda::Format::kE5M2;
}

fp8_cuda::Grouping to_launcher(ScalingMode mode) {
  switch (mode) {
    case ScalingMode::kPerTensorCurrent:
    case ScalingMode::kPerTensorDelayed: return fp8_cuda::Grouping::kTensor;
    case ScalingMode::kTile1x128: return fp8_cuda::Grouping::kTile1x128;
    case ScalingMode::kTile128x1: return fp8_cuda::Grouping::kTile128x1;
    case ScalingMode::kBlock128x128: return fp8_cuda::Grouping::kBlock128x128;
  }
  BRIGADE_FAIL("unreachable scaling mode");
}

fp8_cuda::Strides2 strides_of(const torch::Tensor& t) {
  if (t.dim() == 0) return {};
  return {t.stride(0), t.stride(1)};
}

// Runs the quantizer, writing codes (want_codes) or dequantized float32 values.
struct Result {
  QuantizedTensor q;
  torch::Tensor values;  // fake quantization only
};

Result run(const torch::Tensor& x, const QuantizeOptions& o, DelayedScaling* delayed, bool record, bool want_codes) {
  BRIGADE_CHECK(x.dim() == 2, "quantize ", o.name, ": expected a 2-D tensor, got ", x.sizes());
  BRIGADE_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, "quantize ", o.name,
                ": expected float32 or bfloat16, got ", x.scalar_type());
  BRIGADE_CHECK(o.mode != ScalingMode::kPerTensorDelayed || delayed != nullptr, "quantize ", o.name,
                ": delayed scaling needs its amax history");
  BRIGADE_ASSERT(x.is_cuda(), "quantize_cuda on ", x.device());
  c10::DeviceGuard device_guard(x.device());
  const auto xc = x.contiguous();
  const int64_t rows = xc.size(0), cols = xc.size(1);
  const auto f32 = xc.options().dtype(torch::kFloat);

  Result r;
  r.q.mode = o.mode;
  r.q.format = o.format;
  fp8_cuda::QuantizeArgs a;
  switch (o.mode) {
    case ScalingMode::kPerTensorCurrent:
    case ScalingMode::kPerTensorDelayed:
      // An empty tensor launches nothing: scale 1, amax 0, as for an all-zero one.
      r.q.scales = torch::ones({}, f32);
      r.q.amax = torch::zeros({}, f32);  // the kernels' atomicMax target
      break;
    case ScalingMode::kTile1x128:
      r.q.scales = torch::ones({groups(cols), rows}, f32).t();
      r.q.amax = torch::zeros({rows, groups(cols)}, f32);
      break;
    case ScalingMode::kTile128x1:
      r.q.scales = torch::ones({groups(rows), cols}, f32);
      r.q.amax = torch::zeros({groups(rows), cols}, f32);
      break;
    case ScalingMode::kBlock128x128: {
      const int64_t l = groups(cols);
      r.q.scales = torch::zeros({groups(rows), (l + 3) / 4 * 4}, f32).narrow(1, 0, l);
      r.q.amax = torch::zeros({groups(rows), l}, f32);
      break;
    }
  }
  auto nonfinite = torch::zeros({}, xc.options().dtype(torch::kInt));
  a.x = xc.data_ptr();
  a.x_type = xc.scalar_type() == torch::kFloat ? fp8_cuda::InputType::kFloat32 : fp8_cuda::InputType::kBFloat16;
  a.rows = rows;
  a.cols = cols;
  a.format = to_launcher(o.format);
  a.grouping = to_launcher(o.mode);
  a.power_of_two_scales = o.power_of_two_scales;
  if (o.mode == ScalingMode::kPerTensorDelayed) {
    a.scale_given = true;
    a.given_scale = delayed->scale(o.format, o.power_of_two_scales);
  }
  if (want_codes) {
    r.q.data = torch::empty({rows, cols}, xc.options().dtype(torch::kByte));
    a.codes = r.q.data.data_ptr<uint8_t>();
  } else {
    r.values = torch::empty({rows, cols}, f32);
    a.dequantized = r.values.data_ptr<float>();
  }
  a.scales = r.q.scales.data_ptr<float>();
  a.scale_strides = strides_of(r.q.scales);
  a.amax = r.q.amax.data_ptr<float>();
  a.amax_strides = strides_of(r.q.amax);
  a.nonfinite = nonfinite.data_ptr<int>();
  fp8_cuda::quantize(a, current_stream(xc.device()));

  if (auto* deferred = DeferredFiniteCheck::active()) {
    deferred->record(nonfinite, nonfinite_site(o));  // read once, by the step
  } else {
    BRIGADE_CHECK(nonfinite.item<int>() == 0, "non-finite value (NaN or Inf) in ", nonfinite_site(o));
  }
  if (o.mode == ScalingMode::kPerTensorDelayed && record) delayed->record(r.q.amax.item<float>());
  return r;
}

}  // namespace

QuantizedTensor quantize_cuda(const torch::Tensor& x, const QuantizeOptions& o, DelayedScaling* delayed,
                              bool record) {
  return run(x, o, delayed, record, true).q;
}

torch::Tensor fake_quantize_cuda(const torch::Tensor& x, const QuantizeOptions& o, DelayedScaling* delayed,
                                 bool record) {
  return run(x, o, delayed, record, false).values;
}

torch::Tensor dequantize_cuda(const QuantizedTensor& q) {
  BRIGADE_CHECK(q.data.is_cuda() && q.data.dim() == 2 && q.data.scalar_type() == torch::kByte,
                "dequantize_cuda: expected 2-D uint8 codes on a CUDA device, got ", q.data.scalar_type(), " ",
                q.data.sizes(), " on ", q.data.device());
  BRIGADE_CHECK(q.scales.device() == q.data.device() && q.scales.scalar_type() == torch::kFloat,
                "dequantize_cuda: scales must be float32 on ", q.data.device());
  c10::DeviceGuard device_guard(q.data.device());
  const auto codes = q.data.contiguous();
  auto out = torch::empty(codes.sizes(), codes.options().dtype(torch::kFloat));
  fp8_cuda::DequantizeArgs a;
  a.codes = codes.data_ptr<uint8_t>();
  a.rows = codes.size(0);
  a.cols = codes.size(1);
  a.format = to_launcher(q.format);
  a.grouping = to_launcher(q.mode);
  a.scales = q.scales.data_ptr<float>();
  a.scale_strides = strides_of(q.scales);
  a.out = out.data_ptr<float>();
  fp8_cuda::dequantize(a, current_stream(codes.device()));
  return out;
}

}  // namespace brigade::precision
