// The NCCL communicator: world-of-one collectives on a GPU (opt-in by the _CUDA
// suffix; they skip without one), and the clear error without a GPU.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "core/device.h"
#include "parallel/communicator.h"
#include "tests/testing.h"

namespace brigade::parallel {
namespace {

TEST(NcclCommunicator, WithoutAGpuIsAClearError) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a GPU is visible";
  EXPECT_BRIGADE_ERROR(make_world_communicator(World{}, {Backend::kNccl, std::chrono::seconds(5)}), "NCCL");
}

TEST(NcclCommunicator, WorldOfOneCollectives_CUDA) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no GPU";
  auto world = make_world_communicator(World{}, {Backend::kNccl, std::chrono::seconds(30)});
  EXPECT_EQ(world->backend(), Backend::kNccl);
  auto t = torch::arange(12, torch::TensorOptions().dtype(torch::kFloat).device(torch::kCUDA)).view({4, 3});
  auto before = t.clone();
  world->all_reduce(t, ReduceOp::kSum).wait();
  EXPECT_TRUE(torch::equal(t, before));
  auto out = torch::empty_like(t);
  world->all_to_all(t, {4}, out, {4}).wait();
  EXPECT_TRUE(torch::equal(out, before));
  out.zero_();
  world->all_gather(t, out).wait();
  EXPECT_TRUE(torch::equal(out, before));
  auto bf = t.to(torch::kBFloat16);
  world->broadcast(bf, 0).wait();
  world->barrier().wait();
  auto sub = world->split(0, 0, "dp");
  EXPECT_EQ(sub->size(), 1);
  auto cpu = torch::ones({2});
  EXPECT_BRIGADE_ERROR(world->all_reduce(cpu, ReduceOp::kSum), "contiguous tensors on cuda");
}

}  // namespace
}  // namespace brigade::parallel
