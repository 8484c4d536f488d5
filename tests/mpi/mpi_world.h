// The world communicator of the multi-rank tests (tests/mpi/), shared by every test
// file of the binary: made on first use, null when the binary runs alone (the
// tests then skip). MPI is finalised once, after the last test (a rank that exits
// without it fails the job).
#pragma once

#include "parallel/communicator.h"

namespace brigade::testing {

parallel::Communicator* mpi_world();

}  // namespace brigade::testing
