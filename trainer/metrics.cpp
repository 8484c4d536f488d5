#include "trainer/metrics.h"

#include <sstream>

#include "core/error.h"
#include "core/fs.h"

namespace brigade::trainer {

MetricsLog::MetricsLog(std::filesystem::path path, int64_t keep_until_step) : path_(std::move(path)) {
  if (keep_until_step >= 0 && std::filesystem::exists(path_)) {
    std::istringstream in(read_file(path_));
    std::string kept, line;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      auto record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      // A torn last line (killed mid-write) is dropped along with redone steps.
      if (record.is_discarded() || !record.contains("step")) continue;
      if (record["step"].get<int64_t>() <= keep_until_step) kept += line + "\n";
    }
    write_file_atomic(path_, kept);
  }
  out_.open(path_, std::ios::app);
  BRIGADE_CHECK(out_.good(), "cannot open ", path_.string(), " for writing");
}

void MetricsLog::write(const nlohmann::json& record) {
  out_ << record.dump() << "\n";
  out_.flush();
}

}  // namespace brigade::trainer
