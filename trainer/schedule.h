// Learning-rate schedule: linear warmup from 0, then cosine decay to a floor.
#pragma once

#include <cstdint>

namespace brigade::trainer {

struct CosineSchedule {
  double peak_lr;
  double min_lr;
  int64_t warmup_steps;
  int64_t total_steps;
  // Learning rate for optimizer step `step` (0-based).
  double operator()(int64_t step) const;
};

}  // namespace brigade::trainer
