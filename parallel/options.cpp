#include "parallel/options.h"

#include "core/error.h"

namespace brigade::parallel {

std::string to_string(BackendRequest request) {
  switch (request) {
    case BackendRequest::kAuto: return "auto";
    case BackendRequest::kMpi: return "mpi";
    case BackendRequest::kNccl: return "nccl";
  }
  return "?";
}

BackendRequest parse_backend_request(const std::string& name) {
  if (name == "auto") return BackendRequest::kAuto;
  if (name == "mpi") return BackendRequest::kMpi;
  if (name == "nccl") return BackendRequest::kNccl;
  BRIGADE_FAIL("unknown communication back end '", name, "' (expected auto, mpi or nccl)");
}

Backend choose_backend(BackendRequest request, c10::Device device, int world_size, bool nccl_built) {
  BRIGADE_CHECK(request != BackendRequest::kNccl || device.is_cuda(),
                "parallel.backend is nccl but this run computes on ", device.str(),
                ": NCCL moves GPU tensors only; set trainer.device=cuda, or parallel.backend=mpi (or auto) for CPU ranks");
  BRIGADE_CHECK(request != BackendRequest::kMpi || !device.is_cuda() || world_size == 1,
                "parallel.backend is mpi but this run computes on ", device.str(),
                ": brigade's MPI back end moves CPU tensors; use parallel.backend=nccl (or auto) on GPUs");
  if (world_size == 1) return Backend::kSingle;
  if (!device.is_cuda()) return Backend::kMpi;
  BRIGADE_CHECK(nccl_built, "a multi-rank run on GPUs needs NCCL, and this brigade was built without it "
                "(scripts/build.sh finds it in the CUDA toolkit); or set trainer.device=cpu");
  return Backend::kNccl;
}

void ParallelOptions::validate() const {
  BRIGADE_CHECK(timeout_s >= 1, "parallel.timeout_s must be >= 1, got ", timeout_s);
  BRIGADE_CHECK(bucket_mb > 0, "parallel.bucket_mb must be > 0, got ", bucket_mb);
  BRIGADE_CHECK(zero_stage >= 0 && zero_stage <= 3, "parallel.zero_stage must be 0, 1, 2 or 3, got ", zero_stage);
  BRIGADE_CHECK(pipeline_parallel >= 1, "parallel.pipeline_parallel must be >= 1, got ", pipeline_parallel);
  BRIGADE_CHECK(expert_parallel >= 1, "parallel.expert_parallel must be >= 1, got ", expert_parallel);
  BRIGADE_CHECK(pp_virtual_stages >= 0, "parallel.pp_virtual_stages must be >= 0, got ", pp_virtual_stages);
  if (pp_schedule == PipelineSchedule::kInterleaved1F1B) {
    BRIGADE_CHECK(pp_virtual_stages != 1, "parallel.pp_virtual_stages is 1: interleaved_1f1b needs at least 2 chunks ",
                  "per rank (or use pp_schedule 1f1b)");
  } else if (pp_schedule == PipelineSchedule::kDualPipeV) {
    BRIGADE_CHECK(pp_virtual_stages == 0 || pp_virtual_stages == 2, "parallel.pp_virtual_stages is ", pp_virtual_stages,
                  ": dualpipev runs 2 chunks per rank");
  } else {
    BRIGADE_CHECK(pp_virtual_stages <= 1, "parallel.pp_virtual_stages is ", pp_virtual_stages,
                  " but parallel.pp_schedule is ", to_string(pp_schedule), ": model chunks per rank need interleaved_1f1b");
  }
}

}  // namespace brigade::parallel
