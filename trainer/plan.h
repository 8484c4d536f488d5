// `brigade plan`: what a recipe costs before it runs. Parameters (total and
// activated per token), training FLOPs per token, memory per GPU for the recipe's
// layout (data parallel over every GPU, expert parallelism, ZeRO-1, precision,
// micro batch, sequence length, activation checkpointing), whether it fits, and
// GPU-hours for a token budget at a stated MFU. Computed from the options alone
// (model::count_parameters), so a 671B recipe is planned on a laptop.
//
// The memory model, per GPU (bytes; P = the parameters the GPU holds: the dense
// ones plus 1/EP of the routed experts):
//   weights      4 P           FP32 master weights (autocast casts them per GEMM)
//   gradients    4 P           FP32, on the master weights
//   optimizer    2 s P / Z     AdamW's two moments of s bytes (optimizer_state_dtype);
//                              ZeRO splits the dense parameters' over Z = all GPUs;
//                              each EP rank keeps its own experts' whole
//   activations  what backward keeps for one micro batch (below)
//   all-to-all   EP > 1: one MoE layer's dispatch and combine buffers, sent and
//                received (tokens x top_k x d_model, E4M3 with ep_fp8_dispatch)
// Activations per block (b sequences of s tokens, c bytes per compute element): the
// inputs of every GEMM and the elementwise intermediates between them, c bytes
// each, plus the FP32 residual stream (MoE: per routed copy of each token); the
// logits and their gradient in FP32. Activation checkpointing `full` keeps each
// block's input only, plus one block's activations while it is recomputed;
// `selective` is counted as `none` (the attention core it recomputes keeps O(s) per
// head with a fused kernel). Not modelled: the CUDA context and allocator slack,
// FP8 copies of weights, temporary buffers inside a GEMM.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/recompute.h"
#include "model/transformer.h"
#include "parallel/options.h"
#include "precision/precision.h"
#include "trainer/options.h"

namespace brigade::trainer {

// The blocks of each pipeline stage (parallel.pipeline_parallel, parallel.pp_layers)
// as parallel::stage_boundaries gives them, from the options alone: each block's
// parameters, the embedding on stage 0, and the final norm, the head (or the tied
// embedding's copy) and the MTP modules on the last. The trainer splits a model
// with this, so `brigade plan` sizes the stages the trainer builds. With
// interleaved_1f1b the boundaries are the P x V chunks' (chunk c on rank c mod P).
std::vector<int64_t> pipeline_boundaries(const model::TransformerOptions& o, const parallel::ParallelOptions& p);

struct GpuSpec {
  std::string name;
  double memory_bytes = 0;  // usable memory per GPU
  double bf16_flops = 0;    // dense BF16 peak, FLOP/s
  double fp8_flops = 0;     // dense FP8 peak, FLOP/s
};
// h100 (SXM, 80 GB), h200 (141 GB), h800 (80 GB; H100 compute, less NVLink);
// anything else is an Error listing them.
GpuSpec gpu_spec(const std::string& name);

struct PlanOptions {
  int64_t gpus = 1;
  std::string gpu = "h100";
  double tokens = 0;   // training tokens; 0: the recipe's (max_steps x global batch)
  double mfu = 0.4;    // model FLOPs utilisation assumed for the GPU-hours (of the BF16 peak)
  void validate() const;
};

struct PlanInputs {
  const model::TransformerOptions& model;
  const precision::PrecisionOptions& precision;
  const parallel::ParallelOptions& parallel;
  const TrainerOptions& trainer;
  int64_t seq_len = 0;  // data.seq_len
};

struct MemoryItem {
  std::string what;
  double bytes = 0;
};

struct TrainingPlan {
  model::ParameterCount params;        // the whole model, MTP modules included
  model::ParameterCount main_params;   // without the MTP modules (what the papers quote)
  double flops_per_token = 0;          // training (forward + backward), model::ParameterCount convention
  double params_per_gpu = 0;           // dense + routed / EP
  std::vector<MemoryItem> memory;      // per GPU, in the order above
  double memory_total() const;
  GpuSpec gpu;
  bool fits() const { return memory_total() <= gpu.memory_bytes; }
  double tokens = 0;
  double global_batch_tokens = 0;      // per optimizer step
  double gpu_hours = 0;                // tokens x flops_per_token / (BF16 peak x MFU) / 3600
  double wall_hours = 0;               // gpu_hours / gpus
};

// Checks the layout (gpus divisible by parallel.expert_parallel, experts by it).
TrainingPlan plan_training(const PlanInputs& in, const PlanOptions& options);

// The plan as the text `brigade plan` prints.
std::string format_plan(const TrainingPlan& plan, const PlanInputs& in, const PlanOptions& options);

}  // namespace brigade::trainer
