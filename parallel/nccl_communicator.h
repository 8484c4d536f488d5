// The NCCL back end of Communicator (CUDA tensors), built by
// make_world_communicator when brigade was compiled with NCCL. Start-up follows
// the usual sequence: MPI gives rank and size, rank 0 makes the NCCL unique id and
// broadcasts it over MPI, every rank picks its GPU (local rank modulo the visible
// devices) and joins. Operations run on torch's current CUDA stream; a Handle
// records an event after them, and wait() polls it against the timeout.
#pragma once

#include <chrono>
#include <memory>

#include "parallel/communicator.h"

namespace brigade::parallel {

// Whether brigade was compiled with NCCL.
bool nccl_built();
std::unique_ptr<Communicator> make_nccl_world(const World& world, std::chrono::seconds timeout);

}  // namespace brigade::parallel
