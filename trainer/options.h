// The trainer's options (recipe section `trainer`). Defaults are documented in
// docs/recipes.md, which is generated from the recipe schema.
#pragma once

#include <cstdint>
#include <string>

#include "core/device.h"
#include "core/recompute.h"

namespace brigade::trainer {

enum class NonFinitePolicy { kAbort, kSkip };

struct TrainerOptions {
  int64_t max_steps = 600;          // optimizer steps; also the end of the cosine schedule
  int64_t micro_batch_size = 16;    // sequences per micro-batch per rank
  int64_t grad_accum_steps = 1;     // micro-batches per optimizer step
  double lr = 3e-3;                 // peak learning rate
  double min_lr = 3e-4;             // cosine floor
  int64_t warmup_steps = 50;        // linear warmup from 0
  double weight_decay = 0.1;        // decoupled (AdamW)
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double grad_clip = 1.0;           // max global gradient norm; 0 disables clipping
  bool decay_norms_and_biases = false;
  bool decay_embeddings = false;
  int64_t log_every = 10;
  bool tensorboard = true;  // metrics.jsonl's values also as TensorBoard events in RUN/tensorboard/
  int64_t eval_every = 100;         // 0 disables periodic eval (a final eval still runs)
  int64_t eval_batches = 8;
  int64_t checkpoint_every = 200;   // 0: only at the end
  int64_t keep_checkpoints = 3;     // most recent K step directories kept
  uint64_t seed = 1234;             // model init and data order
  int64_t threads = 0;              // intra-op CPU threads; 0 = the node's cores / its ranks
  DeviceKind device = DeviceKind::kAuto;  // auto: the rank's GPU when one is visible, else the CPU
  Checkpointing activation_checkpointing = Checkpointing::kNone;  // what backward recomputes (core/recompute.h)
  NonFinitePolicy on_nonfinite = NonFinitePolicy::kAbort;
  int64_t stop_after = 0;           // stop (with a checkpoint) at this step without changing the schedule; 0 = run to max_steps

  void validate() const;
};

std::string to_string(NonFinitePolicy policy);
NonFinitePolicy parse_nonfinite_policy(const std::string& name);

}  // namespace brigade::trainer
