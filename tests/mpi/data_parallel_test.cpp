// Data parallelism: N ranks x A micro-batches of b rows reach the parameters of
// 1 rank x N*A micro-batches of b rows bit for bit (the same rows, the gradients
// added in the canonical order of parallel/ordered_sum.h), with and without
// gradient accumulation, dense and MoE (expert biases from global loads), and with
// ZeRO-1, 2 and 3; ZeRO checkpoints resume exactly on the same ranks and reshard
// onto another number of ranks or another stage. ZeRO-3 holds at most two blocks
// whole at once. Expert parallelism moves the experts' sums
// between ranks and stays within a bound derived below.
// Runs under mpirun (CTest: 2 and 4 ranks); skips when started alone.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "launch/commands.h"
#include "model/hf.h"
#include "model/safetensors.h"
#include "parallel/communicator.h"
#include "parallel/ordered_sum.h"
#include "recipes/build.h"
#include "recipes/recipe.h"
#include "tests/distill/kd_fixture.h"
#include "tests/mpi/mpi_world.h"
#include "tests/testing.h"

namespace brigade {
namespace {

using testing::mpi_world;

recipes::Recipe recipe(int64_t micro_batch, std::vector<std::string> extra, int64_t accum = 1) {
  const std::string yaml = R"(
name: dp
model: {vocab_size: 264, d_model: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 64, max_seq_len: 64}
data: {seq_len: 32, synthetic: {num_problems: 500, eval_problems: 50}}
trainer: {max_steps: 5, warmup_steps: 2, lr: 0.01, log_every: 1, eval_every: 0, eval_batches: 1,
          checkpoint_every: 0, threads: 1}
)";
  extra.push_back("trainer.micro_batch_size=" + std::to_string(micro_batch));
  if (accum > 1) extra.push_back("trainer.grad_accum_steps=" + std::to_string(accum));
  return recipes::parse_recipe(yaml, "dp.yaml", extra);
}

const std::vector<std::string> kMoE = {"model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_d_ff=16",
                                       "model.moe.first_k_dense=1", "model.moe.bias_update_rate=0.01"};

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

// Every rank holds the same parameters: rank 0's checksum everywhere.
void expect_same_on_every_rank(parallel::Communicator& w, trainer::Trainer& t) {
  double sum = 0.0;
  for (const auto& [name, p] : t.model()->state_dict()) sum += p.to(torch::kDouble).sum().item<double>();
  auto mine = torch::tensor({sum}, torch::kDouble);
  auto all = torch::empty({w.size()}, torch::kDouble);
  w.all_gather(mine, all).wait();
  for (int r = 1; r < w.size(); ++r) EXPECT_EQ(all[r].item<double>(), all[0].item<double>()) << "rank " << r;
}

// A directory every rank sees: rank 0's TempDir, its path broadcast (rank 0 keeps
// it alive and removes it; the others only use it).
class SharedDir {
 public:
  explicit SharedDir(parallel::Communicator& w) : w_(w) {
    if (w.rank() == 0) owned_ = std::make_unique<testing::TempDir>();
    auto bytes = torch::zeros({4096}, torch::kUInt8);
    if (w.rank() == 0) {
      const auto text = owned_->path().string();
      std::memcpy(bytes.data_ptr(), text.data(), text.size());
    }
    w.broadcast(bytes, 0).wait();
    path_ = std::string(reinterpret_cast<const char*>(bytes.data_ptr()));
  }
  ~SharedDir() { w_.barrier().wait(); }  // nobody still reads when rank 0 removes it
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  parallel::Communicator& w_;
  std::unique_ptr<testing::TempDir> owned_;
  std::filesystem::path path_;
};

// The trained weights as a checkpoint holds them (whole expert tensors under
// expert parallelism), in `order`'s order.
model::NamedTensors saved_weights(const std::filesystem::path& run, const model::NamedTensors& order) {
  const auto ck = trainer::load_checkpoint(trainer::resolve_checkpoint(run));
  model::NamedTensors out;
  for (const auto& [name, t] : order) out.emplace_back(name, ck.model.tensors.at(name));
  return out;
}

// Every tensor of `a` equals the same tensor of `b` bit for bit.
void expect_identical(const model::NamedTensors& a, const model::NamedTensors& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  int64_t differing = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].first, b[i].first) << what;
    if (!torch::equal(a[i].second, b[i].second)) {
      ADD_FAILURE() << what << ": " << a[i].first << " differs, max |diff| "
                    << (a[i].second - b[i].second).abs().max().item<double>();
      if (++differing == 3) return;
    }
  }
}

// Expert parallelism changes which GEMM adds which tokens (an expert's rows come
// from every rank of its group), so the weights agree in value, not in bits. The
// bound: a float32 GEMM or sum over n terms is off by at most about n * 2^-24 of
// the sum of magnitudes; the largest sums here are the expert weight gradients,
// n <= 8 ranks x 2 x 32 tokens x top-2 = 1024 terms, so one step's gradient moves
// by at most ~6e-5 relative (random rounding: ~sqrt(n) * 2^-24 = 2e-6). AdamW's
// update is lr * m / (sqrt(v) + eps), of bounded size whatever the gradient, so a
// relative gradient error e moves each parameter by at most ~lr * e per step
// where the gradient is large, and by up to lr where it is near 0 and its sign
// flips. Over 5 steps at lr 0.01 on weights of norm ~1 that is ~5 * 0.01 * 6e-5 =
// 3e-6 from rounding, and the rare sign flips of near-zero gradients add at most
// lr * sqrt(flipped elements / all elements); measured 3.5e-8 to 7.1e-8 at 2 and 4 ranks
// (2026-12-02, AVX-512 machine, and under every scripts/portable.sh configuration). A lost or
// double-counted micro-batch is ~1e-2.
constexpr double kExpertParallelBound = 3e-5;

// ZeRO-2 and 3 with gradient accumulation add each micro-batch's sums over the
// ranks first, then the micro-batches (parallel/reducer.h), where one process adds
// its micro-batches in the canonical order: a few float32 roundings per gradient
// element per step (relative ~1e-7), which AdamW carries as in the bound above.
constexpr double kMicroBatchMajorBound = 1e-6;

// `parallel_only`: settings of the parallel run alone (the reference is one
// process with every micro-batch of the step, b rows each). `bound`: 0 for bit
// for bit (expert parallelism: kExpertParallelBound), else the relative bound.
void check_equivalence(const std::vector<std::string>& extra, const std::vector<std::string>& parallel_only = {},
                       int64_t accum = 1, double bound = 0) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  at::set_num_threads(1);
  SharedDir shared(*w);  // ZeRO-1: every rank writes into the checkpoint
  testing::TempDir dir;
  const int64_t b = 2;
  auto settings = extra;
  settings.insert(settings.end(), parallel_only.begin(), parallel_only.end());
  auto parallel_run = recipes::build_trainer(recipe(b, settings, accum), shared / "dp", w);
  parallel_run->run();
  // The reference: this process alone with all of the step's micro-batches.
  auto single_run = recipes::build_trainer(recipe(b, extra, accum * w->size()), dir / "single");
  single_run->run();
  const auto reference = single_run->model()->state_dict();
  const auto saved = saved_weights(shared / "dp", reference);
  const bool expert_parallel = !parallel_only.empty();
  if (expert_parallel) bound = kExpertParallelBound;
  if (bound == 0) {
    expect_identical(saved, reference, "rank " + std::to_string(w->rank()));
  } else {
    std::string worst;
    const double diff = relative_difference(saved, reference, &worst);
    EXPECT_LE(diff, bound) << "rank " << w->rank() << "; worst tensor " << worst;
    if (w->rank() == 0) std::printf("relative difference %.3g (worst tensor: %s)\n", diff, worst.c_str());
  }
  // Expert parallelism: each rank holds num_experts / P experts.
  for (const auto& setting : parallel_only) {
    if (!setting.starts_with("parallel.expert_parallel=")) continue;
    const int64_t ep = std::stoll(setting.substr(setting.find('=') + 1));
    int64_t checked = 0;
    for (const auto& [name, t] : parallel_run->model()->state_dict()) {
      if (name.find("experts.gate_up_proj") == std::string::npos) continue;
      EXPECT_EQ(t.size(0), 4 / ep) << name;
      ++checked;
    }
    EXPECT_GT(checked, 0);
  }
  // Expert-parallel ranks hold different experts; everything else is the same everywhere.
  if (parallel_only.empty()) expect_same_on_every_rank(*w, *parallel_run);
}

TEST(MpiDataParallel, MatchesOneRankWithTheWholeBatch) { check_equivalence({}); }

TEST(MpiDataParallel, MatchesWithGradientAccumulationAndSmallBuckets) {
  check_equivalence({"parallel.bucket_mb=0.01"}, {}, 2);
}

TEST(MpiDataParallel, MoEBiasesFollowTheGlobalLoad) { check_equivalence(kMoE); }

TEST(MpiDataParallel, ZeroOneMatchesOneRankWithTheWholeBatch) { check_equivalence({"parallel.zero_stage=1"}); }

// Small buckets: shards cut through parameters, and some ranks own no element of
// a small bucket's parameters.
TEST(MpiDataParallel, ZeroOneMatchesWithGradientAccumulationAndSmallBuckets) {
  check_equivalence({"parallel.zero_stage=1", "parallel.bucket_mb=0.003"}, {}, 2);
}

TEST(MpiDataParallel, ZeroOneWithMoE) {
  auto settings = kMoE;
  settings.push_back("parallel.zero_stage=1");
  check_equivalence(settings);
}

// ZeRO-2 and 3 with one micro-batch per step: ZeRO-1's additions, bit for bit
// (ZeRO-3's buckets are its blocks, and one process lays out the same ones).
TEST(MpiDataParallel, ZeroTwoAndThreeMatchOneRankBitForBit) {
  check_equivalence({"parallel.zero_stage=2"});
  check_equivalence({"parallel.zero_stage=3"});
}

TEST(MpiDataParallel, ZeroTwoAndThreeWithGradientAccumulation) {
  check_equivalence({"parallel.zero_stage=2", "parallel.bucket_mb=0.003"}, {}, 2, kMicroBatchMajorBound);
  check_equivalence({"parallel.zero_stage=3"}, {}, 2, kMicroBatchMajorBound);
}

// MoE blocks and an MTP module (a unit of its own, run after the main blocks), and
// whole blocks recomputed in backward (gathered once more for it).
TEST(MpiDataParallel, ZeroThreeWithMoEMtpAndFullRecomputation) {
  auto settings = kMoE;
  settings.insert(settings.end(), {"parallel.zero_stage=3", "model.mtp.depth=1"});
  check_equivalence(settings);
  check_equivalence({"parallel.zero_stage=3", "trainer.activation_checkpointing=full"});
}

// During a step at most two blocks' parameters are whole on a rank (the one
// running and the one prefetched) besides the embedding table and the final norm
// (the tied head's units, whole while the head runs), none between steps, and each
// rank keeps 1/N of every parameter (plus padding to whole norm blocks).
TEST(MpiZero, ZeroThreeHoldsAtMostTwoBlocksWhole) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  at::set_num_threads(1);
  SharedDir dir(*w);
  // Units much larger than the padding (kNormBlock per rank), the table among the largest.
  auto trainer = recipes::build_trainer(recipe(2, {"parallel.zero_stage=3", "model.n_layers=4", "model.d_model=128",
                                                   "model.d_ff=256", "model.vocab_size=1024"},
                                               2),
                                        dir / "run", w);
  auto* units = trainer->parallel_state().sharded_parameters();
  ASSERT_NE(units, nullptr);
  ASSERT_EQ(units->units(), 6u);  // 4 blocks, the (tied) embedding table, the final norm
  int64_t elements = 0, kept = 0, largest_block = 0;
  for (const auto& item : trainer->model()->named_parameters()) elements += item.value().numel();
  for (size_t u = 0; u < units->units(); ++u) kept += units->shard(u).numel();
  for (size_t u = 0; u < 4; ++u) largest_block = std::max(largest_block, units->unit_bytes(u));
  const int64_t outer = units->unit_bytes(4) + units->unit_bytes(5);
  EXPECT_EQ(units->unit_bytes(4), static_cast<int64_t>(((trainer->model()->embed_tokens->weight.numel() + w->size() *
                                                          parallel::kNormBlock - 1) / (w->size() * parallel::kNormBlock)) *
                                                        w->size() * parallel::kNormBlock * sizeof(float)));
  EXPECT_EQ(units->gathered_bytes(), 0);
  int64_t peak = 0;
  for (int step = 0; step < 3; ++step) {
    units->reset_peak();
    trainer->step();
    peak = std::max(peak, units->peak_gathered_bytes());
    EXPECT_EQ(units->gathered_bytes(), 0) << "after step " << step;
  }
  EXPECT_GT(peak, 0);
  EXPECT_LE(peak, 2 * largest_block + outer);
  EXPECT_LE(kept, elements / w->size() + 6 * parallel::kNormBlock);
  if (w->rank() == 0) {
    std::printf("ZeRO-3 at %d ranks: parameters %lld floats; kept per rank %lld; whole at once at most %lld "
                "bytes (one block: %lld, embedding and norm: %lld)\n",
                w->size(), static_cast<long long>(elements), static_cast<long long>(kept), static_cast<long long>(peak),
                static_cast<long long>(largest_block), static_cast<long long>(outer));
  }
}

// A ZeRO-3 checkpoint resumes bit for bit on the same ranks, and at another stage
// (ZeRO-2 on every rank, or one process unsharded) within the micro-batch-major bound.
TEST(MpiZero, ZeroThreeResumesExactlyAndAtOtherStages) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  at::set_num_threads(1);
  SharedDir dir(*w);
  const std::vector<std::string> three = {"parallel.zero_stage=3"};
  auto straight = recipes::build_trainer(recipe(2, three), dir / "straight", w);
  straight->run();
  auto split = three;
  split.push_back("trainer.stop_after=3");
  recipes::build_trainer(recipe(2, split), dir / "split", w)->run();
  const auto step3 = dir / "split" / "checkpoints" / "step_00000003";
  auto resumed = recipes::build_trainer(recipe(2, three), dir / "split", w);
  resumed->resume(trainer::load_checkpoint(step3));
  resumed->run();
  expect_identical(resumed->model()->state_dict(), straight->model()->state_dict(), "resumed at ZeRO-3");
  const auto expected = straight->model()->state_dict();
  std::string worst;
  auto at_two = recipes::build_trainer(recipe(2, {"parallel.zero_stage=2"}), dir / "two", w);
  at_two->resume(trainer::load_checkpoint(step3));
  at_two->run();
  EXPECT_LE(relative_difference(at_two->model()->state_dict(), expected, &worst), kMicroBatchMajorBound) << worst;
  testing::TempDir own;
  auto alone = recipes::build_trainer(recipe(2, {}, w->size()), own / "alone");
  alone->resume(trainer::load_checkpoint(step3));
  alone->run();
  EXPECT_LE(relative_difference(alone->model()->state_dict(), expected, &worst), kMicroBatchMajorBound) << worst;
}

std::vector<std::string> zero_settings(std::vector<std::string> extra = {}) {
  extra.insert(extra.end(), {"parallel.zero_stage=1", "parallel.bucket_mb=0.003"});
  return extra;
}

nlohmann::json manifest(const std::filesystem::path& run) {
  const auto step_dir = trainer::resolve_checkpoint(run);
  return nlohmann::json::parse(read_file(step_dir / "optimizer_shards.json"));
}

// Stopped after 3 steps and resumed on the same ranks: bit for bit the straight run.
TEST(MpiZero, ResumeOnTheSameRanksIsExact) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  at::set_num_threads(1);
  SharedDir dir(*w);
  auto straight = recipes::build_trainer(recipe(2, zero_settings()), dir / "straight", w);
  straight->run();
  recipes::build_trainer(recipe(2, zero_settings({"trainer.stop_after=3"})), dir / "split", w)->run();
  EXPECT_EQ(manifest(dir / "split")["world_size"].get<int>(), w->size());
  auto resumed = recipes::build_trainer(recipe(2, zero_settings()), dir / "split", w);
  resumed->resume(trainer::load_checkpoint(trainer::resolve_checkpoint(dir / "split")));
  EXPECT_EQ(resumed->current_step(), 3);
  resumed->run();
  const auto a = straight->model()->state_dict(), b = resumed->model()->state_dict();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
}

// A ZeRO-1 checkpoint written by half the ranks resumes on all of them (and on one
// rank, unsharded), with the same global batch of 2 * ranks rows in micro-batches
// of 2: bit for bit the run of one process that trained straight through.
TEST(MpiZero, ReshardsOntoAnotherNumberOfRanksBitForBit) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  at::set_num_threads(1);
  SharedDir dir(*w);
  const int half = w->size() / 2;
  // Ranks [0, half) write a checkpoint at step 3 (2 micro-batches each); the others
  // form their own group and wait.
  auto first = w->split(w->rank() < half ? 0 : 1, w->rank(), "first");
  if (w->rank() < half) {
    auto* group = half > 1 ? first.get() : nullptr;
    recipes::build_trainer(recipe(2, zero_settings({"trainer.stop_after=3"}), w->size() / half), dir / "run", group)
        ->run();
  }
  w->barrier().wait();
  if (half > 1) EXPECT_EQ(manifest(dir / "run")["world_size"].get<int>(), half);
  testing::TempDir own;
  auto reference = recipes::build_trainer(recipe(2, zero_settings(), w->size()), own / "reference");
  reference->run();
  // Resumed on every rank, sharded over all of them.
  auto resumed = recipes::build_trainer(recipe(2, zero_settings()), dir / "run", w);
  resumed->resume(trainer::load_checkpoint(trainer::resolve_checkpoint(dir / "run")));
  resumed->run();
  EXPECT_EQ(manifest(dir / "run")["world_size"].get<int>(), w->size());
  expect_identical(resumed->model()->state_dict(), reference->model()->state_dict(), "resumed on every rank");
  // The same sharded checkpoint of step 3 resumed by one process, unsharded.
  w->barrier().wait();
  if (w->rank() == 0) {
    auto alone = recipes::build_trainer(recipe(2, zero_settings(), w->size()), own / "alone");
    const auto step3 = dir / "run" / "checkpoints" / "step_00000003";
    ASSERT_TRUE(trainer::load_checkpoint(step3).optimizer.sharded() || half == 1);
    alone->resume(trainer::load_checkpoint(step3));
    alone->run();
    expect_identical(alone->model()->state_dict(), reference->model()->state_dict(), "resumed by one process");
  }
}

// Pipeline parallelism: the blocks over P stages (every rank, or 2 stages x 2
// pipelines at 4 ranks) with 4 micro-batches per step reach the weights of one
// process with every micro-batch; each stage's gradients are its own autograd's,
// so only the gradient norm's order of additions differs (stage sums added).
// `parallel_only`: settings of the pipelined run alone.
void check_pipeline(const std::vector<std::string>& extra, int stages, double bound = kMicroBatchMajorBound,
                    const std::vector<std::string>& parallel_only = {}, int64_t layers = 4, int64_t accum = 4) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  at::set_num_threads(1);
  SharedDir shared(*w);
  testing::TempDir own;
  const int64_t pipelines = w->size() / stages;
  auto settings = extra;
  const std::string n_layers = "model.n_layers=" + std::to_string(layers);
  settings.insert(settings.end(), {n_layers, "parallel.pipeline_parallel=" + std::to_string(stages)});
  settings.insert(settings.end(), parallel_only.begin(), parallel_only.end());
  recipes::build_trainer(recipe(2, settings, accum), shared / "pp", w)->run();
  // One optimizer file per stage, or with ZeRO one per rank.
  bool zero = false;
  for (const auto& s : extra) zero = zero || (s.starts_with("parallel.zero_stage=") && s != "parallel.zero_stage=0");
  EXPECT_EQ(manifest(shared / "pp")["world_size"].get<int>(), zero ? w->size() : stages);
  auto reference_settings = extra;
  reference_settings.push_back(n_layers);
  auto single = recipes::build_trainer(recipe(2, reference_settings, accum * pipelines), own / "single");
  single->run();
  const auto expected = single->model()->state_dict();
  std::string worst;
  const double diff = relative_difference(saved_weights(shared / "pp", expected), expected, &worst);
  EXPECT_LE(diff, bound) << "rank " << w->rank() << "; worst tensor " << worst;
  if (w->rank() == 0) std::printf("pipeline %d stages: relative difference %.3g (worst tensor: %s)\n", stages, diff, worst.c_str());
}

// Dense (tied and untied embeddings), and MoE with an MTP module on the last stage.
TEST(MpiPipeline, OneFOneBAndGpipeMatchOneRank) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  check_pipeline({"parallel.pp_schedule=1f1b"}, w->size());
  check_pipeline({"parallel.pp_schedule=gpipe", "model.tie_embeddings=false"}, w->size());
  auto moe = kMoE;
  moe.insert(moe.end(), {"parallel.pp_schedule=1f1b", "model.mtp.depth=1"});
  check_pipeline(moe, w->size());
}

// One step of a chunked schedule over every rank as stages (2 chunks each, 2 blocks
// per stage): the chunk activations this rank held at once, and an evaluation that
// passes every rank's chunks in model order, against one process's loss on the same
// weights.
void check_chunked_step(const std::string& schedule, int64_t accum, int64_t in_flight) {
  auto* w = mpi_world();
  at::set_num_threads(1);
  const std::string layers = "model.n_layers=" + std::to_string(2 * w->size());
  SharedDir dir(*w);
  auto t = recipes::build_trainer(recipe(2, {layers, "parallel.pipeline_parallel=" + std::to_string(w->size()),
                                             "parallel.pp_schedule=" + schedule}, accum),
                                  dir / "in_flight", w);
  EXPECT_EQ(t->step().pipeline_in_flight, in_flight) << schedule;
  const double loss = t->evaluate().loss;
  testing::TempDir own;
  auto single = recipes::build_trainer(recipe(2, {layers}, accum), own / "one");
  single->step();
  EXPECT_NEAR(loss, single->evaluate().loss, 1e-5 * loss) << schedule;
}

// Megatron's interleaved schedule: each rank holds 2 chunks (3 with MoE), so a
// micro-batch passes every rank 2 (3) times; dense with a tied head, MoE with an
// MTP module, and at 4 ranks also 2 pipelines x 2 stages. The gradients of each
// chunk are added in micro-batch order, so the bound is the other schedules'.
TEST(MpiPipeline, InterleavedOneFOneBMatchesOneRank) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  const int stages = w->size();
  check_pipeline({"parallel.pp_schedule=interleaved_1f1b"}, stages, kMicroBatchMajorBound, {}, 2 * stages);
  auto moe = kMoE;
  moe.insert(moe.end(), {"parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=3", "model.mtp.depth=1"});
  check_pipeline(moe, stages, kMicroBatchMajorBound, {}, 3 * stages);
  if (stages == 4) check_pipeline({"parallel.pp_schedule=interleaved_1f1b", "parallel.zero_stage=1"}, 2);
  // Chunk activations held at once: the schedule's warm-up forwards plus one.
  check_chunked_step("interleaved_1f1b", 2 * stages, (stages - w->rank() - 1) * 2 + stages + 1);
}

// DeepSeek's DualPipe-V: 2 chunks per rank in a V (rank 0 holds the first and the
// last chunk: embedding and head on one rank, a tied head without a copy); dense
// tied, MoE with an MTP module (which also reads the embedding table), and at 4
// ranks also 2 pipelines x 2 stages with ZeRO-1.
TEST(MpiPipeline, DualPipeVMatchesOneRank) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  const int stages = w->size();
  check_pipeline({"parallel.pp_schedule=dualpipev"}, stages, kMicroBatchMajorBound, {}, 2 * stages, 2 * stages);
  auto moe = kMoE;
  moe.insert(moe.end(), {"parallel.pp_schedule=dualpipev", "model.mtp.depth=1"});
  check_pipeline(moe, stages, kMicroBatchMajorBound, {}, 2 * stages, 2 * stages + 1);
  if (stages == 4) check_pipeline({"parallel.pp_schedule=dualpipev", "parallel.zero_stage=1"}, 2);
  // ZeRO-3 on stages alone in their data-parallel group (nothing sharded; its units'
  // layout gives the gradient norm).
  check_pipeline({"parallel.pp_schedule=dualpipev", "parallel.zero_stage=3"}, stages, kMicroBatchMajorBound, {},
                 2 * stages, 2 * stages);
  // 2P + 1 chunk activations at most, on every rank.
  check_chunked_step("dualpipev", 3 * stages, 2 * stages + 1);
}

// DualPipe-V's W steps (parallel.pp_zero_bubble, on by default at ZeRO 0 and 1):
// the split backwards' weight gradients, made later, are the unsplit run's bit for
// bit; each rank runs 2 (P - s - 1) + s + 1 W steps per step, none when off.
TEST(MpiPipeline, DualPipeVWeightStepsGiveTheSameGradients) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  at::set_num_threads(1);
  const int stages = w->size(), stage = w->rank();
  SharedDir dir(*w);
  auto moe = kMoE;
  moe.insert(moe.end(), {"model.n_layers=" + std::to_string(2 * stages), "parallel.pipeline_parallel=" + std::to_string(stages),
                         "parallel.pp_schedule=dualpipev", "model.tie_embeddings=false", "model.mtp.depth=1"});
  std::vector<model::NamedTensors> weights;
  for (const std::string zero_bubble : {"true", "false"}) {
    auto settings = moe;
    settings.push_back("parallel.pp_zero_bubble=" + zero_bubble);
    auto t = recipes::build_trainer(recipe(2, settings, 2 * stages), dir / ("zb_" + zero_bubble), w);
    for (int step = 0; step < 3; ++step) {
      EXPECT_EQ(t->step().pipeline_weight_steps, zero_bubble == "true" ? 2 * (stages - stage - 1) + stage + 1 : 0);
    }
    weights.push_back(t->model()->state_dict());
  }
  expect_identical(weights[0], weights[1], "with and without W steps");
  // Whole blocks recomputed in backward: the split Linears run again inside it.
  check_pipeline({"parallel.pp_schedule=dualpipev", "trainer.activation_checkpointing=full"}, stages,
                 kMicroBatchMajorBound, {}, 2 * stages, 2 * stages);
}

// The activations a stage holds at once: all 4 micro-batches with GPipe, at most
// stages - stage with 1F1B.
TEST(MpiPipeline, InFlightActivationsAreBoundedByTheSchedule) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  at::set_num_threads(1);
  SharedDir dir(*w);
  for (const std::string schedule : {"gpipe", "1f1b"}) {
    auto t = recipes::build_trainer(
        recipe(2, {"model.n_layers=4", "parallel.pipeline_parallel=" + std::to_string(w->size()),
                   "parallel.pp_schedule=" + schedule}, 4),
        dir / schedule, w);
    const auto r = t->step();
    const int64_t stage = w->rank();
    EXPECT_EQ(r.pipeline_in_flight, schedule == "gpipe" ? 4 : std::min<int64_t>(4, w->size() - stage)) << schedule;
  }
}

// The step of 4 ranks as 2 pipelines x 2 stages with 4 micro-batches each, in one
// process (8 micro-batches of 2 rows), after 5 steps; resumed from `checkpoint`
// when given.
model::NamedTensors one_process_weights(const std::filesystem::path& run, const std::filesystem::path& checkpoint = {}) {
  auto t = recipes::build_trainer(recipe(2, {"model.n_layers=4"}, 8), run);
  if (!checkpoint.empty()) t->resume(trainer::load_checkpoint(checkpoint));
  t->run();
  return t->model()->state_dict();
}

// 2 pipelines x 2 stages (4 ranks): data parallelism between the pipelines; the
// checkpoint of step 3 resumes on 4 stages and on one process unpipelined.
TEST(MpiPipeline, DataTimesPipelineAndResumeOnOtherLayouts) {
  auto* w = mpi_world();
  if (w == nullptr || w->size() != 4) GTEST_SKIP() << "4-rank test";
  check_pipeline({}, 2);
  at::set_num_threads(1);
  SharedDir dir(*w);
  const std::vector<std::string> two = {"model.n_layers=4", "parallel.pipeline_parallel=2"};
  auto first = two;
  first.push_back("trainer.stop_after=3");
  recipes::build_trainer(recipe(2, first, 4), dir / "run", w)->run();
  const auto step3 = dir / "run" / "checkpoints" / "step_00000003";
  testing::TempDir own;
  const auto expected = one_process_weights(own / "reference");
  std::string worst;
  auto four = recipes::build_trainer(recipe(2, {"model.n_layers=4", "parallel.pipeline_parallel=4"}, 8), dir / "four", w);
  four->resume(trainer::load_checkpoint(step3));
  four->run();
  EXPECT_LE(relative_difference(saved_weights(dir / "four", expected), expected, &worst), kMicroBatchMajorBound) << worst;
  EXPECT_LE(relative_difference(one_process_weights(own / "alone", step3), expected, &worst), kMicroBatchMajorBound)
      << worst;
}

// Expert parallelism over the pipelines at each stage: EP 2 x PP 2 (x DP 1) at 4
// ranks; experts move between ranks, so the bound is expert parallelism's.
TEST(MpiPipeline, ExpertParallelTimesPipeline) {
  auto* w = mpi_world();
  if (w == nullptr || w->size() != 4) GTEST_SKIP() << "4-rank test";
  check_pipeline(kMoE, 2, kExpertParallelBound, {"parallel.expert_parallel=2"});
  // The chunked schedules keep the EP groups in lockstep too (every pipeline runs the same order).
  for (const std::string schedule : {"interleaved_1f1b", "dualpipev"}) {
    auto settings = kMoE;
    settings.push_back("parallel.pp_schedule=" + schedule);
    check_pipeline(settings, 2, kExpertParallelBound, {"parallel.expert_parallel=2"});
  }
}

// DeepSeek-V3's layout in small: PP 2 x EP 2 with ZeRO-1 (and ZeRO-2, ZeRO-3) over each
// stage's data-parallel group at 4 ranks. The ZeRO-1 checkpoint (one optimizer
// file per rank: dense shards, and the first EP group's expert slices) resumes on
// one process without pipelines or experts spread.
TEST(MpiPipeline, ExpertParallelTimesPipelineWithZero) {
  auto* w = mpi_world();
  if (w == nullptr || w->size() != 4) GTEST_SKIP() << "4-rank test";
  for (const std::string stage : {"1", "2", "3"}) {
    auto settings = kMoE;
    settings.push_back("parallel.zero_stage=" + stage);
    check_pipeline(settings, 2, kExpertParallelBound, {"parallel.expert_parallel=2"});
  }
  at::set_num_threads(1);
  SharedDir dir(*w);
  auto layout = kMoE;
  layout.insert(layout.end(), {"model.n_layers=4", "parallel.pipeline_parallel=2", "parallel.expert_parallel=2",
                               "parallel.zero_stage=1"});
  auto first = layout;
  first.push_back("trainer.stop_after=3");
  recipes::build_trainer(recipe(2, first, 4), dir / "run", w)->run();
  EXPECT_EQ(manifest(dir / "run")["world_size"].get<int>(), 4);
  auto alone_settings = kMoE;
  alone_settings.push_back("model.n_layers=4");
  testing::TempDir own;
  auto reference = recipes::build_trainer(recipe(2, alone_settings, 8), own / "reference");
  reference->run();
  auto alone = recipes::build_trainer(recipe(2, alone_settings, 8), own / "alone");
  alone->resume(trainer::load_checkpoint(dir / "run" / "checkpoints" / "step_00000003"));
  alone->run();
  std::string worst;
  EXPECT_LE(relative_difference(alone->model()->state_dict(), reference->model()->state_dict(), &worst),
            kExpertParallelBound)
      << worst;
}

// ZeRO-1, 2 and 3 inside each stage's data-parallel group (2 pipelines x 2
// stages); the ZeRO-1 checkpoint (one file per rank) resumes on one process.
TEST(MpiPipeline, ZeroInsideEachStage) {
  auto* w = mpi_world();
  if (w == nullptr || w->size() != 4) GTEST_SKIP() << "4-rank test";
  check_pipeline({"parallel.zero_stage=1", "parallel.bucket_mb=0.003"}, 2);
  check_pipeline({"parallel.zero_stage=2"}, 2);
  check_pipeline({"parallel.zero_stage=3"}, 2);
  at::set_num_threads(1);
  SharedDir dir(*w);
  recipes::build_trainer(recipe(2, {"model.n_layers=4", "parallel.pipeline_parallel=2", "parallel.zero_stage=1",
                                    "trainer.stop_after=3"}, 4),
                         dir / "run", w)
      ->run();
  testing::TempDir own;
  std::string worst;
  EXPECT_LE(relative_difference(one_process_weights(own / "alone", dir / "run" / "checkpoints" / "step_00000003"),
                                one_process_weights(own / "reference"), &worst),
            kMicroBatchMajorBound)
      << worst;
}

// ZeRO-2 and 3 with the chunked schedules (2 pipelines x 2 stages): each chunk's
// backward reduces its own buckets (and at stage 3 gathers its own blocks), so a
// rank has one reducer per chunk; the checkpoint's shard ranges (laid out by rank 0
// from the parameter sizes) resume on one process.
TEST(MpiPipeline, ZeroTwoAndThreeWithChunkedSchedules) {
  auto* w = mpi_world();
  if (w == nullptr || w->size() != 4) GTEST_SKIP() << "4-rank test";
  for (const std::string schedule : {"interleaved_1f1b", "dualpipev"}) {
    check_pipeline({"parallel.pp_schedule=" + schedule, "parallel.zero_stage=2", "parallel.bucket_mb=0.003"}, 2);
    check_pipeline({"parallel.pp_schedule=" + schedule, "parallel.zero_stage=3"}, 2);
  }
  // Rank 0 holds the embedding's chunk and the head's (the MTP module reads the table):
  // the head's part of the table's gradient waits for chunk 0's reducer.
  auto moe = kMoE;
  moe.insert(moe.end(), {"parallel.pp_schedule=dualpipev", "model.mtp.depth=1", "parallel.zero_stage=3"});
  check_pipeline(moe, 2);
  at::set_num_threads(1);
  SharedDir dir(*w);
  auto run = recipes::build_trainer(recipe(2, {"model.n_layers=4", "parallel.pipeline_parallel=2", "parallel.zero_stage=3",
                                               "parallel.pp_schedule=dualpipev", "trainer.stop_after=3"}, 4),
                                    dir / "run", w);
  // Each rank's two chunks of one block each: two reducers, each with its block as a
  // unit; on stage 0 also the embedding table (chunk 0) and the final norm (chunk 3).
  const auto& state = run->parallel_state();
  ASSERT_EQ(state.reduce_group_count(), 2u);
  for (size_t g = 0; g < 2; ++g) {
    ASSERT_NE(state.sharded_parameters(g), nullptr);
    EXPECT_EQ(state.sharded_parameters(g)->units(), w->rank() % 2 == 0 ? 2u : 1u);
  }
  run->run();
  testing::TempDir own;
  std::string worst;
  EXPECT_LE(relative_difference(one_process_weights(own / "alone", dir / "run" / "checkpoints" / "step_00000003"),
                                one_process_weights(own / "reference"), &worst),
            kMicroBatchMajorBound)
      << worst;
}

TEST(MpiPipeline, BadLayoutsAreClearErrorsBeforeTraining) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  testing::TempDir dir;
  auto message = [&](const std::vector<std::string>& settings) {
    try {
      recipes::build_trainer(recipe(2, settings), dir / "bad", w);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message({"parallel.pipeline_parallel=3"}).find("parallel.pipeline_parallel (3) must divide the number of ranks"),
            std::string::npos);
  EXPECT_NE(message({"parallel.pipeline_parallel=" + std::to_string(w->size()), "model.n_layers=1"})
                .find("is more than model.n_layers (1)"),
            std::string::npos);
  EXPECT_NE(message({"parallel.pipeline_parallel=2", "model.n_layers=4", "parallel.pp_layers=[1,2]"})
                .find("parallel.pp_layers adds up to 3 blocks, but model.n_layers is 4"),
            std::string::npos);
  EXPECT_NE(message({"parallel.pipeline_parallel=2", "parallel.pp_layers=[2]"})
                .find("parallel.pp_layers lists 1 stages, but parallel.pipeline_parallel is 2"),
            std::string::npos);
  EXPECT_NE(message({"parallel.pipeline_parallel=2", "model.n_layers=3", "parallel.pp_schedule=interleaved_1f1b",
                     "trainer.grad_accum_steps=2"})
                .find("parallel.pipeline_parallel (2) x pp_virtual_stages (2) = 4 chunks is more than model.n_layers (3)"),
            std::string::npos);
  EXPECT_NE(message({"parallel.pipeline_parallel=2", "parallel.pp_schedule=interleaved_1f1b", "trainer.grad_accum_steps=3"})
                .find("(trainer.grad_accum_steps = 3) to be a multiple of parallel.pipeline_parallel (2)"),
            std::string::npos);
  EXPECT_NE(message({"parallel.pipeline_parallel=2", "parallel.pp_schedule=dualpipev", "trainer.grad_accum_steps=3"})
                .find("dualpipev needs at least 2 x parallel.pipeline_parallel micro-batches per step "
                      "(trainer.grad_accum_steps = 3, pipeline_parallel 2)"),
            std::string::npos);
  EXPECT_NE(message({"parallel.pipeline_parallel=2", "parallel.pp_virtual_stages=2"})
                .find("model chunks per rank need interleaved_1f1b"),
            std::string::npos);
}

// Delayed-scaling FP8 on a pipeline: each stage keeps the amax histories of its own
// GEMMs. With one micro-batch per step every GEMM records in one process's order,
// so the weights are one process's bit for bit; the checkpoint of step 3 (rank 0
// merges every stage's histories) resumes on one process to the same bits, which a
// checkpoint with stage 0's histories alone would not.
TEST(MpiPipeline, DelayedScalingFp8KeepsEachStagesHistories) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  at::set_num_threads(1);
  const int stages = w->size();
  const std::vector<std::string> common = {"model.n_layers=4", "precision.fp8_recipe=delayed"};
  SharedDir dir(*w);
  auto pipelined = common;
  pipelined.insert(pipelined.end(), {"parallel.pipeline_parallel=" + std::to_string(stages), "trainer.stop_after=3"});
  recipes::build_trainer(recipe(2, pipelined), dir / "pp", w)->run();
  auto rest = common;
  rest.push_back("parallel.pipeline_parallel=" + std::to_string(stages));
  auto continued = recipes::build_trainer(recipe(2, rest), dir / "pp", w);
  continued->resume(trainer::load_checkpoint(dir / "pp" / "checkpoints" / "step_00000003"));
  continued->run();
  testing::TempDir own;
  auto straight = recipes::build_trainer(recipe(2, common), own / "straight");
  straight->run();
  const auto expected = straight->model()->state_dict();
  expect_identical(saved_weights(dir / "pp", expected), expected, "pipelined, resumed on the pipeline");
  const auto step3 = trainer::load_checkpoint(dir / "pp" / "checkpoints" / "step_00000003");
  int64_t histories = 0;
  for (const auto& [key, t] : step3.precision.tensors) histories += key.ends_with(".amax_history") ? 1 : 0;
  EXPECT_GT(histories, 0);
  for (int64_t layer = 0; layer < 4; ++layer) {
    EXPECT_TRUE(step3.precision.tensors.contains("layers." + std::to_string(layer) + ".mlp.down_proj.input.amax_history"))
        << "layer " << layer << "'s histories are missing from the checkpoint";
  }
  auto alone = recipes::build_trainer(recipe(2, common), own / "alone");
  alone->resume(step3);
  alone->run();
  expect_identical(alone->model()->state_dict(), expected, "resumed on one process");
}

// Logit distillation on a pipeline (the last stage, which has the logits, adds the
// KD term on its micro-batches' teacher top-k), FP8 GEMMs in each stage (blockwise
// and per-tensor current scaling), and an uneven split given as parallel.pp_layers.
TEST(MpiPipeline, DistillationFp8AndExplicitSplitsMatchOneRank) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  SharedDir data(*w);
  if (w->rank() == 0) testing::build_kd_shard(data / "kd");
  w->barrier().wait();
  auto kd = testing::kd_data_settings(data / "kd" / "build");
  kd.insert(kd.end(), {"distill.kd.loss=forward_kl", "distill.kd.weight=0.5"});
  check_pipeline(kd, 2);
  check_pipeline({"precision.fp8_recipe=blockwise"}, 2);
  check_pipeline({"precision.fp8_recipe=current", "model.tie_embeddings=false"}, w->size());
  check_pipeline({}, 2, kMicroBatchMajorBound, {"parallel.pp_layers=[3,1]"});
}

// `first` with EP = 2 stopped at step 3 in a shared run directory, resumed there
// with `second` (from step 3, checked), run to the end: the relative difference of
// its saved weights from one process's straight run of kMoE.
double expert_parallel_resume_difference(parallel::Communicator& w, std::vector<std::string> first,
                                         const std::vector<std::string>& second, std::string* worst) {
  at::set_num_threads(1);
  SharedDir dir(w);
  first.insert(first.end(), {"parallel.expert_parallel=2", "trainer.stop_after=3"});
  recipes::build_trainer(recipe(2, first), dir / "run", &w)->run();
  auto resumed = recipes::build_trainer(recipe(2, second), dir / "run", &w);
  resumed->resume(trainer::load_checkpoint(trainer::resolve_checkpoint(dir / "run")));
  EXPECT_EQ(resumed->current_step(), 3);
  resumed->run();
  testing::TempDir own;
  auto reference = recipes::build_trainer(recipe(2, kMoE, w.size()), own / "reference");
  reference->run();
  const auto expected = reference->model()->state_dict();
  return relative_difference(saved_weights(dir / "run", expected), expected, worst);
}

// Expert parallelism inside data parallelism: EP groups of 2, and of every rank.
TEST(MpiExpertParallelTraining, MatchesOneRankWithTheWholeBatch) {
  check_equivalence(kMoE, {"parallel.expert_parallel=2"});
  if (mpi_world() != nullptr && mpi_world()->size() > 2) {
    check_equivalence(kMoE, {"parallel.expert_parallel=" + std::to_string(mpi_world()->size())});
  }
}

// ZeRO-1 shards the dense parameters' AdamW state over every rank while each EP
// rank keeps its experts' state (DeepSeek-V3's layout without pipelines); the
// checkpoint resumes without expert parallelism on the same ranks.
TEST(MpiExpertParallelTraining, ZeroOneWithExpertParallelism) {
  auto settings = kMoE;
  settings.push_back("parallel.zero_stage=1");
  check_equivalence(settings, {"parallel.expert_parallel=2"});
  auto* w = mpi_world();
  if (w == nullptr) return;
  std::string worst;
  EXPECT_LE(expert_parallel_resume_difference(*w, settings, settings, &worst), kExpertParallelBound) << worst;
}

TEST(MpiExpertParallelTraining, MatchesWithGradientAccumulationAndSmallBuckets) {
  auto settings = kMoE;
  settings.push_back("parallel.bucket_mb=0.003");
  check_equivalence(settings, {"parallel.expert_parallel=2"}, 2);
}

// A checkpoint written with EP = 2 holds whole expert tensors: it resumes with
// another EP size (4 ranks: EP = 4; 2 ranks: no EP) and reaches the straight run.
TEST(MpiExpertParallelTraining, ResumesWithAnotherExpertParallelSize) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  auto second = kMoE;
  second.push_back("parallel.expert_parallel=" + std::to_string(w->size() > 2 ? w->size() : 1));
  std::string worst;
  const double diff = expert_parallel_resume_difference(*w, kMoE, second, &worst);
  EXPECT_LE(diff, kExpertParallelBound) << worst;
  if (w->rank() == 0) std::printf("relative difference %.3g (worst tensor: %s)\n", diff, worst.c_str());
}

// A DeepSeek-V3-shaped run (MLA, shared + routed experts, sigmoid routing, an MTP
// module) with EP = 2: the Hugging Face export from its checkpoint holds every
// expert of every MoE layer (the MTP block's included), each equal to the slice
// the rank that owned it trained.
TEST(MpiExpertParallelTraining, HuggingFaceExportKeepsEveryExpert) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  at::set_num_threads(1);
  SharedDir dir(*w);
  auto settings = kMoE;
  settings.insert(settings.end(), {"model.attention=mla", "model.n_kv_heads=0", "model.mla.kv_lora_rank=16",
                                   "model.mla.qk_nope_head_dim=8", "model.mla.qk_rope_head_dim=8",
                                   "model.mla.v_head_dim=8", "model.moe.num_shared_experts=1",
                                   "model.moe.score_function=sigmoid", "model.mtp.depth=1",
                                   "parallel.expert_parallel=2", "trainer.max_steps=3"});
  auto trainer = recipes::build_trainer(recipe(2, settings), dir / "run", w);
  trainer->run();
  // Each rank's slice of the experts it trained: rank r holds experts [2r, 2r + 2) of its EP pair.
  const int ep_rank = w->rank() % 2;
  model::NamedTensors slices;
  for (const auto& [name, t] : trainer->model()->state_dict())
    if (name.find("mlp.experts.") != std::string::npos) slices.emplace_back(name, t.detach().clone());
  if (w->rank() < 2) model::save_safetensors(dir / ("slice" + std::to_string(ep_rank) + ".safetensors"), slices);
  w->barrier().wait();
  if (w->rank() != 0) return;
  auto loaded = launch::load_model(dir / "run", {});
  std::filesystem::create_directories(dir / "hf");
  model::save_hf_checkpoint(*loaded.model, dir / "hf", "float32", 1ull << 30);
  const auto exported = model::load_safetensors_dir(dir / "hf").tensors;
  int64_t checked = 0;
  for (int r = 0; r < 2; ++r) {
    const auto slice = model::load_safetensors(dir / ("slice" + std::to_string(r) + ".safetensors")).tensors;
    for (const char* layer : {"layers.1", "mtp.0.block"}) {
      const auto gate_up = slice.at(std::string(layer) + ".mlp.experts.gate_up_proj");  // [2, 2F, D]
      const auto down = slice.at(std::string(layer) + ".mlp.experts.down_proj");        // [2, D, F]
      ASSERT_EQ(gate_up.size(0), 2);
      const std::string hf_layer = std::string(layer) == "layers.1" ? "model.layers.1" : "model.layers.2";
      for (int64_t e = 0; e < 2; ++e) {
        const std::string prefix = hf_layer + ".mlp.experts." + std::to_string(2 * r + e) + ".";
        const int64_t ff = gate_up.size(1) / 2;
        ASSERT_TRUE(exported.contains(prefix + "gate_proj.weight")) << prefix;
        EXPECT_TRUE(torch::equal(exported.at(prefix + "gate_proj.weight"), gate_up[e].narrow(0, 0, ff))) << prefix;
        EXPECT_TRUE(torch::equal(exported.at(prefix + "up_proj.weight"), gate_up[e].narrow(0, ff, ff))) << prefix;
        EXPECT_TRUE(torch::equal(exported.at(prefix + "down_proj.weight"), down[e])) << prefix;
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 8);  // 4 experts in each of the two MoE blocks
  EXPECT_FALSE(exported.contains("model.layers.1.mlp.experts.4.gate_proj.weight"));
}

// Preemption: the last rank alone is asked to stop (its signal) during step 3;
// every rank ends after step 3, the checkpoint is of step 3, and resuming reaches
// the uninterrupted run bit for bit.
void check_stop(const std::vector<std::string>& settings, int64_t accum) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  at::set_num_threads(1);
  SharedDir dir(*w);
  auto reference = recipes::build_trainer(recipe(2, settings, accum), dir / "reference", w);
  reference->run();
  auto stopped = recipes::build_trainer(recipe(2, settings, accum), dir / "run", w);
  int asked = 0;
  const bool me = w->rank() == w->size() - 1;
  stopped->set_stop_request([&] { return me && ++asked == 3; });
  stopped->run();
  EXPECT_TRUE(stopped->stopped_by_request());
  EXPECT_EQ(stopped->current_step(), 3);
  w->barrier().wait();
  auto resumed = recipes::build_trainer(recipe(2, settings, accum), dir / "run", w);
  const auto ck = trainer::load_checkpoint(trainer::resolve_checkpoint(dir / "run"));
  EXPECT_EQ(ck.state.step, 3);
  resumed->resume(ck);
  resumed->run();
  EXPECT_FALSE(resumed->stopped_by_request());
  expect_identical(resumed->model()->state_dict(), reference->model()->state_dict(), "resumed after the stop");
}

// Data parallel with MoE, and a pipeline of 2 stages (the signalled rank the last
// stage): every rank stops after step 3, and the resume continues bit for bit.
TEST(MpiPreemption, OneRankSignalledStopsEveryRankAtTheSameStep) {
  check_stop(kMoE, 1);
  auto pipeline = kMoE;
  pipeline.insert(pipeline.end(), {"model.n_layers=4", "parallel.pipeline_parallel=2"});
  check_stop(pipeline, 2);
}

// MoE at ZeRO stage `stage` with EP 2 against one process, with 1 and 4 micro-batches,
// and a stop and resume at step 3.
void check_zero_with_expert_parallelism(int stage) {
  auto settings = kMoE;
  settings.push_back("parallel.zero_stage=" + std::to_string(stage));
  check_equivalence(settings, {"parallel.expert_parallel=2"});
  check_equivalence(settings, {"parallel.expert_parallel=2"}, /*accum=*/4);
  auto* w = mpi_world();
  if (w == nullptr) return;
  std::string worst;
  EXPECT_LE(expert_parallel_resume_difference(*w, settings, settings, &worst), kExpertParallelBound) << worst;
}

// ZeRO-2 with expert parallelism: the dense gradients reduce-scattered every
// micro-batch, the experts' reduced once per step over their replicas (added in the
// canonical order first).
TEST(MpiExpertParallelTraining, ZeroTwoWithExpertParallelism) { check_zero_with_expert_parallelism(2); }

// ZeRO-3 with expert parallelism: the dense parameters sharded and gathered per
// unit, the experts whole on their EP rank (they are not replicas over the
// data-parallel group), reduced once per step over their replicas as at stage 2.
TEST(MpiExpertParallelTraining, ZeroThreeWithExpertParallelism) { check_zero_with_expert_parallelism(3); }

TEST(MpiExpertParallelTraining, BadSizesAreClearErrorsBeforeTraining) {
  auto* w = mpi_world();
  if (w == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun";
  testing::TempDir dir;
  auto settings = kMoE;
  settings.push_back("parallel.expert_parallel=3");
  EXPECT_BRIGADE_ERROR(recipes::build_trainer(recipe(2, settings), dir / "a", w),
                       "parallel.expert_parallel (3) must divide the number of ranks (" + std::to_string(w->size()) + ")");
  settings = {"model.moe.num_experts=6", "model.moe.top_k=2", "model.moe.expert_d_ff=16",
              "parallel.expert_parallel=" + std::to_string(w->size() == 2 ? 2 : 4)};
  if (w->size() == 2) settings[0] = "model.moe.num_experts=3";
  EXPECT_BRIGADE_ERROR(recipes::build_trainer(recipe(2, settings), dir / "b", w), "must be divisible by parallel.expert_parallel");
  EXPECT_BRIGADE_ERROR(recipes::build_trainer(recipe(2, {"parallel.expert_parallel=2"}), dir / "c", w),
                       "the model has no MoE layers");
}

}  // namespace
}  // namespace brigade
