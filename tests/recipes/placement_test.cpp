// Where a rank computes and how ranks talk, decided before any work: the device
// from trainer.device and the node's GPUs, the back end from parallel.backend, the
// FP8 checks, the thread count. Plain logic over MachineFacts, so every GPU case is
// tested here without a GPU.
#include <gtest/gtest.h>

#include "core/device.h"
#include "parallel/communicator.h"
#include "parallel/options.h"
#include "recipes/build.h"
#include "recipes/recipe.h"
#include "tests/testing.h"

namespace brigade::recipes {
namespace {

Recipe recipe(const std::vector<std::string>& overrides = {}) {
  return parse_recipe("", "placement_test", overrides);
}

// A node with `gpus` Hopper GPUs (sm_90) and 16 cores; this rank is local rank
// `local_rank` of `local_ranks`, in a world of `world_size`.
MachineFacts node(int gpus, int local_rank = 0, int local_ranks = 1, int world_size = 1, int capability = 90) {
  MachineFacts m;
  m.world.rank = local_rank;
  m.world.size = world_size;
  m.world.local_rank = local_rank;
  m.world.local_size = local_ranks;
  m.devices.local_rank = local_rank;
  m.devices.local_ranks = local_ranks;
  m.devices.capabilities.assign(static_cast<size_t>(gpus), capability);
  m.devices.cuda_built = true;
  m.cores = 16;
  m.nccl_built = true;
  return m;
}

TEST(Placement, AutoIsTheLocalRanksGpuOrTheCpu) {
  const Placement alone = plan_placement(recipe(), node(0));
  EXPECT_TRUE(alone.device.is_cpu());
  EXPECT_EQ(alone.backend, parallel::Backend::kSingle);
  EXPECT_EQ(alone.threads, 16);

  const Placement third = plan_placement(recipe(), node(4, /*local_rank=*/2, /*local_ranks=*/4, /*world=*/8));
  EXPECT_EQ(third.device, c10::Device(c10::kCUDA, 2));
  EXPECT_EQ(third.backend, parallel::Backend::kNccl);
  EXPECT_EQ(third.threads, 4);  // the node's cores shared by its ranks

  const Placement cpu = plan_placement(recipe({"trainer.device=cpu", "trainer.threads=3"}), node(4, 1, 2, 2));
  EXPECT_TRUE(cpu.device.is_cpu());
  EXPECT_EQ(cpu.backend, parallel::Backend::kMpi);
  EXPECT_EQ(cpu.threads, 3);
}

TEST(Placement, ImpossibleRequestsNameTheKey) {
  EXPECT_BRIGADE_ERROR(plan_placement(recipe({"trainer.device=cuda"}), node(0)),
                       "trainer.device is cuda but no GPU is visible");
  MachineFacts no_cuda = node(0);
  no_cuda.devices.cuda_built = false;
  EXPECT_BRIGADE_ERROR(plan_placement(recipe({"trainer.device=cuda"}), no_cuda), "built without the CUDA toolkit");
  EXPECT_BRIGADE_ERROR(plan_placement(recipe(), node(2, 0, 3, 3)), "3 ranks of this job run on this node but only 2 GPU(s)");
  EXPECT_BRIGADE_ERROR(plan_placement(recipe({"parallel.backend=nccl"}), node(0, 0, 2, 2)),
                       "parallel.backend is nccl but this run computes on cpu");
  EXPECT_BRIGADE_ERROR(plan_placement(recipe({"parallel.backend=mpi"}), node(2, 0, 2, 2)),
                       "parallel.backend is mpi but this run computes on cuda:0");
  MachineFacts no_nccl = node(2, 1, 2, 2);
  no_nccl.nccl_built = false;
  EXPECT_BRIGADE_ERROR(plan_placement(recipe(), no_nccl), "needs NCCL");
  // Alone on a GPU, mpi is no back end at all: accepted.
  EXPECT_EQ(plan_placement(recipe({"parallel.backend=mpi"}), node(1)).backend, parallel::Backend::kSingle);
}

TEST(Placement, Fp8NeedsAnFp8GpuAndTheKernelOptIn) {
  const std::vector<std::string> fp8 = {"precision.fp8_recipe=blockwise"};
  EXPECT_BRIGADE_ERROR(plan_placement(recipe(fp8), node(1, 0, 1, 1, /*capability=*/80)), "GPU 0 is sm_80");
  EXPECT_BRIGADE_ERROR(plan_placement(recipe({"parallel.ep_fp8_dispatch=true"}), node(1, 0, 1, 1, 86)),
                       "parallel.ep_fp8_dispatch is true but GPU 0 is sm_86");
  EXPECT_BRIGADE_ERROR(plan_placement(recipe(fp8), node(1)), "precision.fp8_cuda_kernels=true");
  auto opted_in = fp8;
  opted_in.push_back("precision.fp8_cuda_kernels=true");
  EXPECT_TRUE(plan_placement(recipe(opted_in), node(1, 0, 1, 1, 89)).device.is_cuda());
  // Emulated FP8 on the CPU needs neither.
  auto on_cpu = fp8;
  on_cpu.push_back("trainer.device=cpu");
  EXPECT_TRUE(plan_placement(recipe(on_cpu), node(1, 0, 1, 1, 80)).device.is_cpu());
}

TEST(Placement, BadNamesAreErrors) {
  EXPECT_BRIGADE_ERROR(recipe({"trainer.device=tpu"}), "trainer.device");
  EXPECT_BRIGADE_ERROR(recipe({"parallel.backend=gloo"}), "parallel.backend");
}

TEST(Placement, TheSingleCommunicatorMovesCpuTensors) {
  auto single = parallel::make_world_communicator({}, {parallel::Backend::kSingle, std::chrono::seconds(5)});
  EXPECT_TRUE(single->device().is_cpu());
}

}  // namespace
}  // namespace brigade::recipes
