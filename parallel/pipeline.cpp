#include "parallel/pipeline.h"

#include <algorithm>

#include "core/error.h"

namespace brigade::parallel {

std::string to_string(PipelineSchedule schedule) {
  switch (schedule) {
    case PipelineSchedule::kGpipe: return "gpipe";
    case PipelineSchedule::k1F1B: return "1f1b";
  }
  return "?";
}

PipelineSchedule parse_pipeline_schedule(const std::string& name) {
  if (name == "gpipe") return PipelineSchedule::kGpipe;
  if (name == "1f1b") return PipelineSchedule::k1F1B;
  BRIGADE_FAIL("unknown pipeline schedule '", name, "' (expected gpipe or 1f1b)");
}

std::vector<PipelineAction> pipeline_schedule(PipelineSchedule schedule, int stages, int stage, int64_t micro_batches) {
  BRIGADE_ASSERT(stages >= 1 && stage >= 0 && stage < stages && micro_batches >= 1, "pipeline schedule for stage ",
                 stage, " of ", stages, " with ", micro_batches, " micro-batches");
  using Kind = PipelineAction::Kind;
  std::vector<PipelineAction> out;
  const int64_t warmup =
      schedule == PipelineSchedule::kGpipe ? micro_batches : std::min<int64_t>(stages - stage - 1, micro_batches);
  int64_t forward = 0, backward = 0;
  for (; forward < warmup; ++forward) out.push_back({Kind::kForward, forward});
  while (forward < micro_batches) {
    out.push_back({Kind::kForward, forward++});
    out.push_back({Kind::kBackward, backward++});
  }
  while (backward < micro_batches) out.push_back({Kind::kBackward, backward++});
  return out;
}

int64_t max_in_flight(const std::vector<PipelineAction>& actions) {
  int64_t now = 0, most = 0;
  for (const auto& a : actions) {
    now += a.kind == PipelineAction::Kind::kForward ? 1 : -1;
    most = std::max(most, now);
  }
  return most;
}

std::pair<int64_t, int64_t> stage_layers(int64_t layers, int stages, int stage) {
  BRIGADE_ASSERT(stages >= 1 && layers >= stages && stage >= 0 && stage < stages, "stage ", stage, " of ", stages,
                 " over ", layers, " layers");
  const int64_t base = layers / stages, extra = layers % stages;
  const int64_t first = stage * base + std::min<int64_t>(stage, extra);
  return {first, first + base + (stage < extra ? 1 : 0)};
}

}  // namespace brigade::parallel
