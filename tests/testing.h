// Helpers shared by brigade's tests.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <functional>
#include <string>

#include "core/error.h"

namespace brigade::testing {

// A fresh directory under the build tree's temp area, removed when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// Runs a shell command and captures its output.
CommandResult run_command(const std::string& command);

// Runs build/brigade with `args` (already shell-quoted where needed).
CommandResult run_brigade(const std::string& args);

// A shell command running in the background, its output appended to `log`; killed
// (SIGKILL) and reaped when the object dies.
class Background {
 public:
  Background(const std::string& command, const std::filesystem::path& log);
  ~Background();
  Background(const Background&) = delete;
  Background& operator=(const Background&) = delete;
  // Sends `signal` and waits for the process to end.
  void kill(int signal = 9);
  // Whether it is still running.
  bool running();
  // Its exit code once it ended on its own (-1 while running or after kill()).
  int exit_code() const { return exit_code_; }

 private:
  int pid_ = -1;
  int exit_code_ = -1;
};

// Polls `done` every 20 ms for up to `seconds`; false on timeout.
bool wait_for(const std::function<bool()>& done, double seconds);

// --set overrides that shrink a shipped recipe's model and data so CLI tests train
// in seconds (tests add their own trainer settings).
inline const std::string kSmallModelOverrides =
    " --set model.d_model=32 --set model.n_layers=2 --set model.n_heads=4 --set model.n_kv_heads=2"
    " --set model.d_ff=64 --set model.max_seq_len=64 --set data.seq_len=32"
    " --set data.synthetic.num_problems=400 --set data.synthetic.eval_problems=40";

}  // namespace brigade::testing

// Expects `statement` to throw brigade::Error whose message contains `substring`.
#define EXPECT_BRIGADE_ERROR(statement, substring)                                     \
  do {                                                                                 \
    try {                                                                              \
      statement;                                                                       \
      ADD_FAILURE() << "expected brigade::Error containing '" << (substring) << "'";   \
    } catch (const ::brigade::Error& e) {                                              \
      EXPECT_NE(std::string(e.what()).find(substring), std::string::npos)              \
          << "error was: " << e.what();                                                \
    }                                                                                  \
  } while (0)
