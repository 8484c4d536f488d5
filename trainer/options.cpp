#include "trainer/options.h"

#include "core/error.h"

namespace brigade::trainer {

void TrainerOptions::validate() const {
  BRIGADE_CHECK(max_steps > 0, "trainer.max_steps must be positive, got ", max_steps);
  BRIGADE_CHECK(micro_batch_size > 0, "trainer.micro_batch_size must be positive, got ", micro_batch_size);
  BRIGADE_CHECK(grad_accum_steps > 0, "trainer.grad_accum_steps must be positive, got ", grad_accum_steps);
  BRIGADE_CHECK(lr > 0, "trainer.lr must be positive, got ", lr);
  BRIGADE_CHECK(min_lr >= 0 && min_lr <= lr, "trainer.min_lr must be in [0, trainer.lr=", lr,
                "], got ", min_lr);
  BRIGADE_CHECK(warmup_steps >= 0 && warmup_steps <= max_steps, "trainer.warmup_steps must be in [0, ",
                "trainer.max_steps=", max_steps, "], got ", warmup_steps);
  BRIGADE_CHECK(weight_decay >= 0, "trainer.weight_decay must be >= 0, got ", weight_decay);
  BRIGADE_CHECK(beta1 >= 0 && beta1 < 1, "trainer.beta1 must be in [0, 1), got ", beta1);
  BRIGADE_CHECK(beta2 >= 0 && beta2 < 1, "trainer.beta2 must be in [0, 1), got ", beta2);
  BRIGADE_CHECK(eps > 0, "trainer.eps must be positive, got ", eps);
  BRIGADE_CHECK(grad_clip >= 0, "trainer.grad_clip must be >= 0 (0 disables), got ", grad_clip);
  BRIGADE_CHECK(log_every > 0, "trainer.log_every must be positive, got ", log_every);
  BRIGADE_CHECK(eval_every >= 0, "trainer.eval_every must be >= 0, got ", eval_every);
  BRIGADE_CHECK(eval_batches > 0, "trainer.eval_batches must be positive, got ", eval_batches);
  BRIGADE_CHECK(checkpoint_every >= 0, "trainer.checkpoint_every must be >= 0, got ", checkpoint_every);
  BRIGADE_CHECK(keep_checkpoints > 0, "trainer.keep_checkpoints must be positive, got ", keep_checkpoints);
  BRIGADE_CHECK(threads >= 0, "trainer.threads must be >= 0 (0 = all cores), got ", threads);
  BRIGADE_CHECK(stop_after >= 0 && stop_after <= max_steps, "trainer.stop_after must be in [0, ",
                "trainer.max_steps=", max_steps, "], got ", stop_after);
}

std::string to_string(NonFinitePolicy policy) {
  return policy == NonFinitePolicy::kSkip ? "skip" : "abort";
}

NonFinitePolicy parse_nonfinite_policy(const std::string& name) {
  if (name == "abort") return NonFinitePolicy::kAbort;
  if (name == "skip") return NonFinitePolicy::kSkip;
  BRIGADE_FAIL("unknown non-finite policy '", name, "' (expected abort or skip)");
}

}  // namespace brigade::trainer
