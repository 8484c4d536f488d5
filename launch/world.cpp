#include "launch/world.h"

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

}  // namespace

DetectedWorld detect_world() {
  DetectedWorld d;
  if (has("OMPI_COMM_WORLD_SIZE")) {
    d.source = "Open MPI";
    d.world.rank = env_int("OMPI_COMM_WORLD_RANK", 0);
    d.world.size = env_int("OMPI_COMM_WORLD_SIZE", 1);
    d.world.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0);
  } else if (has("SLURM_PROCID") && has("SLURM_NTASKS")) {
    d.source = "Slurm";
    d.world.rank = env_int("SLURM_PROCID", 0);
    d.world.size = env_int("SLURM_NTASKS", 1);
    d.world.local_rank = env_int("SLURM_LOCALID", 0);
  } else if (has("PMI_SIZE")) {
    d.source = "PMI";
    d.world.rank = env_int("PMI_RANK", 0);
    d.world.size = env_int("PMI_SIZE", 1);
    d.world.local_rank = env_int("MPI_LOCALRANKID", env_int("PMI_LOCAL_RANK", 0));
  } else {
    d.source = "single process";
  }
  BRIGADE_CHECK(d.world.size >= 1 && d.world.rank < d.world.size, d.source, " environment says rank ", d.world.rank,
                " of ", d.world.size, ": not a valid rank");
  return d;
}

}  // namespace brigade::launch
