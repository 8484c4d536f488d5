// Where this process sits in a multi-rank job, from the launcher's environment
// (the only place brigade reads it; the result is logged): Open MPI's mpirun
// (OMPI_COMM_WORLD_*), Slurm's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID),
// or a PMI launcher such as MPICH's Hydra (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID).
// Nothing set: a world of one.
#pragma once

#include <string>

#include "parallel/world.h"

namespace brigade::launch {

struct DetectedWorld {
  parallel::World world;
  std::string source;  // "Open MPI", "Slurm", "PMI" or "single process"
};

// Malformed or inconsistent variables (a rank outside the world) are an Error
// naming the variable.
DetectedWorld detect_world();

}  // namespace brigade::launch
