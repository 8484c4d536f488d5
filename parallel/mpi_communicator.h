// The MPI back end of Communicator (CPU tensors). Built by make_world_communicator.
#pragma once

#include <chrono>
#include <memory>

#include "parallel/communicator.h"

namespace brigade::parallel {

// Initialises MPI (thread level MULTIPLE: gradient hooks may start collectives
// from autograd's thread) unless it is already, and returns COMM_WORLD as a
// Communicator after checking its rank and size against `world`.
std::unique_ptr<Communicator> make_mpi_world(const World& world, std::chrono::seconds timeout);

}  // namespace brigade::parallel
