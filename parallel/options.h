// The recipe's `parallel` section: how ranks cooperate (docs/distributed.md).
#pragma once

#include <cstdint>

namespace brigade::parallel {

struct ParallelOptions {
  int64_t timeout_s = 300;  // a collective not finished by then stops the job with an error
  double bucket_mb = 25.0;  // data-parallel gradient bucket size (MiB)
  int64_t zero_stage = 0;   // 1: ZeRO-1 (optimizer state sharded over the data-parallel group)
  int64_t expert_parallel = 1;   // ranks per expert-parallel group
  bool ep_fp8_dispatch = false;  // dispatch tokens as E4M3 with 1x128 scales

  void validate() const;
  int64_t bucket_bytes() const { return static_cast<int64_t>(bucket_mb * 1024.0 * 1024.0); }
};

}  // namespace brigade::parallel
