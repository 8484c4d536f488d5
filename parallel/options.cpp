#include "parallel/options.h"

#include "core/error.h"

namespace brigade::parallel {

void ParallelOptions::validate() const {
  BRIGADE_CHECK(timeout_s >= 1, "parallel.timeout_s must be >= 1, got ", timeout_s);
  BRIGADE_CHECK(bucket_mb > 0, "parallel.bucket_mb must be > 0, got ", bucket_mb);
}

}  // namespace brigade::parallel
