#include "core/error.h"

#include <filesystem>

namespace brigade::detail {

void throw_error(const char* file, int line, const char* expr, const std::string& msg,
                 bool invariant) {
  std::string where = std::filesystem::path(file).filename().string() + ":" + std::to_string(line);
  if (expr && *expr) where += std::string(" (") + expr + ")";
  std::string message = msg;
  if (invariant) message = "internal error, please report: " + (msg.empty() ? where : msg);
  if (message.empty()) message = "check failed: " + where;
  throw Error(message, where);
}

}  // namespace brigade::detail
