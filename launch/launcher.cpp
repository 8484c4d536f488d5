#include "launch/launcher.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "core/log.h"

namespace brigade::launch {
namespace fs = std::filesystem;

std::vector<HostEntry> parse_hostfile(const fs::path& file) {
  std::ifstream in(file);
  BRIGADE_CHECK(in.good(), "hostfile ", file.string(), ": cannot be read");
  std::vector<HostEntry> hosts;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (auto hash = line.find('#'); hash != std::string::npos) line.resize(hash);
    std::istringstream words(line);
    std::string word;
    if (!(words >> word)) continue;  // blank or comment
    HostEntry entry{word, 1};
    BRIGADE_CHECK(word.find('=') == std::string::npos, "hostfile ", file.string(), ":", number,
                  ": expected a host name first, got '", word, "'");
    while (words >> word) {
      const auto eq = word.find('=');
      const std::string key = eq == std::string::npos ? word : word.substr(0, eq);
      const std::string value = eq == std::string::npos ? "" : word.substr(eq + 1);
      BRIGADE_CHECK(key == "slots" || key == "max_slots" || key == "max-slots", "hostfile ", file.string(), ":", number,
                    ": unknown field '", word, "' (expected slots=N or max_slots=N)");
      char* end = nullptr;
      const long n = std::strtol(value.c_str(), &end, 10);
      BRIGADE_CHECK(!value.empty() && *end == '\0' && n >= 1 && n < (1 << 20), "hostfile ", file.string(), ":", number,
                    ": ", key, " needs a positive integer, got '", value, "'");
      if (key == "slots") entry.slots = static_cast<int>(n);
    }
    hosts.push_back(entry);
  }
  BRIGADE_CHECK(!hosts.empty(), "hostfile ", file.string(), ": lists no hosts");
  return hosts;
}

std::vector<std::string> mpirun_command(const LaunchArgs& args, const std::string& self, int cores, bool root) {
  BRIGADE_CHECK(args.ranks >= 1, "launch: -n must be at least 1, got ", args.ranks);
  BRIGADE_CHECK(!args.command.empty(), "launch: no brigade subcommand after --, e.g. `brigade launch -n 2 -- train recipes/tiny-dense.yaml`");
  BRIGADE_CHECK(args.command[0] != "launch", "launch: the command after -- cannot itself be launch");
  std::vector<std::string> cmd{"mpirun"};
  if (root) cmd.push_back("--allow-run-as-root");
  int slots = cores;
  if (!args.hostfile.empty()) {
    slots = 0;
    for (const auto& h : parse_hostfile(args.hostfile)) slots += h.slots;
  }
  // More ranks than slots (cores here): Open MPI refuses unless told to share.
  if (args.ranks > slots) cmd.push_back("--oversubscribe");
  cmd.insert(cmd.end(), {"-np", std::to_string(args.ranks)});
  if (!args.hostfile.empty()) cmd.insert(cmd.end(), {"--hostfile", args.hostfile.string()});
  cmd.push_back(self);
  cmd.insert(cmd.end(), args.command.begin(), args.command.end());
  return cmd;
}

int launch_command(const LaunchArgs& args) {
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const auto cmd = mpirun_command(args, self, cores, geteuid() == 0);
  std::string shown;
  for (const auto& c : cmd) shown += (shown.empty() ? "" : " ") + c;
  log_info("launch: ", shown);
  std::vector<char*> argv;
  for (const auto& c : cmd) argv.push_back(const_cast<char*>(c.c_str()));
  argv.push_back(nullptr);
  execvp(argv[0], argv.data());
  BRIGADE_FAIL("launch: cannot run mpirun (", std::strerror(errno),
               "); install Open MPI (scripts/setup.sh does) or start the ranks with srun");
}

}  // namespace brigade::launch
