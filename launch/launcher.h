// `brigade launch -n N [--hostfile FILE] -- <subcommand ...>`: starts N ranks of
// this executable through Open MPI's mpirun. The ranks find their place from
// mpirun's environment (launch/world.h), exactly as when a user runs
// `mpirun -np N brigade train ...` or `srun brigade train ...` directly.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace brigade::launch {

struct LaunchArgs {
  int ranks = 0;
  std::filesystem::path hostfile;    // empty: every rank on this machine
  std::vector<std::string> command;  // the brigade subcommand and its arguments
};

struct HostEntry {
  std::string host;
  int slots = 1;
};

// Open MPI hostfile lines: `host [slots=N] [max_slots=N]`, `#` comments. An
// unreadable file, a malformed line or no hosts at all is an Error naming the
// file and line.
std::vector<HostEntry> parse_hostfile(const std::filesystem::path& file);

// The mpirun command line for `args` (argv[0] is mpirun; `self` is this executable).
std::vector<std::string> mpirun_command(const LaunchArgs& args, const std::string& self, int cores, bool root);

// Checks the arguments, then replaces this process with mpirun (its exit code is
// the job's). Returns only with an Error.
int launch_command(const LaunchArgs& args);

}  // namespace brigade::launch
