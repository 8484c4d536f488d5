// Pipeline schedules: every micro-batch forward then backward once, backwards in
// micro-batch order, and the activations a stage holds bounded as each schedule
// promises; stages split the blocks by parameters, or as parallel.pp_layers lists.
#include <gtest/gtest.h>

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
