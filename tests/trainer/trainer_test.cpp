#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/device.h"
#include "core/fs.h"
#include "core/recompute.h"
#include "recipes/build.h"
#include "recipes/recipe.h"
#include "tests/testing.h"
#include "trainer/checkpoint.h"
#include "trainer/optimizer.h"
#include "trainer/schedule.h"
#include "trainer/trainer.h"

namespace brigade {
namespace {

using testing::TempDir;

// A model small enough that 40 steps take about a second.
recipes::Recipe small_recipe(const std::vector<std::string>& overrides = {}) {
  const std::string yaml = R"(
name: unit
model: {vocab_size: 264, d_model: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 64, max_seq_len: 64}
data: {seq_len: 32, synthetic: {num_problems: 500, eval_problems: 50}}
trainer: {max_steps: 40, micro_batch_size: 4, warmup_steps: 5, lr: 0.01, log_every: 5,
          eval_every: 10, eval_batches: 2, checkpoint_every: 10, keep_checkpoints: 2, threads: 1,
          device: cpu}
)";
  return recipes::parse_recipe(yaml, "unit.yaml", overrides);
}

class LossRecorder : public trainer::TrainerHook {
 public:
  explicit LossRecorder(std::vector<double>* losses) : losses_(losses) {}
  void on_step(trainer::Trainer&, const trainer::StepResult& r) override { losses_->push_back(r.loss); }

 private:
  std::vector<double>* losses_;
};

std::vector<double> train(const recipes::Recipe& recipe, const std::filesystem::path& run_dir,
                          bool resume) {
  std::vector<double> losses;
  auto t = recipes::build_trainer(recipe, run_dir);
  if (resume) {
    auto latest = t->checkpoints().latest();
    EXPECT_TRUE(latest.has_value());
    t->resume(trainer::load_checkpoint(*latest));
  }
  t->add_hook(std::make_unique<LossRecorder>(&losses));
  t->run();
  return losses;
}

TEST(TrainerTest, LossFalls) {
  TempDir dir;
  auto losses = train(small_recipe(), dir.path(), false);
  ASSERT_EQ(losses.size(), 40u);
  double first = (losses[0] + losses[1] + losses[2]) / 3, last = (losses[37] + losses[38] + losses[39]) / 3;
  EXPECT_LT(last, 0.6 * first) << "first " << first << " last " << last;
}

TEST(TrainerTest, Bfloat16ComputeTrainsWithFloat32MasterWeights) {
  TempDir dir;
  auto t = recipes::build_trainer(small_recipe({"precision.compute_dtype=bfloat16", "trainer.max_steps=20"}), dir.path());
  std::vector<double> losses;
  t->add_hook(std::make_unique<LossRecorder>(&losses));
  t->run();
  ASSERT_EQ(losses.size(), 20u);
  for (double l : losses) EXPECT_TRUE(std::isfinite(l));
  EXPECT_LT(losses.back(), 0.8 * losses.front());
  for (const auto& p : t->model()->parameters()) EXPECT_EQ(p.scalar_type(), torch::kFloat);
}

TEST(TrainerTest, ResumeIsBitwiseExact) {
  TempDir dir;
  at::set_num_threads(1);
  const auto straight = train(small_recipe(), dir / "straight", false);
  // 20 steps, stop (the schedule still targets 40), then a fresh trainer resumes.
  const auto first = train(small_recipe({"trainer.stop_after=20"}), dir / "split", false);
  const auto second = train(small_recipe(), dir / "split", true);
  ASSERT_EQ(straight.size(), 40u);
  ASSERT_EQ(first.size(), 20u);
  ASSERT_EQ(second.size(), 20u);
  for (size_t i = 0; i < 20; ++i) EXPECT_EQ(straight[i], first[i]) << "step " << i + 1;
  for (size_t i = 0; i < 20; ++i) EXPECT_EQ(straight[20 + i], second[i]) << "step " << 21 + i;

  // metrics.jsonl of the split run describes every step once, in order.
  std::ifstream in(dir / "split" / "metrics.jsonl");
  std::vector<int64_t> steps;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) steps.push_back(j["step"].get<int64_t>());
  }
  std::vector<int64_t> expected{5, 10, 15, 20, 25, 30, 35, 40};
  EXPECT_EQ(steps, expected);
}

// The same run on the GPU: every parameter and optimizer moment on cuda, the losses
// those of the CPU run up to float32 reduction order, and a split run resumed on the
// GPU (CUDA generator state included) equal to the straight one bit for bit.
TEST(TrainerTest, TrainsOnTheGpuAsOnTheCpuAndResumesBitwise_CUDA) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device (or brigade built without CUDA)";
  TempDir dir;
  const std::vector<std::string> cuda = {"trainer.device=cuda", "trainer.max_steps=20", "trainer.checkpoint_every=10"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.begin(), cuda.begin(), cuda.end());
    return small_recipe(extra);
  };
  const auto on_cpu = train(small_recipe({"trainer.max_steps=20"}), dir / "cpu", false);
  std::vector<double> straight;
  {
    auto t = recipes::build_trainer(with({}), dir / "straight");
    t->add_hook(std::make_unique<LossRecorder>(&straight));
    t->run();
    for (const auto& p : t->model()->parameters()) EXPECT_TRUE(p.is_cuda());
  }
  ASSERT_EQ(straight.size(), 20u);
  ASSERT_EQ(on_cpu.size(), 20u);
  EXPECT_NEAR(straight[0], on_cpu[0], 1e-4 * on_cpu[0]);
  for (size_t i = 0; i < 20; ++i) EXPECT_NEAR(straight[i], on_cpu[i], 2e-2 * on_cpu[i]) << "step " << i + 1;
  const auto first = train(with({"trainer.stop_after=10"}), dir / "split", false);
  const auto second = train(with({}), dir / "split", true);
  ASSERT_EQ(first.size() + second.size(), 20u);
  for (size_t i = 0; i < 10; ++i) EXPECT_EQ(straight[i], first[i]) << "step " << i + 1;
  for (size_t i = 0; i < 10; ++i) EXPECT_EQ(straight[10 + i], second[i]) << "step " << 11 + i;
}

TEST(TrainerTest, Bfloat16AutocastOnTheGpuTrains_CUDA) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device (or brigade built without CUDA)";
  TempDir dir;
  const auto losses = train(small_recipe({"trainer.device=cuda", "precision.compute_dtype=bfloat16",
                                          "trainer.max_steps=20"}), dir.path(), false);
  ASSERT_EQ(losses.size(), 20u);
  for (double l : losses) EXPECT_TRUE(std::isfinite(l));
  EXPECT_LT(losses.back(), 0.8 * losses.front());
}

// The sync-free step: after warm-up, a dense step on the GPU makes the host wait
// once (the step's one read of loss, gradient norm and flags), counted by LibTorch's
// CUDA sync-debug mode; prefetching, clipping, the update and logging add none.
TEST(TrainerTest, OneHostSyncPerDenseStep_CUDA) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device (or brigade built without CUDA)";
  TempDir dir;
  for (const std::string compute : {"float32", "bfloat16"}) {
    auto t = recipes::build_trainer(small_recipe({"trainer.device=cuda", "precision.compute_dtype=" + compute,
                                                  "trainer.grad_accum_steps=2"}), dir / compute);
    t->step();
    t->step();  // warm-up: allocator pools, pinned buffers, cuBLAS handles
    HostSyncCounter syncs;
    for (int i = 0; i < 3; ++i) t->step();
    std::string sites;
    for (const auto& s : syncs.sites()) sites += "\n  " + s;
    EXPECT_LE(syncs.count(), 3) << compute << ": host syncs in 3 steps:" << sites;
  }
}

// A small MoE variant: experts, shared expert, bias balancing, seq aux loss, z-loss.
recipes::Recipe small_moe_recipe(std::vector<std::string> overrides = {}) {
  std::vector<std::string> moe = {"model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_d_ff=16",
                                  "model.moe.first_k_dense=1", "model.moe.bias_update_rate=0.01",
                                  "model.moe.seq_aux_loss=0.001", "model.moe.z_loss=0.0001"};
  moe.insert(moe.end(), overrides.begin(), overrides.end());
  return small_recipe(moe);
}

// MoE on the GPU: the step's one read, plus today one read per MoE layer and
// micro-batch (the per-expert row counts, plan_dispatch); the bound is asserted so
// that any new wait fails here.
TEST(TrainerTest, HostSyncsPerMoEStepAreBounded_CUDA) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device (or brigade built without CUDA)";
  TempDir dir;
  auto t = recipes::build_trainer(small_moe_recipe({"trainer.device=cuda"}), dir.path());
  t->step();
  t->step();
  const auto layers = static_cast<int64_t>(t->model()->moe_layers().size());
  HostSyncCounter syncs;
  t->step();
  std::string sites;
  for (const auto& s : syncs.sites()) sites += "\n  " + s;
  EXPECT_LE(syncs.count(), 1 + layers * t->options().grad_accum_steps) << "host syncs in one step:" << sites;
}

TEST(TrainerTest, MoEResumeIsBitwiseExactBiasesIncluded) {
  TempDir dir;
  at::set_num_threads(1);
  const auto straight = train(small_moe_recipe(), dir / "straight", false);
  const auto first = train(small_moe_recipe({"trainer.stop_after=20"}), dir / "split", false);
  auto t = recipes::build_trainer(small_moe_recipe(), dir / "split");
  auto ck = trainer::load_checkpoint(*t->checkpoints().latest());
  // The expert biases moved and were saved.
  const auto& bias = ck.model.tensors.at("layers.1.mlp.gate.e_score_correction_bias");
  EXPECT_GT(bias.abs().max().item<double>(), 0.0);
  const auto second = train(small_moe_recipe(), dir / "split", true);
  ASSERT_EQ(straight.size(), 40u);
  ASSERT_EQ(second.size(), 20u);
  for (size_t i = 0; i < 20; ++i) EXPECT_EQ(straight[i], first[i]) << "step " << i + 1;
  for (size_t i = 0; i < 20; ++i) EXPECT_EQ(straight[20 + i], second[i]) << "step " << 21 + i;
  EXPECT_LT(straight.back(), straight.front());

  // metrics.jsonl carries per-layer load and the enabled aux terms.
  std::ifstream in(dir / "split" / "metrics.jsonl");
  int lines = 0;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (!j.contains("loss")) continue;
    ++lines;
    ASSERT_TRUE(j.contains("moe_load_max_over_mean")) << line;
    EXPECT_EQ(j["moe_load_max_over_mean"].size(), 1u) << line;  // one MoE layer
    EXPECT_GE(j["moe_load_max_over_mean"][0].get<double>(), 1.0) << line;
    EXPECT_GT(j["moe_seq_aux_loss"].get<double>(), 0.0) << line;
    EXPECT_GT(j["moe_z_loss"].get<double>(), 0.0) << line;
    EXPECT_FALSE(j.contains("moe_dropped_fraction")) << line;
  }
  EXPECT_EQ(lines, 8);
}

// The tiny DeepSeek-V3 shape: MLA, MoE with the selection bias, one MTP module, FP8
// blockwise; loss falls, mtp_loss is logged, and a split run resumes bit for bit.
// A stop request (what SIGTERM / SIGUSR1 set in `brigade train`) ends the run after
// the step it was noticed in, with a checkpoint of that step and no final eval; the
// resumed run reaches the uninterrupted one's losses bit for bit.
TEST(TrainerTest, StopRequestEndsAtAStepBoundaryWithACheckpointAndResumesBitwise) {
  TempDir dir;
  const auto recipe = small_moe_recipe();
  const auto straight = train(recipe, dir / "straight", false);
  std::vector<double> first;
  {
    auto t = recipes::build_trainer(recipe, dir / "stopped");
    t->add_hook(std::make_unique<LossRecorder>(&first));
    int asked = 0;
    t->set_stop_request([&] { return ++asked == 13; });  // noticed during step 13
    t->run();
    EXPECT_TRUE(t->stopped_by_request());
    EXPECT_EQ(t->current_step(), 13);
    ASSERT_TRUE(t->checkpoints().latest().has_value());
    EXPECT_EQ(t->checkpoints().latest()->filename(), "step_00000013");
  }
  const auto second = train(recipe, dir / "stopped", true);
  ASSERT_EQ(first.size(), 13u);
  ASSERT_EQ(first.size() + second.size(), straight.size());
  for (size_t i = 0; i < first.size(); ++i) EXPECT_EQ(first[i], straight[i]) << "step " << i + 1;
  for (size_t i = 0; i < second.size(); ++i) EXPECT_EQ(second[i], straight[13 + i]) << "step " << 14 + i;
}

TEST(TrainerTest, MlaMoEMtpFp8ResumeIsBitwiseExact) {
  TempDir dir;
  at::set_num_threads(1);
  const std::vector<std::string> v3 = {"model.n_kv_heads=0", "model.attention=mla", "model.mla.q_lora_rank=16",
                                       "model.mla.kv_lora_rank=16", "model.mla.qk_nope_head_dim=8",
                                       "model.mla.qk_rope_head_dim=8", "model.mla.v_head_dim=8", "model.mtp.depth=1",
                                       "precision.fp8_recipe=blockwise"};
  auto with = [&](std::vector<std::string> more) {
    more.insert(more.begin(), v3.begin(), v3.end());
    return small_moe_recipe(more);
  };
  const auto straight = train(with({}), dir / "straight", false);
  const auto first = train(with({"trainer.stop_after=20"}), dir / "split", false);
  const auto second = train(with({}), dir / "split", true);
  ASSERT_EQ(straight.size(), 40u);
  ASSERT_EQ(second.size(), 20u);
  for (size_t i = 0; i < 20; ++i) EXPECT_EQ(straight[i], first[i]) << "step " << i + 1;
  for (size_t i = 0; i < 20; ++i) EXPECT_EQ(straight[20 + i], second[i]) << "step " << 21 + i;
  EXPECT_LT(straight.back(), 0.7 * straight.front());

  std::ifstream in(dir / "split" / "metrics.jsonl");
  std::vector<double> mtp;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (!j.contains("loss")) continue;
    ASSERT_TRUE(j.contains("mtp_loss")) << line;
    mtp.push_back(j["mtp_loss"].get<double>());
    EXPECT_EQ(j["moe_load_max_over_mean"].size(), 2u) << line;  // the MoE layer and the MTP module's
  }
  ASSERT_EQ(mtp.size(), 8u);
  EXPECT_GT(mtp.front(), 0.0);
  EXPECT_LT(mtp.back(), mtp.front());
}

TEST(TrainerTest, MoECapacityReportsDroppedTokens) {
  TempDir dir;
  auto t = recipes::build_trainer(small_moe_recipe({"model.moe.dropless=false", "model.moe.capacity_factor=0.5"}),
                                  dir.path());
  auto r = t->step();
  ASSERT_EQ(r.moe.size(), 1u);
  // Half the capacity of a perfect balance: at least half the copies are dropped.
  EXPECT_GE(r.moe[0].dropped_fraction, 0.5);
  EXPECT_LT(r.moe[0].dropped_fraction, 1.0);
  EXPECT_TRUE(std::isfinite(r.loss));
}

TEST(TrainerTest, Fp8DelayedResumeIsBitwiseExactHistoriesIncluded) {
  TempDir dir;
  at::set_num_threads(1);
  const std::vector<std::string> fp8 = {"precision.fp8_recipe=delayed", "precision.fp8_amax_history=4",
                                        "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_d_ff=16",
                                        "model.moe.first_k_dense=1"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.end(), fp8.begin(), fp8.end());
    return small_recipe(extra);
  };
  const auto straight = train(with({}), dir / "straight", false);
  const auto first = train(with({"trainer.stop_after=20"}), dir / "split", false);
  auto ck = trainer::load_checkpoint(*recipes::build_trainer(with({}), dir / "split")->checkpoints().latest());
  EXPECT_TRUE(ck.precision.tensors.contains("layers.0.self_attn.q_proj.input.amax_history"));
  EXPECT_TRUE(ck.precision.tensors.contains("layers.1.mlp.experts.grad_down.amax_history"));
  const auto second = train(with({}), dir / "split", true);
  ASSERT_EQ(second.size(), 20u);
  for (size_t i = 0; i < 20; ++i) EXPECT_EQ(straight[20 + i], second[i]) << "step " << 21 + i;
  EXPECT_LT(straight.back(), straight.front());
}

TEST(TrainerTest, Fp8BlockwiseTracksFloat32Training) {
  TempDir dir;
  const auto plain = train(small_recipe(), dir / "plain", false);
  const auto fp8 = train(small_recipe({"precision.fp8_recipe=blockwise", "precision.fp8_modules=[attention, mlp, lm_head]"}),
                         dir / "fp8", false);
  ASSERT_EQ(fp8.size(), plain.size());
  EXPECT_NE(fp8.back(), plain.back());  // FP8 did change the numbers
  EXPECT_NEAR(fp8.back(), plain.back(), 0.05 * plain.back());
}

TEST(TrainerTest, GradientAccumulationMatchesOneLargeBatchOfTheSameRows) {
  // Accumulating 2 micro-batches of 4 averages the two micro-batch means; with equal
  // token counts that is the mean over the 8 rows, so the update equals a single
  // micro-batch made of the same 8 rows. We check the gradient directly.
  auto recipe = small_recipe({"trainer.grad_accum_steps=2"});
  auto tokenizer = data::make_tokenizer("byte");
  auto corpora = recipes::build_corpora(recipe, *tokenizer);
  data::BatchSampler sampler(corpora.train, recipes::sampler_options(recipe, false));
  auto b0 = sampler.batch(0, 0), b1 = sampler.batch(0, 1);

  auto grads = [&](const std::vector<data::Batch>& batches, int64_t accum) {
    auto model = recipes::build_model(recipe);
    for (const auto& b : batches) {
      auto logits = model->forward(b.inputs);
      auto loss = torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}), b.targets.reshape({-1}));
      (loss / static_cast<double>(accum)).backward();
    }
    return model->embed_tokens->weight.grad().clone();
  };
  data::Batch joined{torch::cat({b0.inputs, b1.inputs}), torch::cat({b0.targets, b1.targets}), 0};
  auto accumulated = grads({b0, b1}, 2);
  auto single = grads({joined}, 1);
  EXPECT_TRUE(torch::allclose(accumulated, single, 1e-5, 1e-7));
}

TEST(TrainerTest, NonFiniteLossAbortsNamingStepAndHint) {
  TempDir dir;
  auto t = recipes::build_trainer(small_recipe(), dir.path());
  t->step();
  {
    torch::NoGradGuard no_grad;
    t->model()->layers[0]->as<model::BlockImpl>()->mlp->up_proj->weight.fill_(NAN);
  }
  try {
    t->step();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("non-finite loss"), std::string::npos) << msg;
    EXPECT_NE(msg.find("at step 2"), std::string::npos) << msg;
    EXPECT_NE(msg.find("in parameter embed_tokens.weight"), std::string::npos) << msg;
    EXPECT_NE(msg.find("trainer.on_nonfinite=skip"), std::string::npos) << msg;
  }
}

// FP8: a NaN reaching a quantizer is noted on the device during the passes and
// reported from the step's one host read, naming the tensor, whatever the
// on_nonfinite policy (an FP8 scale computed from a NaN is no number to skip past).
TEST(TrainerTest, Fp8NonFiniteIsReportedFromTheStepsReadNamingTheTensor) {
  TempDir dir;
  auto t = recipes::build_trainer(small_recipe({"precision.fp8_recipe=blockwise", "trainer.on_nonfinite=skip"}),
                                  dir.path());
  t->step();
  {
    torch::NoGradGuard no_grad;
    t->model()->layers[1]->as<model::BlockImpl>()->mlp->up_proj->weight[0][0] = NAN;
  }
  EXPECT_BRIGADE_ERROR(t->step(), "non-finite value (NaN or Inf) in layers.1.mlp.up_proj");
}

// Skipped steps leave the MoE expert biases where they were (the bias update waits
// for the step's one read, which says whether the step counts).
TEST(TrainerTest, NonFiniteSkipLeavesMoEBiasesUnchanged) {
  TempDir dir;
  auto t = recipes::build_trainer(small_moe_recipe({"trainer.on_nonfinite=skip"}), dir.path());
  auto biases = [&] {
    std::vector<torch::Tensor> out;
    for (const auto& layer : t->model()->moe_layers()) out.push_back(layer->gate->e_score_correction_bias.clone());
    return out;
  };
  t->step();
  const auto moved = biases();
  {
    torch::NoGradGuard no_grad;
    t->model()->embed_tokens->weight[3][0] = NAN;
  }
  const auto r = t->step();
  EXPECT_TRUE(r.skipped);
  const auto after = biases();
  ASSERT_FALSE(after.empty());
  for (size_t i = 0; i < after.size(); ++i) EXPECT_TRUE(torch::equal(after[i], moved[i])) << "layer " << i;
}

TEST(TrainerTest, NonFiniteSkipLeavesParametersUnchanged) {
  TempDir dir;
  auto t = recipes::build_trainer(small_recipe({"trainer.on_nonfinite=skip"}), dir.path());
  torch::Tensor before;
  {
    torch::NoGradGuard no_grad;
    t->model()->embed_tokens->weight[3][0] = NAN;
    before = t->model()->norm->weight.clone();
  }
  auto r = t->step();
  EXPECT_TRUE(r.skipped);
  EXPECT_EQ(t->state().skipped_steps, 1);
  EXPECT_TRUE(torch::equal(before, t->model()->norm->weight));
}

// A step whose logits cannot be allocated (8192 x 32 x 2^20 float32: 1 TiB) stops
// the run with one line naming the step, the device and the keys that cut memory.
TEST(TrainerTest, OutOfMemoryIsOneLineNamingTheStepAndTheKeys) {
  TempDir dir;
  auto t = recipes::build_trainer(small_recipe({"model.vocab_size=1048576", "trainer.micro_batch_size=8192",
                                                "data.synthetic.num_problems=20000"}), dir.path());
  try {
    t->step();
    ADD_FAILURE() << "a 1 TiB allocation succeeded";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("out of memory at step 1 on cpu: "), std::string::npos) << what;
    EXPECT_NE(what.find("you tried to allocate"), std::string::npos) << what;
    EXPECT_NE(what.find("trainer.micro_batch_size"), std::string::npos) << what;
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
  }
  const GpuMemory h200{75LL << 30, 80LL << 30, 141LL << 30};
  const std::string gpu =
      trainer::out_of_memory_message(7, c10::Device(c10::kCUDA, 1), h200, "CUDA out of memory. Tried to allocate 2.00 GiB\nmore");
  EXPECT_EQ(gpu.rfind("out of memory at step 7 on cuda:1 (peak 75 GiB in tensors, 80 GiB reserved, of 141 GiB): "
                      "CUDA out of memory. Tried to allocate 2.00 GiB; to cut memory", 0), 0u) << gpu;
  EXPECT_EQ(gpu.find("more"), std::string::npos) << gpu;
}

// The piece runs again in backward (recomputing() true then) and gives the
// gradients plain autograd gives, into its input and the weights it closes over.
TEST(RecomputeTest, PieceRunsAgainInBackwardWithTheSameGradients) {
  auto w = torch::randn({8, 8}, torch::requires_grad());
  auto x = torch::randn({4, 8}, torch::requires_grad());
  int calls = 0, recomputed = 0;
  Piece piece = [&](const std::vector<torch::Tensor>& in) {
    ++calls;
    recomputed += recomputing() ? 1 : 0;
    return torch::tanh(torch::mm(in[0], w)).square();
  };
  checkpointed(piece, {x}).sum().backward();
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(recomputed, 1);
  const auto dx = x.grad().clone(), dw = w.grad().clone();
  x.mutable_grad() = torch::Tensor();
  w.mutable_grad() = torch::Tensor();
  piece({x}).sum().backward();
  EXPECT_TRUE(torch::equal(x.grad(), dx));
  EXPECT_TRUE(torch::equal(w.grad(), dw));
  {
    torch::NoGradGuard no_grad;
    checkpointed(piece, {x});
  }
  EXPECT_EQ(calls, 4);  // without grad mode: once, nothing kept
}

// Recomputing activations in backward changes memory, not numbers: the same losses
// bit for bit, for the attention core (selective) and whole blocks (full), dense and
// MoE (loads recorded once: the expert biases move identically), FP8 blockwise too.
TEST(TrainerTest, ActivationCheckpointingKeepsTheLossesBitwise) {
  TempDir dir;
  at::set_num_threads(1);
  const std::vector<std::string> short_run = {"trainer.max_steps=8", "trainer.eval_every=0", "trainer.checkpoint_every=0"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.end(), short_run.begin(), short_run.end());
    return extra;
  };
  const std::vector<std::string> no_aux = {"model.moe.seq_aux_loss=0", "model.moe.z_loss=0"};
  for (const auto& variant : std::vector<std::vector<std::string>>{
           {}, {"precision.compute_dtype=bfloat16"}, {"precision.fp8_recipe=blockwise", "precision.fp8_modules=[attention, mlp]"}}) {
    SCOPED_TRACE(variant.empty() ? "float32" : variant[0]);
    const auto plain = train(small_recipe(with(variant)), dir / "plain", false);
    for (const char* mode : {"selective", "full"}) {
      auto v = with(variant);
      v.push_back(std::string("trainer.activation_checkpointing=") + mode);
      const auto recomputed = train(small_recipe(v), dir / mode, false);
      EXPECT_EQ(recomputed, plain) << mode;
      std::filesystem::remove_all(dir / mode);
    }
    std::filesystem::remove_all(dir / "plain");
  }
  auto moe = no_aux;
  moe.push_back("trainer.activation_checkpointing=full");
  const auto plain_moe = train(small_moe_recipe(with(no_aux)), dir / "moe-plain", false);
  EXPECT_EQ(train(small_moe_recipe(with(moe)), dir / "moe-full", false), plain_moe);
  EXPECT_BRIGADE_ERROR(recipes::build_trainer(small_moe_recipe({"trainer.activation_checkpointing=full"}), dir / "x"),
                       "trainer.activation_checkpointing=full does not yet carry the MoE aux losses");
}

TEST(ScheduleTest, WarmupThenCosineToFloor) {
  trainer::CosineSchedule s{1.0, 0.1, 10, 110};
  EXPECT_DOUBLE_EQ(s(0), 0.1);
  EXPECT_DOUBLE_EQ(s(9), 1.0);
  EXPECT_DOUBLE_EQ(s(10), 1.0);
  EXPECT_NEAR(s(60), 0.55, 1e-12);
  EXPECT_NEAR(s(110), 0.1, 1e-12);
  EXPECT_NEAR(s(500), 0.1, 1e-12);
}

TEST(AdamWTest, MatchesTheTextbookUpdate) {
  auto p = torch::tensor({1.0f, -2.0f, 3.0f}).requires_grad_(true);
  auto q = torch::tensor({0.5f}).requires_grad_(true);
  trainer::AdamW opt({{"w", p}, {"b", q}}, {true, false}, {0.9, 0.99, 1e-8, 0.1});
  std::vector<double> pw{1.0, -2.0, 3.0}, m(3, 0.0), v(3, 0.0);
  const double lr = 0.01;
  for (int t = 1; t <= 3; ++t) {
    opt.zero_grad();
    (p * p).sum().backward();  // grad = 2p
    (q * 3.0).sum().backward();
    for (int i = 0; i < 3; ++i) {
      double g = 2 * pw[i];
      pw[i] *= 1 - lr * 0.1;
      m[i] = 0.9 * m[i] + 0.1 * g;
      v[i] = 0.99 * v[i] + 0.01 * g * g;
      double mh = m[i] / (1 - std::pow(0.9, t)), vh = v[i] / (1 - std::pow(0.99, t));
      pw[i] -= lr * mh / (std::sqrt(vh) + 1e-8);
    }
    opt.step(lr);
  }
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(p[i].item<double>(), pw[i], 1e-5);
  // No decay on q: three steps of a constant gradient move it by lr each.
  EXPECT_NEAR(q.item<double>(), 0.5 - 3 * lr, 1e-5);
}

TEST(AdamWTest, Bfloat16MomentsAreRoundedAfterAFloat32Update) {
  // The textbook update in float64, with each moment rounded to bfloat16 after
  // every step (what storing them in bfloat16 means), and the state stored so.
  auto p = torch::tensor({1.0f, -2.0f, 3.3f}).requires_grad_(true);
  trainer::AdamW opt({{"w", p}}, {true}, {0.9, 0.95, 1e-8, 0.1, torch::kBFloat16});
  auto bf16 = [](double x) { return static_cast<double>(torch::tensor(x).to(torch::kBFloat16).item<float>()); };
  std::vector<double> pw{1.0, -2.0, 3.3}, m(3, 0.0), v(3, 0.0);
  for (auto& w : pw) w = static_cast<float>(w);
  const double lr = 0.01;
  for (int t = 1; t <= 4; ++t) {
    opt.zero_grad();
    (p * p).sum().backward();
    for (int i = 0; i < 3; ++i) {
      double g = 2 * pw[i];
      pw[i] *= 1 - lr * 0.1;
      m[i] = 0.9 * m[i] + 0.1 * g;
      v[i] = 0.95 * v[i] + 0.05 * g * g;
      double mh = m[i] / (1 - std::pow(0.9, t)), vh = v[i] / (1 - std::pow(0.95, t));
      pw[i] -= lr * mh / (std::sqrt(vh) + 1e-8);
      m[i] = bf16(m[i]);
      v[i] = bf16(v[i]);
    }
    opt.step(lr);
  }
  auto state = opt.state();
  ASSERT_EQ(state[0].first, "exp_avg.w");
  EXPECT_EQ(state[0].second.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(state[1].second.scalar_type(), torch::kBFloat16);
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(p[i].item<double>(), pw[i], 1e-5);
    // Within one bfloat16 rounding of the reference (the float32 update and the
    // float64 reference may round to neighbouring bfloat16 values).
    EXPECT_NEAR(state[0].second[i].item<double>(), m[i], std::abs(m[i]) * 0x1p-7);
    EXPECT_NEAR(state[1].second[i].item<double>(), v[i], std::abs(v[i]) * 0x1p-7);
  }
}

TEST(TrainerTest, Bfloat16OptimizerStateResumesBitwiseExact) {
  TempDir dir;
  at::set_num_threads(1);
  const std::vector<std::string> bf16 = {"precision.optimizer_state_dtype=bfloat16"};
  const auto straight = train(small_recipe(bf16), dir / "straight", false);
  const auto plain = train(small_recipe(), dir / "plain", false);
  auto with_stop = bf16;
  with_stop.push_back("trainer.stop_after=20");
  train(small_recipe(with_stop), dir / "split", false);
  auto ck = trainer::load_checkpoint(*recipes::build_trainer(small_recipe(bf16), dir / "split")->checkpoints().latest());
  const auto saved = ck.optimizer.all();
  ASSERT_FALSE(saved.empty());
  for (const auto& [name, t] : saved) {
    if (name.starts_with("exp_avg")) EXPECT_EQ(t.scalar_type(), torch::kBFloat16) << name;
  }
  const auto second = train(small_recipe(bf16), dir / "split", true);
  ASSERT_EQ(second.size(), 20u);
  for (size_t i = 0; i < 20; ++i) EXPECT_EQ(straight[20 + i], second[i]) << "step " << 21 + i;
  // bfloat16 moments change the numbers a little, not the training.
  EXPECT_NE(straight.back(), plain.back());
  EXPECT_NEAR(straight.back(), plain.back(), 0.05 * plain.back());
}

// Expert parallelism needs as many ranks as its groups; one process has one.
TEST(TrainerTest, ExpertParallelAloneIsAClearError) {
  TempDir dir;
  EXPECT_BRIGADE_ERROR(recipes::build_trainer(small_recipe({"model.moe.num_experts=4", "model.moe.top_k=2",
                                                            "parallel.expert_parallel=2"}),
                                              dir / "run"),
                       "parallel.expert_parallel (2) must divide the number of ranks (1)");
  EXPECT_FALSE(std::filesystem::exists(dir / "run"));
}

TEST(TrainerTest, WeightDecayMaskExemptsNormsBiasesEmbeddings) {
  auto recipe = small_recipe({"model.qkv_bias=true"});
  auto model = recipes::build_model(recipe);
  model::NamedTensors params;
  for (const auto& it : model->named_parameters()) params.emplace_back(it.key(), it.value());
  auto mask = trainer::weight_decay_mask(params, recipe.trainer);
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& name = params[i].first;
    const bool expect = name.find("embed") == std::string::npos && params[i].second.dim() >= 2;
    EXPECT_EQ(mask[i], expect) << name;
  }
}

TEST(CheckpointTest, KeepsLastKAndLatestPointsToNewest) {
  TempDir dir;
  auto t = recipes::build_trainer(small_recipe({"trainer.max_steps=30"}), dir.path());
  t->run();  // checkpoints at 10, 20, 30 with keep 2
  auto list = t->checkpoints().list();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].filename(), "step_00000020");
  EXPECT_EQ(list[1].filename(), "step_00000030");
  EXPECT_EQ(t->checkpoints().latest()->filename(), "step_00000030");
  EXPECT_EQ(trainer::resolve_checkpoint(dir.path()).filename(), "step_00000030");
  EXPECT_EQ(trainer::resolve_checkpoint(dir / "checkpoints").filename(), "step_00000030");
  auto ck = trainer::load_checkpoint(list[1]);
  EXPECT_EQ(ck.state.step, 30);
  EXPECT_EQ(ck.state.tokens_seen, 30 * 4 * 32);
}

TEST(CheckpointTest, LeftoverTemporaryDirectoryIsIgnored) {
  TempDir dir;
  auto t = recipes::build_trainer(small_recipe({"trainer.max_steps=10"}), dir.path());
  t->run();
  // What a process killed mid-write leaves behind: a partial hidden directory.
  std::filesystem::create_directories(dir / "checkpoints" / ".tmp-step_00000020-999");
  write_file_atomic(dir / "checkpoints" / ".tmp-step_00000020-999" / "model.safetensors", "partial");
  trainer::CheckpointStore store(dir / "checkpoints", 3);
  EXPECT_EQ(store.list().size(), 1u);
  EXPECT_EQ(store.latest()->filename(), "step_00000010");
  EXPECT_NO_THROW(trainer::load_checkpoint(*store.latest()));
}

TEST(CheckpointTest, DifferentModelShapeIsRejected) {
  TempDir dir;
  auto t = recipes::build_trainer(small_recipe({"trainer.max_steps=10"}), dir.path());
  t->run();
  auto other = recipes::build_trainer(small_recipe({"model.d_model=48"}), dir / "other");
  auto ck = trainer::load_checkpoint(*t->checkpoints().latest());
  EXPECT_BRIGADE_ERROR(other->resume(ck), "model.d_model: checkpoint 32, recipe 48");
  auto model = recipes::build_model(small_recipe({"model.d_ff=96"}));
  EXPECT_BRIGADE_ERROR(trainer::load_weights(model->state_dict(), ck.model, "ck"), "different model shape");
}

TEST(CheckpointTest, CorruptTrainerStateIsAClearError) {
  TempDir dir;
  auto t = recipes::build_trainer(small_recipe({"trainer.max_steps=10"}), dir.path());
  t->run();
  auto latest = *t->checkpoints().latest();
  write_file_atomic(latest / "trainer_state.json", "{\"step\": ");
  EXPECT_BRIGADE_ERROR(trainer::load_checkpoint(latest), "trainer_state.json is not valid JSON");
}

}  // namespace
}  // namespace brigade
