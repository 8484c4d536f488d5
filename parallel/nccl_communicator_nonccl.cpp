// Builds without NCCL: the NCCL back end is a clear error.
#include "core/error.h"
#include "parallel/nccl_communicator.h"

namespace brigade::parallel {

bool nccl_built() { return false; }

std::unique_ptr<Communicator> make_nccl_world(const World&, std::chrono::seconds) {
  BRIGADE_FAIL("brigade was built without NCCL: the nccl communicator is unavailable; use mpi");
}

}  // namespace brigade::parallel
