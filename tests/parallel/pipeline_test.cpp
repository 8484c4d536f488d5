// Pipeline schedules: every micro-batch forward then backward once, backwards in
// micro-batch order, and the activations a stage holds bounded as each schedule
// promises; stages split the blocks by parameters, or as parallel.pp_layers lists.
#include <gtest/gtest.h>

#include <cstdio>
#include <map>
#include <optional>
#include <tuple>

#include "core/error.h"
#include "parallel/pipeline.h"
#include "tests/testing.h"

namespace brigade::parallel {
namespace {

using Kind = PipelineAction::Kind;

TEST(PipelineSchedule, EveryMicroBatchOnceBackwardsInOrderAndBounded) {
  for (auto schedule : {PipelineSchedule::kGpipe, PipelineSchedule::k1F1B}) {
    for (int stages : {1, 2, 4}) {
      for (int64_t micro : {1, 3, 8}) {
        for (int stage = 0; stage < stages; ++stage) {
          const auto actions = pipeline_schedule(schedule, stages, stage, micro);
          ASSERT_EQ(actions.size(), static_cast<size_t>(2 * micro));
          int64_t forward = 0, backward = 0;
          for (const auto& a : actions) {
            if (a.kind == Kind::kForward) {
              EXPECT_EQ(a.micro, forward++);
            } else {
              EXPECT_EQ(a.micro, backward++);
              EXPECT_LT(a.micro, forward) << "backward before its forward";
            }
          }
          const int64_t bound = schedule == PipelineSchedule::kGpipe ? micro : std::min<int64_t>(stages - stage, micro);
          EXPECT_EQ(max_in_flight(actions), bound) << to_string(schedule) << " stage " << stage << "/" << stages;
        }
      }
    }
  }
  // 1F1B on the first of 4 stages with 6 micro-batches: 3 to fill, then in turn.
  const auto a = pipeline_schedule(PipelineSchedule::k1F1B, 4, 0, 6);
  const std::vector<PipelineAction> expected = {{Kind::kForward, 0}, {Kind::kForward, 1}, {Kind::kForward, 2},
                                                {Kind::kForward, 3}, {Kind::kBackward, 0}, {Kind::kForward, 4},
                                                {Kind::kBackward, 1}, {Kind::kForward, 5}, {Kind::kBackward, 2},
                                                {Kind::kBackward, 3}, {Kind::kBackward, 4}, {Kind::kBackward, 5}};
  EXPECT_EQ(a, expected);
}

// Runs every rank's actions together: a forward of model chunk c needs chunk c - 1's
// forward of the same micro-batch, a backward chunk c + 1's backward (the last
// chunk: its own forward); sends never block. Returns the makespan with forwards
// taking 1 and backwards 2 time units per chunk (a split backward 1 and its W step
// 1), or -1 when the ranks deadlock.
int64_t simulate(PipelineSchedule schedule, int stages, int chunks, int64_t micro, bool zero_bubble = false) {
  chunks = schedule == PipelineSchedule::kDualPipeV ? 2 : chunks;
  std::vector<std::vector<PipelineAction>> actions;
  for (int s = 0; s < stages; ++s) actions.push_back(pipeline_schedule(schedule, stages, s, micro, chunks, zero_bubble));
  const int total = stages * chunks;
  std::map<std::tuple<bool, int64_t, int>, int64_t> done;  // (forward?, micro, model chunk) -> finish time
  std::vector<size_t> next(static_cast<size_t>(stages), 0);
  std::vector<int64_t> clock(static_cast<size_t>(stages), 0);
  for (bool progress = true; progress;) {
    progress = false;
    for (int s = 0; s < stages; ++s) {
      auto& i = next[static_cast<size_t>(s)];
      if (i == actions[static_cast<size_t>(s)].size()) continue;
      const auto& a = actions[static_cast<size_t>(s)][i];
      const int c = pipeline_model_chunk(schedule, stages, s, a.chunk);
      EXPECT_EQ(pipeline_chunk_rank(schedule, stages, c), s);
      auto& t = clock[static_cast<size_t>(s)];
      if (a.kind == Kind::kWeight) {  // needs nothing from another rank
        t += 1;
        ++i;
        progress = true;
        continue;
      }
      const bool forward = a.kind == Kind::kForward;
      std::optional<std::tuple<bool, int64_t, int>> need;
      if (forward && c > 0) need = std::make_tuple(true, a.micro, c - 1);
      if (!forward) need = c + 1 < total ? std::make_tuple(false, a.micro, c + 1) : std::make_tuple(true, a.micro, c);
      int64_t ready = 0;
      if (need) {
        auto it = done.find(*need);
        if (it == done.end()) continue;
        ready = it->second;
      }
      t = std::max(t, ready) + (forward || a.split ? 1 : 2);
      done[{forward, a.micro, c}] = t;
      ++i;
      progress = true;
    }
  }
  for (int s = 0; s < stages; ++s) {
    if (next[static_cast<size_t>(s)] != actions[static_cast<size_t>(s)].size()) return -1;
  }
  return *std::max_element(clock.begin(), clock.end());
}

// Each chunk of a rank's actions: every micro-batch forward once and backward
// once, each in micro-batch order.
void expect_each_chunk_in_order(const std::vector<PipelineAction>& actions, int chunks, int64_t micro) {
  for (int v = 0; v < chunks; ++v) {
    int64_t forward = 0, backward = 0;
    for (const auto& a : actions) {
      if (a.chunk != v || a.kind == Kind::kWeight) continue;
      if (a.kind == Kind::kForward) EXPECT_EQ(a.micro, forward++);
      else EXPECT_EQ(a.micro, backward++);
    }
    EXPECT_EQ(forward, micro) << "chunk " << v;
    EXPECT_EQ(backward, micro) << "chunk " << v;
  }
}

TEST(PipelineSchedule, InterleavedRunsEveryChunkWithoutDeadlockAndShrinksTheBubble) {
  for (int stages : {2, 4}) {
    for (int chunks : {2, 3}) {
      for (int64_t micro : {int64_t{stages}, int64_t{2 * stages}, int64_t{4 * stages}}) {
        SCOPED_TRACE(std::to_string(stages) + " stages x " + std::to_string(chunks) + " chunks, " +
                     std::to_string(micro) + " micro-batches");
        for (int stage = 0; stage < stages; ++stage) {
          const auto actions = pipeline_schedule(PipelineSchedule::kInterleaved1F1B, stages, stage, micro, chunks);
          ASSERT_EQ(actions.size(), static_cast<size_t>(2 * micro * chunks));
          expect_each_chunk_in_order(actions, chunks, micro);
          // Chunk activations held: the warm-up forwards plus one (all of them when M = P).
          const int64_t bound = micro == stages ? micro * chunks : (stages - stage - 1) * 2 + (chunks - 1) * stages + 1;
          EXPECT_EQ(max_in_flight(actions), bound) << "stage " << stage;
        }
        const int64_t makespan = simulate(PipelineSchedule::kInterleaved1F1B, stages, chunks, micro);
        ASSERT_GT(makespan, 0) << "the ranks deadlock";
        // Work per rank: M micro-batches x V chunks x (1 + 2), in chunk units.
        const double work = static_cast<double>(micro * chunks * 3);
        EXPECT_NEAR((static_cast<double>(makespan) - work) / static_cast<double>(makespan),
                    theoretical_bubble(stages, micro, chunks), 1e-12);
        // Against 1F1B on the same work (its chunk is V of these).
        const int64_t plain = simulate(PipelineSchedule::k1F1B, stages, 1, micro) * chunks;
        EXPECT_LT(makespan, plain);
      }
    }
  }
  // The bubble formula at V = 1 is 1F1B's, which the simulation reproduces too.
  EXPECT_NEAR(1.0 - 8.0 * 3 / static_cast<double>(simulate(PipelineSchedule::k1F1B, 4, 1, 8)),
              theoretical_bubble(4, 8), 1e-12);
  // Bad layouts name the keys.
  EXPECT_THROW(pipeline_schedule(PipelineSchedule::kInterleaved1F1B, 4, 0, 6, 2), Error);  // 6 % 4
  EXPECT_THROW(pipeline_schedule(PipelineSchedule::kInterleaved1F1B, 4, 0, 8, 1), Error);
  EXPECT_THROW(pipeline_schedule(PipelineSchedule::k1F1B, 4, 0, 8, 2), Error);
  try {
    pipeline_schedule(PipelineSchedule::kInterleaved1F1B, 4, 0, 6, 2);
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("trainer.grad_accum_steps = 6) to be a multiple of parallel.pipeline_parallel (4)"),
              std::string::npos) << e.message();
  }
}

TEST(PipelineSchedule, DualPipeVRunsTheVWithoutDeadlock) {
  for (int stages : {2, 4, 8}) {
    for (int64_t micro : {int64_t{2 * stages}, int64_t{2 * stages + 1}, int64_t{4 * stages}}) {
      SCOPED_TRACE(std::to_string(stages) + " stages, " + std::to_string(micro) + " micro-batches");
      for (int stage = 0; stage < stages; ++stage) {
        // Rank s holds chunks s and 2P - 1 - s: rank 0 the first and the last.
        EXPECT_EQ(pipeline_model_chunk(PipelineSchedule::kDualPipeV, stages, stage, 0), stage);
        EXPECT_EQ(pipeline_model_chunk(PipelineSchedule::kDualPipeV, stages, stage, 1), 2 * stages - 1 - stage);
        const auto actions = pipeline_schedule(PipelineSchedule::kDualPipeV, stages, stage, micro, 2);
        ASSERT_EQ(actions.size(), static_cast<size_t>(4 * micro));
        expect_each_chunk_in_order(actions, 2, micro);
        EXPECT_EQ(max_in_flight(actions), 2 * stages + 1) << "stage " << stage;
      }
      const int64_t makespan = simulate(PipelineSchedule::kDualPipeV, stages, 2, micro);
      ASSERT_GT(makespan, 0) << "the ranks deadlock";
      // Less idle time than 1F1B on the same work (its stage is two of these chunks).
      EXPECT_LT(makespan, simulate(PipelineSchedule::k1F1B, stages, 1, micro) * 2);
    }
  }
  // The first rank of 2: 2 forwards of chunk 0, then (F0, F1), then the main phase.
  const auto a = pipeline_schedule(PipelineSchedule::kDualPipeV, 2, 0, 4, 2);
  const std::vector<PipelineAction> head = {{Kind::kForward, 0, 0}, {Kind::kForward, 1, 0}, {Kind::kForward, 2, 0},
                                            {Kind::kForward, 0, 1}, {Kind::kBackward, 0, 1}, {Kind::kForward, 1, 1}};
  EXPECT_EQ(std::vector<PipelineAction>(a.begin(), a.begin() + 6), head);
  EXPECT_THROW(pipeline_schedule(PipelineSchedule::kDualPipeV, 4, 0, 7, 2), Error);  // fewer than 2P
}

// DualPipe-V's zero-bubble steps: each split backward's W step comes later on the
// same rank, oldest first, every W step has one; the schedule otherwise keeps the
// same order and bound, and the W steps fill idle time: the simulated step is
// shorter than without them (backward = B + W, each 1 unit).
TEST(PipelineSchedule, DualPipeVZeroBubbleFillsTheBubbleWithWeightSteps) {
  for (int stages : {2, 4, 8}) {
    for (int64_t micro : {int64_t{2 * stages}, int64_t{2 * stages + 1}, int64_t{4 * stages}}) {
      SCOPED_TRACE(std::to_string(stages) + " stages, " + std::to_string(micro) + " micro-batches");
      for (int stage = 0; stage < stages; ++stage) {
        const auto plain = pipeline_schedule(PipelineSchedule::kDualPipeV, stages, stage, micro, 2);
        const auto split = pipeline_schedule(PipelineSchedule::kDualPipeV, stages, stage, micro, 2, true);
        std::vector<PipelineAction> without_w, waiting;
        int64_t splits = 0;
        for (const auto& a : split) {
          if (a.kind == Kind::kWeight) {
            ASSERT_FALSE(waiting.empty()) << "a W step before any split backward";
            EXPECT_EQ(a.micro, waiting.front().micro);
            EXPECT_EQ(a.chunk, waiting.front().chunk);
            waiting.erase(waiting.begin());
            continue;
          }
          if (a.split) waiting.push_back(a), ++splits;
          auto plain_action = a;
          plain_action.split = false;
          without_w.push_back(plain_action);
        }
        EXPECT_TRUE(waiting.empty());
        // Phase 3's and 7's backwards (P - s - 1 each) and half of phase 6's (s + 1).
        EXPECT_EQ(splits, 2 * (stages - stage - 1) + stage + 1) << "stage " << stage;
        EXPECT_EQ(without_w, plain) << "stage " << stage;
        EXPECT_EQ(max_in_flight(split), 2 * stages + 1);
      }
      const int64_t with_w = simulate(PipelineSchedule::kDualPipeV, stages, 2, micro, true);
      const int64_t without = simulate(PipelineSchedule::kDualPipeV, stages, 2, micro);
      ASSERT_GT(with_w, 0) << "the ranks deadlock";
      EXPECT_LT(with_w, without) << "no shorter";
      // Idle share of the step: each rank works 2 chunks x M x (1 + 2) units.
      const double work = 6.0 * static_cast<double>(micro);
      std::printf("dualpipev P=%d M=%lld: simulated bubble %.3f with W steps, %.3f without\n", stages,
                  static_cast<long long>(micro), 1.0 - work / static_cast<double>(with_w),
                  1.0 - work / static_cast<double>(without));
    }
  }
  EXPECT_THROW(pipeline_schedule(PipelineSchedule::k1F1B, 2, 0, 4, 1, true), Error);
}

TEST(PipelineSchedule, StagesBalanceParametersOrFollowTheList) {
  using Bounds = std::vector<int64_t>;
  // Equal blocks: as even as the count allows, the later stages taking the extra one.
  EXPECT_EQ(stage_boundaries(std::vector<int64_t>(8, 100), 1, 1, 4), (Bounds{0, 2, 4, 6, 8}));
  EXPECT_EQ(stage_boundaries(std::vector<int64_t>(5, 100), 0, 0, 2), (Bounds{0, 2, 5}));
  // A large embedding on stage 0 (250: largest stage 350 instead of 450).
  EXPECT_EQ(stage_boundaries(std::vector<int64_t>(4, 100), 250, 0, 2), (Bounds{0, 1, 4}));
  // A dense block, then MoE blocks three times its size: 450 | 650 beats 150 | 950.
  EXPECT_EQ(stage_boundaries({100, 300, 300, 300}, 50, 50, 2), (Bounds{0, 2, 4}));
  EXPECT_EQ(stage_boundaries({100, 300, 300, 300}, 50, 50, 4), (Bounds{0, 1, 2, 3, 4}));
  // parallel.pp_layers wins, and must fit.
  EXPECT_EQ(stage_boundaries(std::vector<int64_t>(4, 100), 0, 0, 2, {3, 1}), (Bounds{0, 3, 4}));
  EXPECT_BRIGADE_ERROR(stage_boundaries(std::vector<int64_t>(4, 100), 0, 0, 2, {3, 2}),
                       "parallel.pp_layers adds up to 5 blocks, but model.n_layers is 4");
  EXPECT_BRIGADE_ERROR(stage_boundaries(std::vector<int64_t>(4, 100), 0, 0, 2, {4}),
                       "parallel.pp_layers lists 1 stages, but parallel.pipeline_parallel is 2");
  EXPECT_BRIGADE_ERROR(stage_boundaries(std::vector<int64_t>(4, 100), 0, 0, 2, {4, 0}), "at least one block");
  EXPECT_BRIGADE_ERROR(stage_boundaries(std::vector<int64_t>(2, 100), 0, 0, 3), "more than model.n_layers (2)");
  EXPECT_EQ(parse_pipeline_schedule("1f1b"), PipelineSchedule::k1F1B);
  EXPECT_THROW(parse_pipeline_schedule("dualpipe"), Error);
}

}  // namespace
}  // namespace brigade::parallel
