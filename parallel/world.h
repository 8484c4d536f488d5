// Who this process is among the ranks of a job, as the launcher's environment
// says (launch/ reads it: Open MPI, PMI, Slurm). A process started alone is rank 0
// of a world of 1.
#pragma once

namespace brigade::parallel {

struct World {
  int rank = 0;        // global rank
  int size = 1;        // number of ranks
  int local_rank = 0;  // rank within this node (picks the GPU)
  int local_size = 1;  // ranks on this node
  bool is_main() const { return rank == 0; }
};

}  // namespace brigade::parallel
