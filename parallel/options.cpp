#include "parallel/options.h"

#include "core/error.h"

namespace brigade::parallel {

void ParallelOptions::validate() const {
  BRIGADE_CHECK(timeout_s >= 1, "parallel.timeout_s must be >= 1, got ", timeout_s);
  BRIGADE_CHECK(bucket_mb > 0, "parallel.bucket_mb must be > 0, got ", bucket_mb);
  BRIGADE_CHECK(zero_stage == 0 || zero_stage == 1, "parallel.zero_stage must be 0 or 1, got ", zero_stage);
  BRIGADE_CHECK(expert_parallel >= 1, "parallel.expert_parallel must be >= 1, got ", expert_parallel);
}

}  // namespace brigade::parallel
