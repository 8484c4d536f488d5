#include "parallel/pipeline.h"

#include <algorithm>
#include <deque>
#include <limits>

#include "core/error.h"

namespace brigade::parallel {

std::string to_string(PipelineSchedule schedule) {
  switch (schedule) {
    case PipelineSchedule::kGpipe: return "gpipe";
    case PipelineSchedule::k1F1B: return "1f1b";
    case PipelineSchedule::kInterleaved1F1B: return "interleaved_1f1b";
    case PipelineSchedule::kDualPipeV: return "dualpipev";
  }
  return "?";
}

PipelineSchedule parse_pipeline_schedule(const std::string& name) {
  if (name == "gpipe") return PipelineSchedule::kGpipe;
  if (name == "1f1b") return PipelineSchedule::k1F1B;
  if (name == "interleaved_1f1b") return PipelineSchedule::kInterleaved1F1B;
  if (name == "dualpipev") return PipelineSchedule::kDualPipeV;
  BRIGADE_FAIL("unknown pipeline schedule '", name, "' (expected gpipe, 1f1b, interleaved_1f1b or dualpipev)");
}

void check_pipeline_micro_batches(PipelineSchedule schedule, int64_t stages, int64_t micro_batches) {
  BRIGADE_CHECK(schedule != PipelineSchedule::kInterleaved1F1B || micro_batches % stages == 0,
                "parallel.pp_schedule=interleaved_1f1b needs the micro-batches per step (trainer.grad_accum_steps = ",
                micro_batches, ") to be a multiple of parallel.pipeline_parallel (", stages, ")");
  BRIGADE_CHECK(schedule != PipelineSchedule::kDualPipeV || micro_batches >= 2 * stages,
                "parallel.pp_schedule=dualpipev needs at least 2 x parallel.pipeline_parallel micro-batches per step ",
                "(trainer.grad_accum_steps = ", micro_batches, ", pipeline_parallel ", stages, ")");
}

int pipeline_model_chunk(PipelineSchedule schedule, int stages, int stage, int v) {
  if (schedule == PipelineSchedule::kDualPipeV) return v == 0 ? stage : 2 * stages - 1 - stage;
  return v * stages + stage;
}

int pipeline_chunk_rank(PipelineSchedule schedule, int stages, int model_chunk) {
  if (schedule == PipelineSchedule::kDualPipeV) return model_chunk < stages ? model_chunk : 2 * stages - 1 - model_chunk;
  return model_chunk % stages;
}

std::vector<PipelineAction> pipeline_schedule(PipelineSchedule schedule, int stages, int stage, int64_t micro_batches,
                                              int chunks, bool zero_bubble) {
  BRIGADE_ASSERT(stages >= 1 && stage >= 0 && stage < stages && micro_batches >= 1 && chunks >= 1,
                 "pipeline schedule for stage ", stage, " of ", stages, " with ", micro_batches, " micro-batches");
  using Kind = PipelineAction::Kind;
  std::vector<PipelineAction> out;
  check_pipeline_micro_batches(schedule, stages, micro_batches);
  BRIGADE_ASSERT(!zero_bubble || schedule == PipelineSchedule::kDualPipeV, "zero-bubble steps are dualpipev's, not ",
                 to_string(schedule), "'s");
  if (schedule == PipelineSchedule::kInterleaved1F1B) {
    BRIGADE_CHECK(chunks >= 2, "parallel.pp_schedule=interleaved_1f1b needs parallel.pp_virtual_stages >= 2, got ",
                  chunks);
    const int64_t group = static_cast<int64_t>(stages) * chunks;  // micro-batch steps of one round of chunks
    const int64_t total = micro_batches * chunks;
    // Forward step k: P micro-batches through chunk 0, the same P through chunk 1, ...
    auto at = [&](int64_t k, bool forward) {
      const int64_t round = k / group, within = k % group;
      const int chunk = static_cast<int>(within / stages);
      return PipelineAction{forward ? Kind::kForward : Kind::kBackward, round * stages + within % stages,
                            forward ? chunk : chunks - 1 - chunk};
    };
    const int64_t warmup = micro_batches == stages
                               ? total
                               : std::min<int64_t>(total, static_cast<int64_t>(stages - stage - 1) * 2 +
                                                              static_cast<int64_t>(chunks - 1) * stages);
    for (int64_t k = 0; k < warmup; ++k) out.push_back(at(k, true));
    for (int64_t k = 0; k + warmup < total; ++k) {
      out.push_back(at(k + warmup, true));
      out.push_back(at(k, false));
    }
    for (int64_t k = total - warmup; k < total; ++k) out.push_back(at(k, false));
    return out;
  }
  if (schedule == PipelineSchedule::kDualPipeV) {
    BRIGADE_ASSERT(chunks == 2, "dualpipev runs 2 chunks per rank, not ", chunks);
    int64_t next[2] = {0, 0}, back[2] = {0, 0};
    std::deque<PipelineAction> deferred;  // split backwards whose W has not run, oldest first
    auto forward = [&](int v) { out.push_back({Kind::kForward, next[v]++, v}); };
    auto backward = [&](int v, bool split = false) {
      split = split && zero_bubble;
      out.push_back({Kind::kBackward, back[v]++, v, split});
      if (split) deferred.push_back({Kind::kWeight, out.back().micro, v});
    };
    auto weight = [&] {
      if (!zero_bubble) return;
      out.push_back(deferred.front());
      deferred.pop_front();
    };
    const int64_t p = stages, s = stage;
    for (int64_t i = 0; i < (p - s - 1) * 2; ++i) forward(0);
    for (int64_t i = 0; i < s + 1; ++i) forward(0), forward(1);
    for (int64_t i = 0; i < p - s - 1; ++i) backward(1, true), weight(), forward(1);
    for (int64_t i = 0; i < micro_batches - 2 * p + s + 1; ++i) forward(0), backward(1), forward(1), backward(0);
    for (int64_t i = 0; i < p - s - 1; ++i) backward(1), forward(1), backward(0);
    // Phase 6: the second half split (on odd ranks from a backward of chunk 1, on
    // even ranks from one of chunk 0, so the W steps fill what each rank waits).
    bool split = false;
    for (int64_t i = 0; i < s + 1; ++i) {
      if (i == (s + 1) / 2 && s % 2 == 1) split = true;
      backward(1, split);
      if (i == (s + 1) / 2 && s % 2 == 0) split = true;
      backward(0, split);
    }
    for (int64_t i = 0; i < p - s - 1; ++i) weight(), backward(0, true);
    for (int64_t i = 0; i < s + 1; ++i) weight();
    BRIGADE_ASSERT(deferred.empty(), "dualpipev left ", deferred.size(), " weight-gradient steps unscheduled");
    return out;
  }
  BRIGADE_CHECK(chunks == 1, "parallel.pp_virtual_stages (", chunks, ") needs parallel.pp_schedule=interleaved_1f1b");
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

double theoretical_bubble(int stages, int64_t micro_batches, int chunks) {
  const double idle = stages - 1;
  return idle / (static_cast<double>(chunks) * static_cast<double>(micro_batches) + idle);
}

int64_t max_in_flight(const std::vector<PipelineAction>& actions) {
  int64_t now = 0, most = 0;
  for (const auto& a : actions) {
    if (a.kind == PipelineAction::Kind::kWeight) continue;
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
