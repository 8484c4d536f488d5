// Logging to stderr with a level and elapsed time. Only rank 0 logs by default
// (set_log_rank) so multi-rank runs print one story.
#pragma once

#include <string>

#include "core/error.h"

namespace brigade {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

void set_log_level(LogLevel level);
void set_log_rank(int rank);
void log_message(LogLevel level, const std::string& message);

template <typename... Args>
void log_info(const Args&... args) { log_message(LogLevel::kInfo, detail::concat(args...)); }
template <typename... Args>
void log_warn(const Args&... args) { log_message(LogLevel::kWarn, detail::concat(args...)); }
template <typename... Args>
void log_debug(const Args&... args) { log_message(LogLevel::kDebug, detail::concat(args...)); }

// True when stderr is an interactive terminal (progress bars instead of plain lines).
bool stderr_is_terminal();

// "1.2M", "3.4G": counts for humans.
std::string human_count(double value);
// "1m05s"
std::string human_duration(double seconds);

}  // namespace brigade
