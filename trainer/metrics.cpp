#include "trainer/metrics.h"

#include <chrono>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"

namespace brigade::trainer {

MetricsLog::MetricsLog(std::filesystem::path path, int64_t keep_until_step, const std::filesystem::path& tensorboard_dir)
    : path_(std::move(path)) {
  if (!tensorboard_dir.empty()) events_ = std::make_unique<EventWriter>(tensorboard_dir, keep_until_step);
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
  if (events_ && record.contains("step") && record["step"].is_number_integer()) {
    const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    events_->scalars(record["step"].get<int64_t>(), now, scalars_of(record));
  }
}

}  // namespace brigade::trainer
