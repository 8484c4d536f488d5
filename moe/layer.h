// A DeepSeekMoE layer (the "mlp" of a transformer block past first_k_dense):
//   y = shared_experts(x) + sum over the token's top_k experts of weight * expert(x)
// Router -> dispatch plan (sort by expert) -> experts over contiguous slices ->
// weighted combine. Training bookkeeping: the step's expert load (for the
// aux-loss-free bias update and metrics) and the optional auxiliary losses.
#pragma once

#include <cstdint>
#include <memory>

#include <torch/nn/module.h>

#include "moe/experts.h"
#include "moe/options.h"
#include "moe/permute.h"
#include "moe/router.h"
#include "moe/swiglu.h"
#include "parallel/communicator.h"

namespace brigade::moe {

// What one layer did over one optimizer step (all its micro-batches).
struct LayerStepStats {
  double max_load_ratio = 0.0;    // max over experts of routed copies / mean
  double dropped_fraction = 0.0;  // copies over capacity / copies (0 when dropless)
  double seq_aux_loss = 0.0;      // mean over micro-batches, coefficient applied (0 when off)
  double batch_aux_loss = 0.0;
  double z_loss = 0.0;
};

class MoELayerImpl : public torch::nn::Module {
 public:
  // dense_d_ff resolves expert_d_ff = 0 (see MoEOptions). Weights are uninitialised.
  MoELayerImpl(int64_t d_model, int64_t dense_d_ff, MoEOptions options);

  // x: [batch, seq, d_model] -> [batch, seq, d_model]. In training mode, records the
  // load and computes the enabled auxiliary losses (aux_loss()).
  torch::Tensor forward(const torch::Tensor& x);
  // Sum of the enabled auxiliary losses of the last training forward (coefficients
  // applied), to be added to the loss; undefined when none is enabled.
  torch::Tensor aux_loss() const { return aux_loss_; }
  // Closes an optimizer step: returns the step's statistics and, when `update_bias`
  // and bias_update_rate > 0, moves each expert's bias toward balance
  // (bias += rate * sign(mean_load - load)). Resets the step's counters. With a
  // data-parallel `group`, loads, drops and aux terms are first combined over its
  // ranks, so every rank sees the global statistics and keeps identical biases.
  LayerStepStats end_step(bool update_bias, parallel::Communicator* group = nullptr);
  // The two halves of end_step(), so a model reads all its layers' statistics in one
  // host read: step_stats() combines the step's counters over `group` and returns
  // float64 [5] on the layer's device, [max_load_ratio, dropped_fraction,
  // seq_aux_loss, batch_aux_loss, z_loss] (zeros when the layer ran no forward this
  // step); finish_step() then moves the biases (when `update_bias`, from the
  // combined load) and resets the counters.
  torch::Tensor step_stats(parallel::Communicator* group = nullptr);
  void finish_step(bool update_bias);
  static LayerStepStats stats_from(const torch::Tensor& host_row);

  // Expert parallelism over `ep` (null or a group of 1: off). Keeps this rank's
  // slice of the routed experts (rank j: experts [j*E/P, (j+1)*E/P); the weights
  // must already hold the full set, identical on every rank) and from then on sends
  // each token copy to the rank owning its expert (moe/expert_parallel.h), the
  // rows as FP8 codes when `fp8_dispatch`. Routing, loads, biases and aux losses
  // stay global and local to this rank's tokens. Call once, before an optimizer
  // captures the parameters; `ep` must outlive the layer. A collective: every rank
  // of `ep` runs forward and backward the same number of times.
  void set_expert_parallel(parallel::Communicator* ep, bool fp8_dispatch);
  parallel::Communicator* expert_parallel() const { return ep_; }

  const MoEOptions& options() const { return options_; }

  Router gate{nullptr};
  std::shared_ptr<ExpertsImpl> experts;
  SwiGLU shared_experts{nullptr};  // null when num_shared_experts == 0

 private:
  void record(const Routing& routing, const DispatchPlan& plan, int64_t batch, int64_t seq);

  MoEOptions options_;
  parallel::Communicator* ep_ = nullptr;  // the expert-parallel group; null: every expert is here
  bool fp8_dispatch_ = false;
  torch::Tensor aux_loss_;
  // Step accumulators (reset by end_step).
  torch::Tensor load_;       // [experts] int64 routed copies
  torch::Tensor step_load_;  // [experts] float32: load_ combined over the group (step_stats())
  torch::Tensor aux_sums_;   // [3] float32: seq aux, batch aux, z-loss (detached)
  int64_t micro_batches_ = 0;
  int64_t copies_ = 0;
  int64_t dropped_ = 0;
};
TORCH_MODULE(MoELayer);

}  // namespace brigade::moe
