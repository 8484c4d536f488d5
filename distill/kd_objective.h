// Logit distillation as the trainer's second objective (trainer/objective.h): the
// teacher's top-k per token of a packed SFT shard, read from the build stage's
// kd.safetensors (format in distill/build.h), and kd_loss (distill/kd.h) over the
// positions that are trained (target not masked) and have a teacher record.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

#include <torch/types.h>

#include "distill/kd.h"
#include "trainer/objective.h"

namespace brigade::distill {

// The teacher's top-k aligned with a shard's token positions: row j is the teacher's
// distribution for predicting token j + 1.
struct KdTargets {
  torch::Tensor ids;       // [tokens, k] int32
  torch::Tensor logprobs;  // [tokens, k] float32
  torch::Tensor valid;     // [tokens] uint8: 1 where a teacher record is present

  int64_t tokens() const { return ids.size(0); }
  int64_t k() const { return ids.size(1); }
};

// Reads and checks a kd.safetensors file (the three tensors, their dtypes and
// agreeing shapes); an Error naming the file otherwise.
KdTargets load_kd_targets(const std::filesystem::path& path);

class KdObjective : public trainer::LogitObjective {
 public:
  // targets must cover every position the trainer's corpus can hand out
  // (batch.offsets + seq_len <= targets.tokens(), checked per batch); options.loss
  // must not be kNone.
  KdObjective(KdTargets targets, KdOptions options);

  std::string name() const override { return "kd_loss"; }
  double weight() const override { return options_.weight; }
  // kd_loss is a mean over its counted positions; this returns mean x count, the sum
  // of the per-position divergences (x T^2), so the trainer can normalise it by the
  // same global token count as the cross-entropy.
  torch::Tensor loss_sum(const torch::Tensor& logits, const data::Batch& batch) const override;

  const KdOptions& options() const { return options_; }

 private:
  KdTargets targets_;
  KdOptions options_;
};

}  // namespace brigade::distill
