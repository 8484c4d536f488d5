#include "core/log.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <mutex>

namespace brigade {
namespace {
LogLevel g_level = LogLevel::kInfo;
int g_rank = 0;
std::mutex g_mutex;
const auto g_start = std::chrono::steady_clock::now();
}  // namespace

void set_log_level(LogLevel level) { g_level = level; }
void set_log_rank(int rank) { g_rank = rank; }

void log_message(LogLevel level, const std::string& message) {
  if (level < g_level) return;
  if (g_rank != 0 && level < LogLevel::kWarn) return;
  static const char* names[] = {"debug", "info", "warn", "error"};
  double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - g_start).count();
  std::lock_guard<std::mutex> lock(g_mutex);
  std::fprintf(stderr, "[%7.1fs %s] %s\n", t, names[static_cast<int>(level)], message.c_str());
  std::fflush(stderr);
}

bool stderr_is_terminal() { return isatty(STDERR_FILENO) == 1; }

std::string human_count(double value) {
  const char* suffix[] = {"", "K", "M", "G", "T"};
  int i = 0;
  while (value >= 1000.0 && i < 4) {
    value /= 1000.0;
    ++i;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, i == 0 ? "%.0f%s" : "%.2f%s", value, suffix[i]);
  return buf;
}

std::string human_duration(double seconds) {
  if (!(seconds >= 0) || seconds > 1e7) return "--";
  long s = static_cast<long>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s / 60) % 60);
  else
    std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  return buf;
}

}  // namespace brigade
