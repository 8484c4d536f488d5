// The training loop. Trainer::step() is one optimizer step and reads top to bottom;
// logging, progress, evaluation and checkpointing hang off hooks (TrainerHook).
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <future>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "core/device.h"
#include "data/sampler.h"
#include "model/transformer.h"
#include "parallel/communicator.h"
#include "parallel/pipeline.h"
#include "parallel/reducer.h"
#include "parallel/state.h"
#include "precision/precision.h"
#include "trainer/checkpoint.h"
#include "trainer/metrics.h"
#include "trainer/objective.h"
#include "trainer/optimizer.h"
#include "trainer/options.h"
#include "trainer/schedule.h"

namespace brigade::trainer {

// What the trainer needs to know about the run beyond its options.
struct RunContext {
  std::filesystem::path run_dir;
  std::string recipe_yaml;        // effective recipe, stored with every checkpoint
  std::string recipe_hash;
  std::string model_fingerprint;  // must match when resuming
  // The data-parallel group (not owned; null or size 1: this process alone). Each
  // rank trains on its own slice of the global batch; gradients are summed over
  // the group in buckets of `bucket_bytes` during backward.
  parallel::Communicator* data_parallel = nullptr;
  // Where the model, the optimizer state and the batches live (with a data-parallel
  // group: its device, a rank's GPU for NCCL).
  c10::Device device{c10::kCPU};
  int64_t bucket_bytes = 25 << 20;
  // parallel.zero_stage (parallel/state.h): 1 the AdamW state is sharded over the
  // data-parallel group (each rank updates the parameter elements it owns and
  // all-gathers the rest); 2 the gradients too; 3 the blocks' parameters too.
  int64_t zero_stage = 0;
  // Pipeline parallelism (parallel/pipeline.h): stages of consecutive ranks of
  // `data_parallel`, which is then the whole world; the data-parallel groups are the
  // ranks at the same stage of every pipeline. trainer.grad_accum_steps micro-batches
  // flow through each pipeline per step.
  int64_t pipeline_parallel = 1;
  parallel::PipelineSchedule pp_schedule = parallel::PipelineSchedule::k1F1B;
  std::vector<int64_t> pp_layers;  // parallel.pp_layers: blocks per stage or chunk (empty: balanced by parameters)
  int64_t pp_virtual_stages = 0;   // parallel.pp_virtual_stages (interleaved_1f1b's chunks per rank; 0: 2)
  bool pp_zero_bubble = true;      // parallel.pp_zero_bubble (dualpipev's W steps, at ZeRO 0 and 1)
  // Expert parallelism: ranks per expert-parallel group (1: off). Groups are
  // consecutive ranks of `data_parallel`; each holds num_experts / expert_parallel
  // routed experts, and tokens travel to them by all-to-all (FP8 when ep_fp8_dispatch).
  int64_t expert_parallel = 1;
  bool ep_fp8_dispatch = false;
  // `brigade plan`'s memory per rank for this recipe and layout (trainer/plan.h), to
  // set beside the measured peak in memory.json; 0: not planned.
  double planned_memory_bytes = 0;
  // A second objective mixed with the cross-entropy (trainer/objective.h), e.g. logit
  // distillation; null: cross-entropy only.
  std::shared_ptr<const LogitObjective> objective;
};

struct StepResult {
  int64_t step = 0;          // steps completed after this one
  double loss = 0.0;         // mean over the step's trained tokens (with an objective: the mixed loss)
  double objective = 0.0;    // with an objective: its per-token mean, unweighted
  double mtp_loss = 0.0;     // with model.mtp.depth > 0: the MTP modules' mean cross-entropy, unweighted
  double lr = 0.0;
  double grad_norm = 0.0;    // before clipping
  int64_t tokens = 0;        // input tokens processed in this step (all data-parallel ranks)
  double seconds = 0.0;
  bool skipped = false;      // non-finite values, step not applied (on_nonfinite: skip)
  bool stop_requested = false;  // some rank asked to stop (Trainer::set_stop_request) before this step's read
  std::vector<moe::LayerStepStats> moe;  // per MoE layer: load balance, drops, aux terms
  parallel::ReduceStats reduce;          // data parallel: buckets, overlap, wait time
  int64_t pipeline_in_flight = 0;        // pipeline: most micro-batches whose activations this stage held at once
  double pipeline_wait_seconds = 0.0;    // pipeline: time this stage waited for its neighbours (the bubble)
  int64_t pipeline_weight_steps = 0;     // dualpipev: the W steps (deferred weight gradients) this stage ran
};

struct EvalResult {
  int64_t step = 0;
  double loss = 0.0;
  double perplexity = 0.0;
};

// The one line a run stops with when a step runs out of memory: the step, the
// device, what the allocator reported first, the GPU's peak and total memory, and
// the recipe keys that cut memory.
std::string out_of_memory_message(int64_t step, c10::Device device, const GpuMemory& memory,
                                  const std::string& allocator_message);

class Trainer;

class TrainerHook {
 public:
  virtual ~TrainerHook() = default;
  virtual void on_start(Trainer&) {}
  virtual void on_step(Trainer&, const StepResult&) {}
  virtual void on_end(Trainer&) {}
};

class Trainer {
 public:
  Trainer(TrainerOptions options, precision::PrecisionOptions precision, model::Transformer model,
          data::BatchSampler train_data, data::BatchSampler eval_data, RunContext context);
  ~Trainer();

  // Restores weights, optimizer, RNG and step from a checkpoint of the same model.
  void resume(const LoadedCheckpoint& checkpoint);

  // Runs steps until trainer.max_steps (or trainer.stop_after), calling the hooks;
  // or until a stop is requested (set_stop_request): then the ranks agree at the next
  // step boundary, write a checkpoint and return with stopped_by_request() true.
  // With ZeRO-3 the model's parameters are whole again when it returns (collective).
  void run();
  // `requested` is asked once per step on every rank (a signal handler's flag, say);
  // the step's one all-reduce carries the answers, so every rank stops after the same
  // step when any rank asks. Null: never.
  void set_stop_request(std::function<bool()> requested) { stop_request_ = std::move(requested); }
  bool stopped_by_request() const { return stopped_by_request_; }
  // One optimizer step: micro-batches, forward, backward, clip, schedule, update.
  // Running out of memory ends it with an Error of one line (out_of_memory_message).
  StepResult step();
  // Mean loss over trainer.eval_batches fixed held-out batches (collective in a
  // multi-rank run: the ranks share the batches and all get the result).
  EvalResult evaluate();
  // Writes a checkpoint of the current state (atomically). In a multi-rank run every
  // rank calls it at the same step (sharded state is written by every rank);
  // rank 0 writes the rest and returns the step directory, the others an empty path.
  std::filesystem::path save_checkpoint();

  void add_hook(std::unique_ptr<TrainerHook> hook) { hooks_.push_back(std::move(hook)); }
  // Adds the standard hooks: metrics.jsonl + progress display, periodic eval, periodic checkpoints.
  void add_default_hooks();

  int64_t current_step() const { return state_.step; }
  const TrainerState& state() const { return state_; }
  const TrainerOptions& options() const { return options_; }
  const RunContext& context() const { return context_; }
  model::Transformer& model() { return model_; }
  MetricsLog& metrics();
  CheckpointStore& checkpoints() { return checkpoints_; }
  const parallel::ParallelState& parallel_state() const { return *parallel_; }
  bool finished() const;

 private:
  // Forward in the compute dtype: logits [rows, seq_len, vocab].
  torch::Tensor forward(const data::Batch& batch);
  // Cross-entropy summed over the batch's trained targets.
  torch::Tensor token_loss_sum(const torch::Tensor& logits, const data::Batch& batch) const;
  // This rank's shares of the step's per-token means (sums over the trained targets
  // of all of the step's micro-batches on all ranks): `loss` is what is minimised (CE,
  // or (1 - w) * CE + w * objective), `objective` the objective's own share, unweighted.
  // Backward of this rank's share of the micro-batch's loss (`step_tokens`: a float64
  // scalar on the device); returns the shares as float64 scalars on the device (undefined
  // when the slice trains nothing), so nothing is read back per micro-batch. MoE
  // auxiliary losses join the gradient only.
  struct LossTensors {
    torch::Tensor loss, objective, mtp;
  };
  torch::Tensor mtp_loss(const data::Batch& batch, const torch::Tensor& denominator);
  StepResult run_step();
  LossTensors forward_backward(const data::Batch& batch, const torch::Tensor& step_tokens);
  // This rank's micro-batches of the step, on the device. On a GPU the next step's are
  // sampled into pinned host memory on a helper thread while this one computes.
  std::vector<data::Batch> step_batches();
  // The step's trained targets over all its micro-batches and ranks, as the float32
  // scalar the loss sums are divided by (on the device: no rank waits for it);
  // adds the step's input tokens (all ranks) to `tokens`.
  torch::Tensor step_denominator(const std::vector<data::Batch>& batches, int64_t& tokens);
  int dp_size() const { return parallel_->size(); }
  // World rank 0 speaks for the job (with pipelines, every stage has a data-parallel rank 0).
  bool is_main_rank() const { return context_.data_parallel == nullptr || context_.data_parallel->rank() == 0; }
  bool sharded() const { return parallel_->sharded(); }
  // Every rank runs every forward (expert parallelism's all-to-alls, ZeRO-3's gathers).
  bool lockstep_forward() const {
    return parallel_->expert_group() || parallel_->sharded_parameters() || pipeline_ != nullptr;
  }
  void clip_gradients(double grad_norm);
  trainer::OptimizerShards optimizer_layout() const;  // ZeRO-1 checkpoints
  void handle_nonfinite(const std::string& what, double value);
  // Rank 0 writes every rank's peak resident memory (and CUDA peak) to run_dir/memory.json.
  void record_peak_memory();
  // On CPUs, samples the bytes malloc holds for live allocations at the points of a
  // step where most is alive: after each forward (activations) and each backward
  // (gradients), and after the update (optimizer state). Their maximum goes to
  // memory.json beside the peak RSS, which also counts freed memory glibc kept.
  void note_memory();
  int64_t peak_live_bytes_ = 0;
  // CPU: the live heap before training, without the model's tensors (the corpora,
  // KD targets, tokenizer and LibTorch's own): subtracted from the peak, what is
  // left is what training holds, the quantity `brigade plan` predicts.
  int64_t baseline_live_bytes_ = 0;
  int world_size() const { return context_.data_parallel ? context_.data_parallel->size() : 1; }
  // Pipeline parallelism (null when off): this rank's stage and its groups.
  struct Pipeline;
  std::unique_ptr<Pipeline> pipeline_;
  // The step's micro-batches through this rank's stage, in its schedule's order.
  void pipeline_micro_batches(const std::vector<data::Batch>& batches, const torch::Tensor& denominator,
                              torch::Tensor& shares, StepResult& result);
  // A micro-batch's loss terms from its logits (`total`: what backward starts from).
  // `aux_first`: the first block whose MoE auxiliary losses count (a pipeline's last chunk).
  LossTensors micro_batch_loss(const torch::Tensor& logits, const data::Batch& batch, const torch::Tensor& denominator,
                               torch::Tensor& total, int64_t aux_first = 0);
  // Pipeline: the evaluation forward of one batch through the stages; the loss sum
  // on the last stage (undefined elsewhere).
  torch::Tensor pipeline_eval_loss(const data::Batch& batch, int64_t index);
  // Pipeline: whole weights on rank 0 (in state_dict order) from their stages.
  model::NamedTensors pipeline_weights_on_main();
  // Pipeline: every rank of a pipeline gets every stage's weights (after training).
  void gather_pipeline_weights();

  TrainerOptions options_;
  precision::PrecisionOptions precision_;
  model::Transformer model_;
  data::BatchSampler train_data_;
  data::BatchSampler eval_data_;
  RunContext context_;
  // Groups, reducers, ZeRO-1 shards and expert placement (parallel/state.h).
  std::unique_ptr<parallel::ParallelState> parallel_;
  model::NamedTensors params_;  // trainable parameters
  std::unique_ptr<AdamW> optimizer_;
  CosineSchedule schedule_;
  CheckpointStore checkpoints_;
  std::function<bool()> stop_request_;
  bool stopped_by_request_ = false;
  std::unique_ptr<MetricsLog> metrics_;
  TrainerState state_;
  std::vector<std::unique_ptr<TrainerHook>> hooks_;
  // GPU runs: the next step's micro-batches, being sampled into pinned memory.
  std::future<std::vector<data::Batch>> prefetched_;
  int64_t prefetched_step_ = -1;
};

// Which parameters get weight decay under `options` (norm weights, biases and
// embeddings are exempt unless the options say otherwise).
std::vector<bool> weight_decay_mask(const model::NamedTensors& params, const TrainerOptions& options);

}  // namespace brigade::trainer
