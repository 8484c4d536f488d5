#include "parallel/pipeline.h"

#include <algorithm>
#include <limits>

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

std::vector<int64_t> stage_boundaries(const std::vector<int64_t>& block_params, int64_t first_extra,
                                      int64_t last_extra, int stages, const std::vector<int64_t>& layers_per_stage) {
  const auto layers = static_cast<int64_t>(block_params.size());
  BRIGADE_CHECK(stages >= 1 && layers >= stages, "parallel.pipeline_parallel (", stages, ") is more than model.n_layers (",
                layers, "): every stage needs at least one block");
  std::vector<int64_t> bounds{0};
  if (!layers_per_stage.empty()) {
    BRIGADE_CHECK(static_cast<int64_t>(layers_per_stage.size()) == stages, "parallel.pp_layers lists ",
                  layers_per_stage.size(), " stages, but parallel.pipeline_parallel is ", stages);
    for (const int64_t n : layers_per_stage) {
      BRIGADE_CHECK(n >= 1, "parallel.pp_layers: every stage needs at least one block, got ", n);
      bounds.push_back(bounds.back() + n);
    }
    BRIGADE_CHECK(bounds.back() == layers, "parallel.pp_layers adds up to ", bounds.back(), " blocks, but model.n_layers is ",
                  layers);
    return bounds;
  }
  // prefix[i]: parameters of blocks [0, i).
  std::vector<int64_t> prefix(static_cast<size_t>(layers) + 1, 0);
  for (int64_t i = 0; i < layers; ++i) prefix[static_cast<size_t>(i) + 1] = prefix[static_cast<size_t>(i)] + block_params[static_cast<size_t>(i)];
  auto cost = [&](int s, int64_t begin, int64_t end) {
    return prefix[static_cast<size_t>(end)] - prefix[static_cast<size_t>(begin)] + (s == 0 ? first_extra : 0) +
           (s == stages - 1 ? last_extra : 0);
  };
  // Two exact dynamic programmes over (stages so far, blocks so far): the smallest
  // largest stage, then, with every stage at most that, the smallest sum of squared
  // block counts (the split closest to even).
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  const auto width = static_cast<size_t>(layers) + 1;
  std::vector<int64_t> most(static_cast<size_t>(stages + 1) * width, kNone);
  auto at = [&](std::vector<int64_t>& table, int s, int64_t e) -> int64_t& { return table[static_cast<size_t>(s) * width + static_cast<size_t>(e)]; };
  at(most, 0, 0) = 0;
  for (int s = 1; s <= stages; ++s) {
    for (int64_t e = s; e <= layers - (stages - s); ++e) {
      for (int64_t b = s - 1; b < e; ++b) {
        if (at(most, s - 1, b) == kNone) continue;
        at(most, s, e) = std::min(at(most, s, e), std::max(at(most, s - 1, b), cost(s - 1, b, e)));
      }
    }
  }
  const int64_t limit = at(most, stages, layers);
  std::vector<int64_t> squares(most.size(), kNone), from(most.size(), -1);
  at(squares, 0, 0) = 0;
  for (int s = 1; s <= stages; ++s) {
    for (int64_t e = s; e <= layers - (stages - s); ++e) {
      for (int64_t b = s - 1; b < e; ++b) {
        if (at(squares, s - 1, b) == kNone || cost(s - 1, b, e) > limit) continue;
        const int64_t value = at(squares, s - 1, b) + (e - b) * (e - b);
        if (value < at(squares, s, e)) {
          at(squares, s, e) = value;
          at(from, s, e) = b;
        }
      }
    }
  }
  bounds.assign(static_cast<size_t>(stages) + 1, layers);
  for (int s = stages; s > 0; --s) bounds[static_cast<size_t>(s) - 1] = at(from, s, bounds[static_cast<size_t>(s)]);
  return bounds;
}

}  // namespace brigade::parallel
