// A second training objective on the model's logits, mixed with the cross-entropy.
//
// The trainer minimises, per micro-batch,
//
//   (1 - weight) * CE_sum / global_tokens + weight * objective_sum / global_tokens
//
// where CE_sum is the cross-entropy summed over this rank's trained targets and
// global_tokens counts the micro-batch's trained targets on all ranks. Both terms
// are sums of per-position values over the same denominator, so they are
// per-token means on the same scale (a position the objective does not cover adds
// 0 to its sum but still counts in the denominator). Evaluation stays plain CE.
//
// The trainer knows the interface only: the implementation (logit distillation,
// distill/kd_objective.h) lives above the trainer and is chosen in recipes/build.
#pragma once

#include <string>

#include <torch/types.h>

#include "data/sampler.h"

namespace brigade::trainer {

class LogitObjective {
 public:
  virtual ~LogitObjective() = default;
  // Its key in metrics.jsonl (e.g. "kd_loss").
  virtual std::string name() const = 0;
  // Its share of the loss, in [0, 1].
  virtual double weight() const = 0;
  // Sum over the batch's positions of the per-position objective, differentiable
  // w.r.t. logits. logits: [rows, seq_len, vocab] for `batch` (batch.offsets gives
  // where each row lies in the training corpus).
  virtual torch::Tensor loss_sum(const torch::Tensor& logits, const data::Batch& batch) const = 0;
};

}  // namespace brigade::trainer
