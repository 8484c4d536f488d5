#include "launch/world.h"

#include <algorithm>
#include <cstdlib>

#include "core/error.h"

namespace brigade::launch {
namespace {

// The integer in environment variable `name`, or `fallback` when it is unset.
int env_int(const char* name, int fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  const long n = std::strtol(value, &end, 10);
  BRIGADE_CHECK(*end == '\0' && n >= 0 && n < (1 << 30), "environment variable ", name, "='", value,
                "' is not a rank or size");
  return static_cast<int>(n);
}

bool has(const char* name) { return std::getenv(name) != nullptr; }

// Slurm's tasks on this node: SLURM_NTASKS_PER_NODE when the job set it, else the
// first count of SLURM_STEP_TASKS_PER_NODE ("4(x2),3": 4 tasks on each of the first
// two nodes). An uneven step layout may undercount on later nodes; LOCAL_WORLD_SIZE
// overrides it.
int slurm_tasks_on_node() {
  for (const char* name : {"SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE"}) {
    const char* value = std::getenv(name);
    const int n = value == nullptr ? 0 : std::atoi(value);  // the leading count
    if (n > 0) return n;
  }
  return 1;
}

}  // namespace

DetectedWorld detect_world() {
  DetectedWorld d;
  if (has("OMPI_COMM_WORLD_SIZE")) {
    d.source = "Open MPI";
    d.world.rank = env_int("OMPI_COMM_WORLD_RANK", 0);
    d.world.size = env_int("OMPI_COMM_WORLD_SIZE", 1);
    d.world.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0);
    d.world.local_size = env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1);
  } else if (has("SLURM_PROCID") && has("SLURM_NTASKS")) {
    d.source = "Slurm";
    d.world.rank = env_int("SLURM_PROCID", 0);
    d.world.size = env_int("SLURM_NTASKS", 1);
    d.world.local_rank = env_int("SLURM_LOCALID", 0);
    d.world.local_size = slurm_tasks_on_node();
  } else if (has("PMI_SIZE")) {
    d.source = "PMI";
    d.world.rank = env_int("PMI_RANK", 0);
    d.world.size = env_int("PMI_SIZE", 1);
    d.world.local_rank = env_int("MPI_LOCALRANKID", env_int("PMI_LOCAL_RANK", 0));
    d.world.local_size = env_int("MPI_LOCALNRANKS", env_int("PMI_LOCAL_SIZE", 1));
  } else {
    d.source = "single process";
  }
  // torchrun-style variables (and users pinning a process to a GPU by hand) name the
  // node-local place directly; they win over what the launcher implies.
  d.world.local_rank = env_int("LOCAL_RANK", d.world.local_rank);
  d.world.local_size = env_int("LOCAL_WORLD_SIZE", std::max(d.world.local_size, d.world.local_rank + 1));
  BRIGADE_CHECK(d.world.local_rank < d.world.local_size, d.source, " environment says local rank ", d.world.local_rank,
                " of ", d.world.local_size, " ranks on this node: not a valid local rank");
  BRIGADE_CHECK(d.world.size >= 1 && d.world.rank < d.world.size, d.source, " environment says rank ", d.world.rank,
                " of ", d.world.size, ": not a valid rank");
  return d;
}

}  // namespace brigade::launch
