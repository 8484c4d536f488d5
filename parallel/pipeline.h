// Pipeline parallelism (parallel.pipeline_parallel: P): the transformer's blocks are
// split into P stages on P consecutive ranks; stage 0 also holds the embedding, the
// last stage the final norm and the output head. A step's micro-batches flow
// through the stages: activations forward and their gradients backward, point to
// point between neighbouring stages. What runs when on a stage is its schedule:
//
//   gpipe  every forward, then every backward: M micro-batches' activations kept
//   1f1b   P - s - 1 forwards to fill the pipe, then one forward and one backward
//          in turn, then the remaining backwards: at most P - s kept on stage s
//
// Backwards run in micro-batch order on every schedule, so each parameter's
// gradients are added in the canonical order of parallel/ordered_sum.h.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace brigade::parallel {

enum class PipelineSchedule { kGpipe, k1F1B };
std::string to_string(PipelineSchedule schedule);
PipelineSchedule parse_pipeline_schedule(const std::string& name);

struct PipelineAction {
  enum class Kind { kForward, kBackward } kind = Kind::kForward;
  int64_t micro = 0;
  bool operator==(const PipelineAction&) const = default;
};

// Stage `stage` of `stages`: its actions for `micro_batches` micro-batches, in order.
std::vector<PipelineAction> pipeline_schedule(PipelineSchedule schedule, int stages, int stage, int64_t micro_batches);

// The most micro-batches whose forward ran and whose backward has not, over the actions.
int64_t max_in_flight(const std::vector<PipelineAction>& actions);

// Blocks [first, last) of stage `stage`: `layers` split as evenly as possible, the
// earlier stages taking one more when they do not divide (stage 0 also runs the
// embedding, the last stage the head).
std::pair<int64_t, int64_t> stage_layers(int64_t layers, int stages, int stage);

}  // namespace brigade::parallel
