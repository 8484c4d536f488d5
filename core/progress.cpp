#include "core/progress.h"

#include <cstdio>

#include "core/log.h"

namespace brigade {

Progress::Progress(std::string label, int64_t total, bool interactive, double quiet_seconds)
    : label_(std::move(label)), total_(total), interactive_(interactive),
      start_(std::chrono::steady_clock::now()), created_(start_), quiet_seconds_(quiet_seconds) {}

void Progress::update(int64_t current, const std::string& status) {
  if (first_ < 0) {
    first_ = current;
    start_ = std::chrono::steady_clock::now();
  }
  double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  double done = static_cast<double>(current - first_);
  double eta = done > 0 ? elapsed / done * static_cast<double>(total_ - current) : -1.0;
  double frac = total_ > 0 ? static_cast<double>(current) / static_cast<double>(total_) : 0.0;
  if (interactive_) {
    constexpr int kWidth = 28;
    int filled = static_cast<int>(frac * kWidth);
    std::string bar(filled, '#');
    bar.resize(kWidth, '.');
    std::fprintf(stderr, "\r\033[K%s [%s] %lld/%lld | %s | ETA %s", label_.c_str(), bar.c_str(),
                 static_cast<long long>(current), static_cast<long long>(total_), status.c_str(),
                 human_duration(eta).c_str());
    std::fflush(stderr);
    drawn_ = true;
  } else {
    log_info(label_, " ", current, "/", total_, " | ", status, " | ETA ", human_duration(eta));
  }
}

void Progress::tick(int64_t current, const std::string& status) {
  if (!interactive_ && quiet_seconds_ > 0 &&
      std::chrono::duration<double>(std::chrono::steady_clock::now() - created_).count() < quiet_seconds_)
    return;
  if (!interactive_ && current < total_ && last_line_ >= 0 && (current - last_line_) * 10 < total_) return;
  last_line_ = current;
  update(current, status);
}

void Progress::finish() {
  if (interactive_ && drawn_) {
    std::fprintf(stderr, "\n");
    std::fflush(stderr);
    drawn_ = false;
  }
}

}  // namespace brigade
