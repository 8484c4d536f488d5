// Pipeline schedules: every micro-batch forward then backward once, backwards in
// micro-batch order, and the activations a stage holds bounded as each schedule
// promises; stages split the blocks evenly.
#include <gtest/gtest.h>

#include "core/error.h"
#include "parallel/pipeline.h"

namespace brigade::parallel {
namespace {

using Kind = PipelineAction::Kind;
using Range = std::pair<int64_t, int64_t>;

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

TEST(PipelineSchedule, StagesSplitTheBlocksEvenly) {
  EXPECT_EQ(stage_layers(8, 4, 0), (Range{0, 2}));
  EXPECT_EQ(stage_layers(8, 4, 3), (Range{6, 8}));
  EXPECT_EQ(stage_layers(5, 2, 0), (Range{0, 3}));
  EXPECT_EQ(stage_layers(5, 2, 1), (Range{3, 5}));
  EXPECT_EQ(parse_pipeline_schedule("1f1b"), PipelineSchedule::k1F1B);
  EXPECT_THROW(parse_pipeline_schedule("dualpipe"), Error);
}

}  // namespace
}  // namespace brigade::parallel
