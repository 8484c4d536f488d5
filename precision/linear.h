// Linear layers whose GEMMs can run in FP8 (DESIGN.md: model/ takes its Linear
// layers from precision/). Without FP8 a Linear is torch's linear (autocast
// applies). With FP8 on for its module kind, forward (Fprop), input gradient
// (Dgrad) and weight gradient (Wgrad) each quantize their two operands as the
// recipe says and multiply with FP32 accumulation; master weights stay FP32.
//
// On the CPU the FP8 GEMMs are emulated: operands are quantized, dequantized and
// multiplied in FP32, which gives the same values an FP8 tensor-core GEMM with
// FP32 accumulation computes, up to summation order. On CUDA the Linear's GEMMs
// are cuBLASLt FP8 GEMMs on the quantized codes (fp8_gemm.h); qdq() (the MoE
// experts' operands) fake-quantizes on the GPU and the product runs in FP32 there.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>

#include "precision/fp8_recipe.h"

namespace brigade::precision {

// The scaling state of one FP8 GEMM site (a Linear, or a layer's experts): the
// recipe and, under delayed scaling, one amax history per operand slot.
class Fp8GemmState {
 public:
  Fp8GemmState(Fp8Options options, std::string name);
  // Fake-quantizes x ([rows, cols]) as `operand` of `pass`: float32 values on the
  // FP8 grid. `slot` names the amax history under delayed scaling.
  torch::Tensor qdq(const torch::Tensor& x, GemmOperand operand, GemmPass pass, const std::string& slot);
  // Quantizes x the same way, keeping the FP8 codes: the operands of a real FP8 GEMM.
  QuantizedTensor quantize(const torch::Tensor& x, GemmOperand operand, GemmPass pass, const std::string& slot);
  // The same for a buffer of expert rows ([rows, cols], expert e owning counts[e]
  // consecutive rows) or stacked expert weights ([experts, rows, cols], counts
  // empty): scale groups never straddle two experts.
  torch::Tensor qdq_grouped(const torch::Tensor& x, const std::vector<int64_t>& counts, GemmOperand operand,
                            GemmPass pass, const std::string& slot);
  const Fp8Options& options() const { return options_; }
  const std::string& name() const { return name_; }
  // Whether forward passes record amax (training) or only read the histories
  // (evaluation, generation). Backward passes always record.
  void set_recording(bool on) { recording_ = on; }

  // Delayed-scaling histories for checkpoints: "<slot>.amax_history" [history] and
  // "<slot>.amax_position" [2] (position, count), in slot order.
  std::vector<std::pair<std::string, torch::Tensor>> state() const;
  void load_state(const std::map<std::string, torch::Tensor>& tensors, const std::string& prefix,
                  const std::string& source);

 private:
  DelayedScaling* history(const std::string& slot);
  Fp8Options options_;
  std::string name_;
  std::map<std::string, std::unique_ptr<DelayedScaling>> histories_;
  bool recording_ = true;
  bool in_backward_ = false;
  friend class Fp8BackwardScope;
};

// Marks a backward pass: the histories record there whatever set_recording says.
class Fp8BackwardScope {
 public:
  explicit Fp8BackwardScope(Fp8GemmState& s) : state_(s) { state_.in_backward_ = true; }
  ~Fp8BackwardScope() { state_.in_backward_ = false; }

 private:
  Fp8GemmState& state_;
};

// y = x W^T (+ b) with FP8 GEMMs in all three passes. x: [..., in]; weight: [out, in].
torch::Tensor fp8_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                         Fp8GemmState& state);

// Zero-bubble pipeline schedules (DualPipe-V's W steps) split a backward in two:
// the input gradients now, which the previous stage waits for, and the Linear
// layers' weight gradients later, in time the stage would otherwise idle. Linears
// given a queue (LinearImpl::set_weight_grad_queue) compute their GEMM in a small
// autograd graph of their own, so either part is torch's own backward of it (the
// same bits as an unsplit backward); during a backward run while deferring(), the
// weight part waits in the queue. FP8 Linears keep their three passes together.
class WeightGradQueue {
 public:
  // Whether Linears' backwards leave their weight gradients here (set around a
  // split backward).
  void set_deferring(bool on) { deferring_ = on; }
  bool deferring() const { return deferring_; }
  // From a Linear's backward: `compute` writes (accumulates) the .grad of `weights`
  // (each weight listed once per entry however often it was used).
  void defer(std::function<void()> compute, std::vector<torch::Tensor> weights);
  // After a split backward: what it left becomes one entry, the newest. Returns the
  // weights that entry will write.
  std::vector<torch::Tensor> close_entry();
  // Runs the oldest entry (a W step); returns the weights it wrote.
  std::vector<torch::Tensor> run_oldest();
  size_t entries() const { return entries_.size(); }

 private:
  struct Entry {
    std::vector<std::function<void()>> work;
    std::vector<torch::Tensor> weights;
  };
  bool deferring_ = false;
  Entry open_;
  std::deque<Entry> entries_;
};

class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in_features, int64_t out_features, bool bias);
  torch::Tensor forward(const torch::Tensor& x);  // [..., in] -> [..., out]
  // Split backwards (WeightGradQueue); null: torch's linear.
  void set_weight_grad_queue(std::shared_ptr<WeightGradQueue> queue) { queue_ = std::move(queue); }
  // Runs this layer's GEMMs in FP8 under `options` (no-op when FP8 is off);
  // `name` names it in errors and checkpoints.
  void enable_fp8(const Fp8Options& options, const std::string& name);
  Fp8GemmState* fp8() { return fp8_.get(); }

  torch::Tensor weight;  // [out, in]
  torch::Tensor bias;    // [out], undefined without bias

 private:
  std::unique_ptr<Fp8GemmState> fp8_;
  std::shared_ptr<WeightGradQueue> queue_;
};
TORCH_MODULE(Linear);

}  // namespace brigade::precision
