// The single-process communicator (a real world of one: collectives are
// identities) and the checks every back end shares; launcher environment parsing.
#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>

#include <torch/torch.h>

#include "launch/world.h"
#include "parallel/communicator.h"
#include "tests/testing.h"

namespace brigade::parallel {
namespace {

std::unique_ptr<Communicator> single() {
  return make_world_communicator(World{}, {Backend::kSingle, std::chrono::seconds(5)});
}

TEST(SingleCommunicator, CollectivesAreIdentities) {
  auto world = single();
  EXPECT_EQ(world->rank(), 0);
  EXPECT_EQ(world->size(), 1);
  auto t = torch::arange(6, torch::kFloat).view({3, 2});
  auto before = t.clone();
  world->all_reduce(t, ReduceOp::kSum).wait();
  EXPECT_TRUE(torch::equal(t, before));
  auto out = torch::empty_like(t);
  world->reduce_scatter(t, out, ReduceOp::kSum).wait();
  EXPECT_TRUE(torch::equal(out, before));
  out.zero_();
  world->all_gather(t, out).wait();
  EXPECT_TRUE(torch::equal(out, before));
  world->broadcast(t, 0).wait();
  out.zero_();
  world->all_to_all(t, {3}, out, {3}).wait();
  EXPECT_TRUE(torch::equal(out, before));
  world->barrier().wait();
  auto sub = world->split(0, 0, "dp");
  EXPECT_EQ(sub->name(), "dp");
  EXPECT_EQ(sub->size(), 1);
}

TEST(SingleCommunicator, BadArgumentsNameTheOperationAndGroup) {
  auto world = single();
  auto t = torch::zeros({4, 2});
  auto wrong = torch::zeros({3, 2});
  EXPECT_BRIGADE_ERROR(world->reduce_scatter(t, wrong, ReduceOp::kSum), "reduce_scatter on rank 0/1 of world");
  EXPECT_BRIGADE_ERROR(world->all_gather(t, wrong), "all_gather on rank 0/1 of world");
  EXPECT_BRIGADE_ERROR(world->all_to_all(t, {4, 0}, t, {4}), "one send and one receive count per rank");
  EXPECT_BRIGADE_ERROR(world->all_to_all(t, {3}, wrong, {3}), "must have 3 rows");
  EXPECT_BRIGADE_ERROR(world->broadcast(t, 1), "root 1 is not a rank");
  EXPECT_BRIGADE_ERROR(world->send(t, 0, 0), "peer rank 0 is not another rank");
  EXPECT_BRIGADE_ERROR(make_world_communicator(World{0, 2, 0}, {Backend::kSingle, std::chrono::seconds(5)}),
                       "cannot serve a world of 2 ranks");
}

// Sets environment variables for its lifetime (restoring the previous values).
class ScopedEnv {
 public:
  ScopedEnv(std::vector<std::pair<std::string, std::string>> vars) {
    for (auto& [k, v] : vars) {
      const char* old = std::getenv(k.c_str());
      saved_.emplace_back(k, old ? std::optional<std::string>(old) : std::nullopt);
      setenv(k.c_str(), v.c_str(), 1);
    }
  }
  ~ScopedEnv() {
    for (auto& [k, v] : saved_) {
      if (v) setenv(k.c_str(), v->c_str(), 1);
      else unsetenv(k.c_str());
    }
  }

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

TEST(LaunchWorld, ReadsSlurmAndPmiAndRejectsNonsense) {
  if (std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr) GTEST_SKIP() << "running under mpirun";
  {
    ScopedEnv env({{"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"}});
    auto d = launch::detect_world();
    EXPECT_EQ(d.source, "Slurm");
    EXPECT_EQ(d.world.rank, 3);
    EXPECT_EQ(d.world.size, 8);
    EXPECT_EQ(d.world.local_rank, 1);
    EXPECT_EQ(d.world.local_size, 2);  // no per-node count: as many as the local rank implies
  }
  {
    ScopedEnv env({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"},
                   {"SLURM_STEP_TASKS_PER_NODE", "4(x2)"}});
    EXPECT_EQ(launch::detect_world().world.local_size, 4);
  }
  {
    ScopedEnv env({{"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "2"}});
    auto d = launch::detect_world();
    EXPECT_EQ(d.world.local_rank, 1);
    EXPECT_EQ(d.world.local_size, 2);
  }
  {
    ScopedEnv env({{"LOCAL_RANK", "2"}, {"LOCAL_WORLD_SIZE", "2"}});
    EXPECT_BRIGADE_ERROR(launch::detect_world(), "local rank 2 of 2 ranks on this node");
  }
  if (std::getenv("SLURM_PROCID") == nullptr) {
    ScopedEnv env({{"PMI_RANK", "1"}, {"PMI_SIZE", "2"}, {"MPI_LOCALRANKID", "1"}});
    auto d = launch::detect_world();
    EXPECT_EQ(d.source, "PMI");
    EXPECT_EQ(d.world.rank, 1);
    EXPECT_EQ(d.world.size, 2);
  }
  {
    ScopedEnv env({{"SLURM_PROCID", "x1"}, {"SLURM_NTASKS", "8"}});
    EXPECT_BRIGADE_ERROR(launch::detect_world(), "SLURM_PROCID='x1' is not a rank");
  }
  {
    ScopedEnv env({{"SLURM_PROCID", "8"}, {"SLURM_NTASKS", "8"}});
    EXPECT_BRIGADE_ERROR(launch::detect_world(), "rank 8 of 8: not a valid rank");
  }
}

}  // namespace
}  // namespace brigade::parallel
