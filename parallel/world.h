// parallel/: who this process is among the ranks of a job. The communicator
// interface (MPI / NCCL / single-process) and process groups land here next; until
// then every run is a real single-process world.
#pragma once

namespace brigade::parallel {

struct World {
  int rank = 0;        // global rank
  int size = 1;        // number of ranks
  int local_rank = 0;  // rank within this node (picks the GPU)
  bool is_main() const { return rank == 0; }
};

}  // namespace brigade::parallel
