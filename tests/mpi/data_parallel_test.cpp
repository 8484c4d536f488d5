// Data parallelism: N ranks x micro-batch b reach the parameters of 1 rank x N*b
// (the global batch is the same rows), with and without gradient accumulation,
// dense and MoE (expert biases from global loads stay identical on every rank).
// Runs under mpirun (CTest: 2 and 4 ranks); skips when started alone.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include <torch/torch.h>

#include "launch/world.h"
#include "parallel/communicator.h"
#include "recipes/build.h"
#include "recipes/recipe.h"
#include "tests/testing.h"

namespace brigade {
namespace {

parallel::Communicator* world() {
  static std::unique_ptr<parallel::Communicator> w = []() -> std::unique_ptr<parallel::Communicator> {
    const auto d = launch::detect_world();
    if (d.world.size < 2) return nullptr;
    return parallel::make_world_communicator(d.world, {parallel::Backend::kMpi, std::chrono::seconds(120)});
  }();
  return w.get();
}

recipes::Recipe recipe(int64_t micro_batch, std::vector<std::string> extra) {
  const std::string yaml = R"(
name: dp
model: {vocab_size: 264, d_model: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 64, max_seq_len: 64}
data: {seq_len: 32, synthetic: {num_problems: 500, eval_problems: 50}}
trainer: {max_steps: 5, warmup_steps: 2, lr: 0.01, log_every: 1, eval_every: 0, eval_batches: 1,
          checkpoint_every: 0, threads: 1}
)";
  extra.push_back("trainer.micro_batch_size=" + std::to_string(micro_batch));
  return recipes::parse_recipe(yaml, "dp.yaml", extra);
}

// ||a - b|| / ||b|| over the whole parameter vector (every parameter and buffer).
// Per tensor the ratio is larger for tensors of tiny norm; `worst` names the largest.
double relative_difference(const model::NamedTensors& a, const model::NamedTensors& b, std::string* worst) {
  double diff = 0.0, norm = 0.0, worst_ratio = -1.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = (a[i].second - b[i].second).to(torch::kDouble).norm().item<double>();
    const double n = b[i].second.to(torch::kDouble).norm().item<double>();
    diff += d * d;
    norm += n * n;
    if (d / std::max(n, 1e-30) > worst_ratio) {
      worst_ratio = d / std::max(n, 1e-30);
      *worst = a[i].first + " " + std::to_string(worst_ratio);
    }
  }
  return std::sqrt(diff) / std::sqrt(norm);
}

void check_equivalence(const std::vector<std::string>& extra) {
  auto* w = world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  at::set_num_threads(1);
  testing::TempDir dir;
  const int64_t b = 2;
  auto parallel_run = recipes::build_trainer(recipe(b, extra), dir / "dp", w);
  parallel_run->run();
  // The reference: this process alone with the whole global batch.
  auto single_run = recipes::build_trainer(recipe(b * w->size(), extra), dir / "single");
  single_run->run();
  std::string worst;
  const double diff = relative_difference(parallel_run->model()->state_dict(), single_run->model()->state_dict(), &worst);
  EXPECT_LE(diff, 1e-6) << "rank " << w->rank() << "; worst tensor " << worst;
  EXPECT_GT(diff, 0.0);  // float32 sums in another order: equal in value, not bit for bit
  if (w->rank() == 0) std::printf("relative difference %.3g (worst tensor: %s)\n", diff, worst.c_str());
  // Every rank holds the same parameters: rank 0's checksum everywhere.
  double sum = 0.0;
  for (const auto& [name, t] : parallel_run->model()->state_dict()) sum += t.to(torch::kDouble).sum().item<double>();
  auto mine = torch::tensor({sum}, torch::kDouble);
  auto all = torch::empty({w->size()}, torch::kDouble);
  w->all_gather(mine, all).wait();
  for (int r = 1; r < w->size(); ++r) EXPECT_EQ(all[r].item<double>(), all[0].item<double>()) << "rank " << r;
}

TEST(MpiDataParallel, MatchesOneRankWithTheWholeBatch) { check_equivalence({}); }

TEST(MpiDataParallel, MatchesWithGradientAccumulationAndSmallBuckets) {
  check_equivalence({"trainer.grad_accum_steps=2", "parallel.bucket_mb=0.01"});
}

TEST(MpiDataParallel, MoEBiasesFollowTheGlobalLoad) {
  check_equivalence({"model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_d_ff=16",
                     "model.moe.first_k_dense=1", "model.moe.bias_update_rate=0.01"});
}

}  // namespace
}  // namespace brigade
