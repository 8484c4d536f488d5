// The recipe's `parallel` section: how ranks cooperate (docs/distributed.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "parallel/communicator.h"
#include "parallel/pipeline.h"

namespace brigade::parallel {

// `parallel.backend`: auto is NCCL for GPU tensors and MPI for CPU ones.
enum class BackendRequest { kAuto, kMpi, kNccl };
std::string to_string(BackendRequest request);
BackendRequest parse_backend_request(const std::string& name);

struct ParallelOptions {
  BackendRequest backend = BackendRequest::kAuto;  // how ranks talk (docs/distributed.md)
  int64_t timeout_s = 300;  // a collective not finished by then stops the job with an error
  double bucket_mb = 25.0;  // data-parallel gradient bucket size (MiB)
  int64_t zero_stage = 0;   // ZeRO: 1 optimizer state, 2 + gradients, 3 + block parameters sharded over the data-parallel group
  int64_t expert_parallel = 1;   // ranks per expert-parallel group
  bool ep_fp8_dispatch = false;  // dispatch tokens as E4M3 with 1x128 scales
  int64_t pipeline_parallel = 1;  // pipeline stages (parallel/pipeline.h)
  PipelineSchedule pp_schedule = PipelineSchedule::k1F1B;
  std::vector<int64_t> pp_layers;  // blocks per stage (per chunk with interleaved_1f1b); empty: balanced by parameters
  int64_t pp_virtual_stages = 0;   // interleaved_1f1b: model chunks per rank (0: 2); dualpipev: 2; others: 1
  bool pp_zero_bubble = true;      // dualpipev: split backwards and W steps (at ZeRO 0 and 1)

  void validate() const;
  // Model chunks per pipeline rank: pp_virtual_stages (2 when 0) for interleaved_1f1b, else 1.
  int pp_chunks() const {
    if (pp_schedule == PipelineSchedule::kDualPipeV) return 2;
    if (pp_schedule != PipelineSchedule::kInterleaved1F1B) return 1;
    return pp_virtual_stages > 0 ? static_cast<int>(pp_virtual_stages) : 2;
  }
  int64_t bucket_bytes() const { return static_cast<int64_t>(bucket_mb * 1024.0 * 1024.0); }
};

// The world communicator's back end for a job of `world_size` ranks computing on
// `device`: one process alone needs none (kSingle); NCCL moves GPU tensors and MPI
// CPU ones, so the other pairings are an Error naming parallel.backend.
Backend choose_backend(BackendRequest request, c10::Device device, int world_size, bool nccl_built);

}  // namespace brigade::parallel
