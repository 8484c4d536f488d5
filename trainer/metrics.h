// metrics.jsonl: one JSON object per line (DESIGN.md: at least step, loss, lr,
// grad_norm, tokens_per_sec on training lines; eval lines carry eval_loss, eval_ppl).
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>

#include <memory>

#include <nlohmann/json.hpp>

#include "trainer/tensorboard.h"

namespace brigade::trainer {

class MetricsLog {
 public:
  // Opens `path` for appending. With keep_until_step >= 0, lines of later steps are
  // removed first (they belong to steps a resumed run is about to redo); the file is
  // rewritten atomically. A non-empty `tensorboard_dir` also writes every record's
  // numbers there as TensorBoard scalars at the record's step (trimmed the same way).
  MetricsLog(std::filesystem::path path, int64_t keep_until_step, const std::filesystem::path& tensorboard_dir = {});
  void write(const nlohmann::json& record);  // one line, flushed
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::ofstream out_;
  std::unique_ptr<EventWriter> events_;
};

}  // namespace brigade::trainer
