// FP8 quantization with scaling (Transformer Engine's "precision is data"): a
// ScalingMode says how scales are grouped, a QuantizedTensor bundles the codes,
// the scales, the amax they came from and the mode, and quantize() is the one
// entry point that switches on the mode.
//
// Convention (DeepSeek-V3, cuBLASLt block scaling): a group with absolute maximum
// amax gets scale s = amax / format max (1 when amax is 0); codes hold x / s, so
// dequantized values are decode(code) * s. Modes:
//   per-tensor current  one scale from this tensor's amax
//   per-tensor delayed  one scale from an amax history of earlier steps (DelayedScaling)
//   tile 1x128          one scale per row and 128 consecutive columns (activations, forward)
//   tile 128x1          one scale per column and 128 consecutive rows (activations, backward)
//   block 128x128       one scale per 128x128 block (weights)
// Shapes that 128 does not divide get a partial last group (as if zero-padded).
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <torch/types.h>

#include "precision/fp8.h"

namespace brigade::precision {

enum class ScalingMode { kPerTensorCurrent, kPerTensorDelayed, kTile1x128, kTile128x1, kBlock128x128 };
std::string to_string(ScalingMode mode);

inline constexpr int64_t kScaleGroup = 128;

struct QuantizedTensor {
  torch::Tensor data;    // uint8 codes, the source's 2-D shape [rows, cols]
  torch::Tensor scales;  // float32 dequantization scales: [] per tensor; [rows, ceil(cols/128)] 1x128;
                         // [ceil(rows/128), cols] 128x1; [ceil(rows/128), ceil(cols/128)] 128x128
  torch::Tensor amax;    // float32, the shape of scales: this tensor's group maxima
  ScalingMode mode = ScalingMode::kPerTensorCurrent;
  Fp8Format format = Fp8Format::kE4M3;

  // float32 [rows, cols]: decode(data) * scale of each element's group.
  torch::Tensor dequantize() const;
};

struct QuantizeOptions {
  Fp8Format format = Fp8Format::kE4M3;
  ScalingMode mode = ScalingMode::kPerTensorCurrent;
  bool power_of_two_scales = false;  // round each scale up to a power of two (exact rescaling)
  std::string name = "tensor";       // names the tensor in errors
};

// Per-tensor delayed scaling: the scale for this step comes from the amax of the
// last `history` steps (their maximum, or the most recent), with 2^margin headroom.
class DelayedScaling {
 public:
  enum class Algorithm { kMax, kMostRecent };
  DelayedScaling(int64_t history, double margin, Algorithm algorithm);

  // The dequantization scale to use now (1 before any amax was recorded).
  float scale(Fp8Format format, bool power_of_two) const;
  // Records this step's amax.
  void record(float amax);

  const torch::Tensor& history() const { return history_; }  // [history] float32, newest at position()
  int64_t position() const { return position_; }
  int64_t recorded() const { return recorded_; }
  // Checkpoint state: history, position, count; restore() checks the length.
  void restore(const torch::Tensor& history, int64_t position, int64_t recorded);

 private:
  torch::Tensor history_;
  int64_t position_ = -1;
  int64_t recorded_ = 0;
  double margin_;
  Algorithm algorithm_;
};

// The scale for one group's amax under the options (s = amax / max, 1 for amax 0,
// optionally rounded up to a power of two).
float scale_for(float amax, Fp8Format format, bool power_of_two);
// "NAME reached the FP8 quantizer (MODE)": what an Error about a NaN or infinity names.
std::string nonfinite_site(const QuantizeOptions& options);

// x: 2-D float32 or bfloat16 (CPU, or CUDA through quantize_cuda_host.h). A NaN or
// infinity in x is an Error naming options.name (never saturated into a finite
// number), raised here or, under a DeferredFiniteCheck, by its check(). kPerTensorDelayed needs
// `delayed` (its current scale is used, then this tensor's amax is recorded unless
// `record` is false: evaluation must not move the training state).
QuantizedTensor quantize(const torch::Tensor& x, const QuantizeOptions& options, DelayedScaling* delayed = nullptr,
                         bool record = true);

// quantize() into `out`, reusing its code buffer when it already has x's shape (a
// training step quantizing same-shaped operands every step allocates nothing).
void quantize_into(const torch::Tensor& x, const QuantizeOptions& options, QuantizedTensor& out,
                   DelayedScaling* delayed = nullptr, bool record = true);

// quantize(...).dequantize() in one pass, without materialising the codes: the
// FP8 operands of the CPU emulation. Same checks, same history bookkeeping.
torch::Tensor fake_quantize(const torch::Tensor& x, const QuantizeOptions& options, DelayedScaling* delayed = nullptr,
                            bool record = true);

// While one is alive, quantize() and fake_quantize() do not stop at a NaN or
// infinity: each call records, on its input's device and without waiting for the
// device, whether it saw one, and the first such tensor is kept. check() then
// raises the Error the first such call would have raised, with one host read for
// all of them (a training step holds one over its forward and backward passes,
// instead of one blocking read per quantize call on a GPU). One at a time per
// process; calls from autograd's backward threads are recorded too.
class DeferredFiniteCheck {
 public:
  DeferredFiniteCheck();
  ~DeferredFiniteCheck();
  DeferredFiniteCheck(const DeferredFiniteCheck&) = delete;
  DeferredFiniteCheck& operator=(const DeferredFiniteCheck&) = delete;
  // The one read: an Error naming the first tensor that held a NaN or infinity.
  void check();
  // For a caller that folds the flag into a host read of its own: the flag (int32 []
  // on the device, undefined when no device call recorded one), then check() with
  // its value as read.
  torch::Tensor device_flag();
  void check(int device_flag_value);
  static DeferredFiniteCheck* active();
  // `nonfinite`: an int tensor (any device), non-zero when the call saw one.
  void record(const torch::Tensor& nonfinite, const std::string& site);
  void record(bool finite, const std::string& site);  // a call that knows on the host

 private:
  int site_id(const std::string& site);
  std::mutex mutex_;
  torch::Tensor first_;  // int32 scalar on the device: 0, or 1 + index into sites_
  int host_first_ = 0;   // the same for host-side checks
  std::vector<std::string> sites_;
  std::unordered_map<std::string, int> ids_;
};

}  // namespace brigade::precision
