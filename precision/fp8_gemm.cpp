#include "precision/fp8_gemm.h"

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "core/error.h"
#include "precision/fp8_cuda.h"

namespace brigade::precision {
namespace {

bool per_tensor(ScalingMode m) { return m == ScalingMode::kPerTensorCurrent || m == ScalingMode::kPerTensorDelayed; }
bool groups_along_k(ScalingMode m) { return m == ScalingMode::kTile1x128 || m == ScalingMode::kBlock128x128; }
int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

void* current_stream(const torch::Device& device) {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle();
}

// Codes as a contiguous [rows, k] buffer, zero-padded (FP8 zero is code 0 in both
// formats, so padding adds nothing to any dot product).
torch::Tensor padded_codes(const torch::Tensor& codes, int64_t rows, int64_t k) {
  if (codes.size(0) == rows && codes.size(1) == k) return codes.contiguous();
  auto out = torch::zeros({rows, k}, codes.options());
  out.narrow(0, 0, codes.size(0)).narrow(1, 0, codes.size(1)).copy_(codes);
  return out;
}

// q's scales in the layout cuBLASLt reads for `rows` (>= q's rows) operand rows
// (fp8_cuda.h). Scales written by the CUDA quantizer already have it: no copy.
torch::Tensor cublas_scales(const QuantizedTensor& q, int64_t rows, fp8_cuda::ScaleLayout* layout) {
  const auto& s = q.scales;
  const auto aligned = [](const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  if (per_tensor(q.mode)) {
    *layout = fp8_cuda::ScaleLayout::kScalar;
    return s.reshape({}).contiguous();
  }
  if (q.mode == ScalingMode::kTile1x128) {
    *layout = fp8_cuda::ScaleLayout::kVec128;
    auto t = s.t();  // [L, rows]
    if (t.size(1) != rows) {
      auto padded = torch::ones({t.size(0), rows}, t.options());
      padded.narrow(1, 0, t.size(1)).copy_(t);
      t = padded;
    }
    t = t.contiguous();
    return aligned(t) ? t : t.clone();
  }
  *layout = fp8_cuda::ScaleLayout::kBlock128x128;
  const int64_t l = s.size(1), l4 = round_up(l, 4);
  if (s.stride(1) == 1 && s.stride(0) == l4 && aligned(s)) return s;
  auto padded = torch::zeros({s.size(0), l4}, s.options());
  padded.narrow(1, 0, l).copy_(s);
  return padded;
}

fp8_cuda::Format to_launcher(Fp8Format f) {
  return f == Fp8Format::kE4M3 ? fp8_cuda::Format::kE4M3 : fp8_cuda::Format::kE5M2;
}

torch::Tensor gemm_cuda(const QuantizedTensor& a, const QuantizedTensor& b, torch::ScalarType out_dtype) {
  BRIGADE_CHECK(a.format == Fp8Format::kE4M3 || b.format == Fp8Format::kE4M3,
                "fp8_gemm: cuBLASLt has no E5M2 x E5M2 GEMM; quantize one operand as E4M3");
  BRIGADE_CHECK(b.data.device() == a.data.device() && a.scales.device() == a.data.device() &&
                    b.scales.device() == a.data.device(),
                "fp8_gemm: codes and scales must all be on ", a.data.device());
  BRIGADE_CHECK(a.scales.scalar_type() == torch::kFloat && b.scales.scalar_type() == torch::kFloat,
                "fp8_gemm: scales must be float32");
  c10::DeviceGuard device_guard(a.data.device());
  const int64_t m = a.data.size(0), n = b.data.size(0), k = a.data.size(1);
  const bool block_scaled = !per_tensor(a.mode);
  const auto gemm_dtype = out_dtype == torch::kBFloat16 ? torch::kBFloat16 : torch::kFloat;
  // cuBLASLt's FP8 rules (fp8_cuda.h): k % 16; D's leading dimension n 16-byte
  // aligned; m and n multiples of 4 with block scaling.
  const int64_t mp = block_scaled ? round_up(m, 4) : m;
  const int64_t np = round_up(n, gemm_dtype == torch::kBFloat16 ? 8 : 4);
  const int64_t kp = round_up(k, 16);
  const auto a_codes = padded_codes(a.data, mp, kp);
  const auto b_codes = padded_codes(b.data, np, kp);
  fp8_cuda::GemmArgs g;
  const auto a_scales = cublas_scales(a, mp, &g.a.scale_layout);
  const auto b_scales = cublas_scales(b, np, &g.b.scale_layout);
  auto d = torch::empty({mp, np}, a_codes.options().dtype(gemm_dtype));
  g.m = mp;
  g.n = np;
  g.k = kp;
  g.a.codes = a_codes.data_ptr<uint8_t>();
  g.a.format = to_launcher(a.format);
  g.a.scales = a_scales.data_ptr<float>();
  g.b.codes = b_codes.data_ptr<uint8_t>();
  g.b.format = to_launcher(b.format);
  g.b.scales = b_scales.data_ptr<float>();
  g.d = d.data_ptr();
  g.out_type = gemm_dtype == torch::kBFloat16 ? fp8_cuda::OutType::kBFloat16 : fp8_cuda::OutType::kFloat32;
  fp8_cuda::gemm(g, current_stream(d.device()));
  if (mp != m || np != n) d = d.narrow(0, 0, m).narrow(1, 0, n).contiguous();
  return d.to(out_dtype);
}

}  // namespace

torch::Tensor fp8_gemm(const QuantizedTensor& a, const QuantizedTensor& b, torch::ScalarType out_dtype) {
  BRIGADE_CHECK(a.data.dim() == 2 && b.data.dim() == 2 && a.data.size(1) == b.data.size(1),
                "fp8_gemm: expected A [M, K] and B [N, K], got ", a.data.sizes(), " and ", b.data.sizes());
  BRIGADE_CHECK(a.data.scalar_type() == torch::kByte && b.data.scalar_type() == torch::kByte,
                "fp8_gemm: expected uint8 FP8 codes");
  const bool both_per_tensor = per_tensor(a.mode) && per_tensor(b.mode);
  const bool both_along_k = groups_along_k(a.mode) && groups_along_k(b.mode) &&
                            !(a.mode == ScalingMode::kBlock128x128 && b.mode == ScalingMode::kBlock128x128);
  BRIGADE_CHECK(both_per_tensor || both_along_k, "fp8_gemm: unsupported scaling pair A ", to_string(a.mode), ", B ",
                to_string(b.mode),
                " (both per tensor, or 1x128 tiles / 128x128 blocks along K, not both blocks; transpose 128x1 operands)");
  if (a.data.is_cuda()) return gemm_cuda(a, b, out_dtype);
  BRIGADE_CHECK(b.data.device().is_cpu(), "fp8_gemm: A on ", a.data.device(), ", B on ", b.data.device());
  return torch::mm(a.dequantize(), b.dequantize().t()).to(out_dtype);
}

QuantizedTensor transposed(const QuantizedTensor& q) {
  QuantizedTensor t;
  t.data = q.data.t().contiguous();
  t.scales = q.scales.dim() == 2 ? q.scales.t() : q.scales;
  t.amax = q.amax.defined() && q.amax.dim() == 2 ? q.amax.t() : q.amax;
  t.format = q.format;
  t.mode = q.mode == ScalingMode::kTile1x128   ? ScalingMode::kTile128x1
           : q.mode == ScalingMode::kTile128x1 ? ScalingMode::kTile1x128
                                               : q.mode;
  return t;
}

}  // namespace brigade::precision
