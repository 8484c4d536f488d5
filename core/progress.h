// Progress display: a redrawn bar on a terminal, plain periodic lines otherwise
// (so logs written to files stay readable).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace brigade {

class Progress {
 public:
  // total: the step count at 100%; label: what is counted ("train", "generate").
  // quiet_seconds: off a terminal, tick() prints nothing until the operation has run
  // that long (exports and imports that finish quickly leave no lines in logs).
  Progress(std::string label, int64_t total, bool interactive, double quiet_seconds = 0.0);
  // Shows `current` of total with a free-form status such as "loss 2.31 | 12.3K tok/s".
  // On a terminal every call redraws; otherwise the caller decides when to call.
  void update(int64_t current, const std::string& status);
  // update() on a terminal; otherwise a line only every tenth of the total (and at
  // the end), for loops that report often.
  void tick(int64_t current, const std::string& status);
  // Ends the bar's line on a terminal.
  void finish();
  bool interactive() const { return interactive_; }

 private:
  std::string label_;
  int64_t total_;
  bool interactive_;
  int64_t first_ = -1;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point created_;
  double quiet_seconds_ = 0.0;
  bool drawn_ = false;
  int64_t last_line_ = -1;  // tick(): the last count printed as a line
};

}  // namespace brigade
