// brigade plan: the published DeepSeek-V3 sizes and cost, the state memory of a
// built model, and bad layouts.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "launch/commands.h"
#include "recipes/build.h"
#include "recipes/recipe.h"
#include "tests/testing.h"
#include "trainer/plan.h"

namespace brigade::trainer {
namespace {

recipes::Recipe shipped(const std::string& name, const std::vector<std::string>& overrides = {}) {
  return recipes::load_recipe(std::string(BRIGADE_SOURCE_DIR) + "/recipes/" + name, overrides);
}

TrainingPlan plan_of(const recipes::Recipe& r, const PlanOptions& options) {
  return plan_training({r.model, r.precision, r.parallel, r.trainer, r.data.seq_len}, options);
}

double item(const TrainingPlan& p, const std::string& prefix) {
  for (const auto& m : p.memory)
    if (m.what.starts_with(prefix)) return m.bytes;
  ADD_FAILURE() << "no memory item " << prefix;
  return 0;
}

// DeepSeek-V3 (arXiv 2412.19437): 671B parameters, 37B activated; 14.8T training
// tokens took 2.664M H800 GPU-hours (2.788M with context extension and post-training).
TEST(Plan, DeepSeekV3AsPublished) {
  const auto r = shipped("deepseek-v3-671b.yaml");
  PlanOptions options;
  options.gpus = 2048;
  options.gpu = "h800";
  options.tokens = 14.8e12;
  const auto p = plan_of(r, options);
  EXPECT_NEAR(static_cast<double>(p.main_params.total), 671e9, 0.005 * 671e9);
  const double activated = static_cast<double>(p.main_params.activated - p.main_params.embedding);
  EXPECT_NEAR(activated, 37e9, 0.02 * 37e9);  // 36.63B: the report rounds
  // 6 x 36.6B activated matmul weights (+ the MTP module's) + attention over 4K positions.
  EXPECT_GT(p.flops_per_token, 2.6e11);
  EXPECT_LT(p.flops_per_token, 3.0e11);
  // The report's hours imply a plausible MFU for these FLOPs, and at the default 40%
  // the planner's GPU-hours land near the report's.
  const double implied_mfu = 14.8e12 * p.flops_per_token / (2.664e6 * 3600.0 * 989.4e12);
  EXPECT_GT(implied_mfu, 0.3);
  EXPECT_LT(implied_mfu, 0.6);
  EXPECT_NEAR(p.gpu_hours, 2.664e6, 0.25 * 2.664e6);
  std::cout << "[ measured ] DeepSeek-V3: " << p.main_params.total << " parameters, " << activated
            << " activated; " << p.flops_per_token << " FLOPs/token; the report's 2.664M H800 GPU-hours imply "
            << 100 * implied_mfu << "% MFU\n";
  // Without pipeline parallelism 27B parameters per GPU cannot fit in 80 GB.
  EXPECT_FALSE(p.fits());

  // The report's layout: 16 pipeline stages x 64-way expert parallelism, ZeRO-1 over
  // each stage's 128 data-parallel ranks (2048 GPUs).
  auto layout = shipped("deepseek-v3-671b.yaml", {"parallel.pipeline_parallel=16", "parallel.expert_parallel=64",
                                                   "parallel.zero_stage=1", "trainer.grad_accum_steps=32",
                                                   "parallel.pp_schedule=dualpipev"});
  const auto pp = plan_of(layout, options);
  // A stage holds about 1/16 of the dense parameters and 1/(16 x 64) of the routed
  // experts, the embedding, head and MTP module on its rank 0 as well.
  const double routed = static_cast<double>(p.params.routed), dense = static_cast<double>(p.params.total) - routed;
  const double even = (dense + routed / 64) / 16;
  EXPECT_GT(pp.params_per_gpu, even);
  EXPECT_LT(pp.params_per_gpu, 4 * even);
  // The optimizer state: the stage's dense part over its 128 data-parallel ranks,
  // its experts whole; a small fraction of the unpipelined plan's.
  EXPECT_LT(item(pp, "AdamW moments"), item(p, "AdamW moments") / 10);
  std::cout << "[ measured ] DeepSeek-V3 at PP 16 x EP 64 x ZeRO-1: " << pp.params_per_gpu / 1e9
            << "B parameters held per GPU (an even split: " << even / 1e9 << "B)\n";
}

// Weights, gradients and AdamW state against the parameters of the built model.
TEST(Plan, StateMemoryMatchesTheBuiltModel) {
  const auto r = shipped("tiny-deepseek-v3.yaml", {"parallel.expert_parallel=2", "parallel.zero_stage=1"});
  torch::manual_seed(0);
  model::Transformer built(r.model);
  double numel = 0, routed = 0;
  for (const auto& item : built->named_parameters()) {
    numel += static_cast<double>(item.value().numel());
    if (item.key().find("mlp.experts.") != std::string::npos) routed += static_cast<double>(item.value().numel());
  }
  PlanOptions options;
  options.gpus = 4;
  const auto p = plan_of(r, options);
  const double held = numel - routed / 2;  // every dense weight, half the experts
  EXPECT_DOUBLE_EQ(p.params_per_gpu, held);
  EXPECT_DOUBLE_EQ(item(p, "weights"), 4 * held);
  EXPECT_DOUBLE_EQ(item(p, "gradients"), 4 * held);
  // ZeRO-1: dense moments over all 4 GPUs; each rank keeps its half of the experts' whole.
  EXPECT_DOUBLE_EQ(item(p, "AdamW"), 8 * ((numel - routed) / 4 + routed / 2));
  EXPECT_GT(item(p, "MoE all-to-all"), 0.0);

  // Activations grow with the micro batch; full checkpointing keeps much less.
  const auto more = plan_of(shipped("tiny-deepseek-v3.yaml", {"parallel.expert_parallel=2", "trainer.micro_batch_size=32"}), options);
  EXPECT_DOUBLE_EQ(item(more, "activations"), 2 * item(p, "activations"));
  const auto full = plan_of(shipped("tiny-deepseek-v3.yaml", {"parallel.expert_parallel=2",
                                                              "trainer.activation_checkpointing=full"}), options);
  EXPECT_LT(item(full, "activations"), 0.7 * item(p, "activations"));
}

// What one training process held at its peak (memory.json: the live heap above the
// start, model included) against brigade plan's total for the same recipe, within
// 15%: a model whose state dominates, one whose activations do, one between (tied
// head, selective recomputation), and an MoE (FP32 compute, as on CPUs). The live heap is sampled after each forward,
// backward and update, so a peak inside backward (full recomputation's re-run block)
// is not measured: that layout is not compared here.
TEST(Plan, PredictsTheMeasuredTrainingPeak) {
  testing::TempDir dir;
  const std::string yaml = R"(
name: memory
model: {vocab_size: 264, n_heads: 4, n_kv_heads: 2, max_seq_len: 256}
data: {synthetic: {num_problems: 300, eval_problems: 20}}
trainer: {max_steps: 2, warmup_steps: 1, log_every: 1, eval_every: 0, eval_batches: 1, checkpoint_every: 0, threads: 1}
)";
  const std::vector<std::vector<std::string>> cases = {
      {"model.d_model=256", "model.n_layers=4", "model.d_ff=1024", "data.seq_len=32", "trainer.micro_batch_size=2"},
      {"model.d_model=64", "model.n_layers=2", "model.d_ff=192", "data.seq_len=256", "trainer.micro_batch_size=32"},
      {"model.d_model=128", "model.n_layers=3", "model.d_ff=384", "data.seq_len=128", "trainer.micro_batch_size=16",
       "model.tie_embeddings=true"},
      {"model.d_model=128", "model.n_layers=3", "model.d_ff=384", "data.seq_len=128", "trainer.micro_batch_size=16",
       "trainer.activation_checkpointing=selective"},
      {"model.d_model=128", "model.n_layers=3", "model.d_ff=384", "data.seq_len=128", "trainer.micro_batch_size=16",
       "model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.expert_d_ff=96", "model.moe.num_shared_experts=1",
       "model.moe.first_k_dense=1"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto r = recipes::parse_recipe(yaml, "memory.yaml", cases[i]);
    const auto run = dir / ("run" + std::to_string(i));
    recipes::build_trainer(r, run)->run();
    const auto memory = nlohmann::json::parse(read_file(run / "memory.json"));
    const double measured = memory["peak_training_mib"][0].get<double>();
    const double planned = plan_of(r, PlanOptions{}).memory_total() / (1 << 20);
    EXPECT_DOUBLE_EQ(memory["planned_mib"].get<double>(), planned) << "case " << i;
    EXPECT_NEAR(measured / planned, 1.0, 0.15) << "case " << i << ": measured " << measured << " MiB, planned " << planned;
    std::printf("case %zu: measured %.1f MiB, planned %.1f MiB, ratio %.3f\n", i, measured, planned, measured / planned);
  }
}

TEST(Plan, BadLayoutsAndOptionsAreErrors) {
  const auto r = shipped("deepseek-v3-671b.yaml", {"parallel.expert_parallel=64"});
  PlanOptions options;
  options.gpus = 96;
  EXPECT_BRIGADE_ERROR(plan_of(r, options), "parallel.expert_parallel (64) must divide --gpus (96)");
  options.gpus = 64;
  options.gpu = "a100";
  EXPECT_BRIGADE_ERROR(plan_of(r, options), "--gpu 'a100'");
  options.gpu = "h200";
  options.mfu = 1.5;
  EXPECT_BRIGADE_ERROR(plan_of(r, options), "--mfu");
  EXPECT_DOUBLE_EQ(launch::parse_count("14.8T", "--tokens"), 14.8e12);
  EXPECT_DOUBLE_EQ(launch::parse_count("2e9", "--tokens"), 2e9);
  EXPECT_BRIGADE_ERROR(launch::parse_count("12X", "--tokens"), "unknown suffix 'X'");
  EXPECT_BRIGADE_ERROR(launch::parse_count("lots", "--tokens"), "is not a number");
}

TEST(Plan, CommandPrintsThePlan) {
  const std::string recipe = std::string(BRIGADE_SOURCE_DIR) + "/recipes/deepseek-v3-671b.yaml";
  auto run = testing::run_brigade("plan " + recipe + " --gpus 2048 --gpu h800 --tokens 14.8T");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  for (const char* want : {"671B total, 36.6B activated per token", "with MTP", "2048 x h800", "does not fit",
                           "GPU-hours", "14.8T"})
    EXPECT_NE(run.output.find(want), std::string::npos) << want << "\n" << run.output;
  auto bad = testing::run_brigade("plan " + recipe + " --gpu v100");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("--gpu 'v100'"), std::string::npos) << bad.output;
}

}  // namespace
}  // namespace brigade::trainer
