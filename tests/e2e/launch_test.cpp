// `brigade launch` and multi-rank `brigade train` as a user runs them: two ranks
// train and rank 0 writes the run; bad launcher input; a hung or killed rank
// stops the whole job within the timeout instead of leaving it waiting.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "launch/launcher.h"
#include "tests/testing.h"

namespace brigade {
namespace {

namespace fs = std::filesystem;
using testing::run_brigade;
using testing::run_command;
using testing::TempDir;

const std::string kTiny =
    std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-dense.yaml" + testing::kSmallModelOverrides +
    " --set trainer.micro_batch_size=2 --set trainer.warmup_steps=2 --set trainer.eval_batches=1"
    " --set trainer.threads=1";

TEST(CliLaunch, TwoRanksTrainAndRankZeroWritesTheRun) {
  TempDir dir;
  auto r = run_brigade("launch -n 2 -- train " + kTiny + " --set trainer.max_steps=6 --set trainer.log_every=2" +
                       " --run-dir " + (dir / "run").string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("world: 2 ranks (Open MPI)"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::exists(dir / "run" / "checkpoints" / "latest")) << r.output;
  const std::string metrics = read_file(dir / "run" / "metrics.jsonl");
  EXPECT_NE(metrics.find("\"step\":6"), std::string::npos) << metrics;
}

// metrics.jsonl losses by step.
std::map<int64_t, double> losses(const fs::path& run) {
  std::map<int64_t, double> out;
  std::istringstream in(read_file(run / "metrics.jsonl"));
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) out[j["step"].get<int64_t>()] = j["loss"].get<double>();
  }
  return out;
}

// With ZeRO-1: every rank writes its optimizer shard into the checkpoint.
TEST(CliLaunch, TwoRankZeroOneStopAndResumeContinuesBitForBit) {
  TempDir dir;
  const std::string common = kTiny + " --set trainer.max_steps=10 --set trainer.log_every=1" +
                             " --set trainer.checkpoint_every=5 --set parallel.zero_stage=1";
  auto straight = run_brigade("launch -n 2 -- train " + common + " --run-dir " + (dir / "straight").string());
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  // Stopped at the step-5 checkpoint (trainer.stop_after), then resumed on 2 ranks.
  auto first = run_brigade("launch -n 2 -- train " + common + " --set trainer.stop_after=5 --run-dir " +
                           (dir / "split").string());
  ASSERT_EQ(first.exit_code, 0) << first.output;
  const fs::path step5 = dir / "split" / "checkpoints" / "step_00000005";
  EXPECT_TRUE(fs::exists(step5 / "optimizer_shards.json"));
  EXPECT_TRUE(fs::exists(step5 / "optimizer.rank00001-of-00002.safetensors"));
  EXPECT_FALSE(fs::exists(step5 / "optimizer.safetensors"));
  auto second = run_brigade("launch -n 2 -- train " + common + " --resume --run-dir " + (dir / "split").string());
  ASSERT_EQ(second.exit_code, 0) << second.output;
  const auto a = losses(dir / "straight"), b = losses(dir / "split");
  ASSERT_EQ(a.size(), 10u);
  ASSERT_EQ(b.size(), 10u);
  for (int64_t step = 6; step <= 10; ++step) EXPECT_EQ(a.at(step), b.at(step)) << "step " << step;
}

TEST(CliLaunch, TwoRankRunKilledWithSigkillResumesBitForBit) {
  TempDir dir;
  const std::string common = kTiny + " --set trainer.max_steps=1000000 --set trainer.log_every=1" +
                             " --set trainer.checkpoint_every=4 --set trainer.eval_every=0";
  auto straight = run_brigade("launch -n 2 -- train " + common + " --set trainer.stop_after=24 --run-dir " +
                              (dir / "straight").string());
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  // The same run, one rank killed with SIGKILL once a checkpoint of step >= 8 exists.
  const fs::path run = dir / "killed";
  const std::string script =
      std::string(BRIGADE_BINARY) + " launch -n 2 -- train " + common + " --run-dir " + run.string() +
      " > /dev/null 2>&1 & job=$!\n"
      "for i in $(seq 1200); do l=$(readlink " + (run / "checkpoints" / "latest").string() +
      "); [ -n \"$l\" ] && [ \"${l#step_}\" -ge 8 ] 2>/dev/null && break; sleep 0.05; done\n"
      "kill -9 $(pgrep -f '^[^ ]*brigade train .*" + run.string() + "' | tail -1)\n"
      "wait $job; echo \"exit=$?\"\n"
      "pkill -9 -f '^[^ ]*(brigade train|mpirun) .*" + run.string() + "' || true\n";
  auto killed = run_command(script);
  EXPECT_EQ(killed.output.find("exit=0"), std::string::npos) << killed.output;
  const std::string latest = fs::read_symlink(run / "checkpoints" / "latest").string();
  const int64_t resumed_at = std::stoll(latest.substr(5));
  ASSERT_GE(resumed_at, 8);
  ASSERT_LT(resumed_at, 24) << "the run was not killed before step 24";
  auto second = run_brigade("launch -n 2 -- train " + common + " --set trainer.stop_after=24 --resume --run-dir " +
                            run.string());
  ASSERT_EQ(second.exit_code, 0) << second.output;
  const auto a = losses(dir / "straight"), b = losses(run);
  for (int64_t step = resumed_at + 1; step <= 24; ++step) {
    ASSERT_TRUE(b.contains(step)) << step;
    EXPECT_EQ(a.at(step), b.at(step)) << "step " << step << " (resumed from step " << resumed_at << ")";
  }
}

// tiny-moe's 8 experts over two ranks with FP8 dispatch; the checkpoint holds
// whole expert tensors, so one process generates from it.
TEST(CliLaunch, TwoRanksTrainAnExpertParallelMoE) {
  TempDir dir;
  const std::string moe = std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-moe.yaml" + testing::kSmallModelOverrides +
                          " --set model.moe.expert_d_ff=16 --set trainer.micro_batch_size=2 --set trainer.threads=1"
                          " --set trainer.warmup_steps=2 --set trainer.eval_batches=3 --set trainer.max_steps=4";
  auto r = run_brigade("launch -n 2 -- train " + moe + " --set parallel.expert_parallel=2 --set parallel.ep_fp8_dispatch=true" +
                       " --run-dir " + (dir / "run").string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("expert parallel in groups of 2 (FP8 dispatch)"), std::string::npos) << r.output;
  EXPECT_NE(read_file(dir / "run" / "metrics.jsonl").find("\"eval_loss\""), std::string::npos);
  auto g = run_brigade("generate --checkpoint " + (dir / "run").string() + " --prompt 'Problem: 1+1' --max-new-tokens 4");
  EXPECT_EQ(g.exit_code, 0) << g.output;
  // An EP size that does not divide the ranks: one clear line, nothing trained.
  auto bad = run_brigade("launch -n 2 -- train " + moe + " --set parallel.expert_parallel=3 --run-dir " +
                         (dir / "bad").string());
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("parallel.expert_parallel (3) must divide the number of ranks (2)"), std::string::npos)
      << bad.output;
  EXPECT_FALSE(fs::exists(dir / "bad" / "metrics.jsonl"));
}

TEST(CliLaunch, BadInputGivesOneClearLine) {
  TempDir dir;
  auto r = run_brigade("launch -n 0 -- train " + kTiny);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("launch: -n must be at least 1, got 0"), std::string::npos) << r.output;
  std::ofstream(dir / "hosts") << "# two nodes\nnode1 slots=2\nnode2 slots=two\n";
  r = run_brigade("launch -n 2 --hostfile " + (dir / "hosts").string() + " -- train " + kTiny);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("hosts:3: slots needs a positive integer, got 'two'"), std::string::npos) << r.output;
  r = run_brigade("launch -n 2 --");
  EXPECT_NE(r.exit_code, 0) << r.output;
}

TEST(CliLaunch, RanksWithDifferentRecipesStopBeforeTraining) {
  TempDir dir;
  // Open MPI's MPMD syntax: one job, two ranks started with different overrides.
  const std::string rank = std::string(BRIGADE_BINARY) + " train " + kTiny + " --run-dir " + (dir / "run").string();
  auto r = run_command("timeout 120 mpirun --allow-run-as-root --oversubscribe -np 1 " + rank +
                       " --set trainer.lr=0.001 : -np 1 " + rank + " --set trainer.lr=0.002 2>&1");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("rank 1 runs a different recipe than rank 0"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "run" / "metrics.jsonl")) << "training started";
}

TEST(LaunchCommand, OversubscribesOnlyBeyondTheSlots) {
  launch::LaunchArgs a{4, {}, {"train", "r.yaml"}};
  auto cmd = launch::mpirun_command(a, "/x/brigade", 2, true);
  const std::vector<std::string> expected{"mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "4",
                                          "/x/brigade", "train", "r.yaml"};
  EXPECT_EQ(cmd, expected);
  a.ranks = 2;
  cmd = launch::mpirun_command(a, "/x/brigade", 8, false);
  EXPECT_EQ(cmd, (std::vector<std::string>{"mpirun", "-np", "2", "/x/brigade", "train", "r.yaml"}));
}

// Starts a long 2-rank run, waits until it trains, applies `signal` to one rank,
// and returns the job's output and how long it took to end after that.
struct Outcome {
  testing::CommandResult result;
  double seconds_after_signal = 0;
};

Outcome disturb_one_rank(const fs::path& dir, const std::string& signal, const std::string& extra = "") {
  const fs::path run = dir / "run";
  const std::string log = (dir / "log").string();
  // The ranks' command lines start with the executable; mpirun's starts with "mpirun".
  const std::string ranks = "pgrep -f '^[^ ]*brigade train .*" + run.string() + "'";
  const std::string script =
      std::string(BRIGADE_BINARY) + " launch -n 2 -- train " + kTiny +
      " --set trainer.max_steps=1000000 --set parallel.timeout_s=5 " + extra + " --run-dir " + run.string() + " > " + log +
      " 2>&1 & job=$!\n"
      "for i in $(seq 600); do [ -s " + (run / "metrics.jsonl").string() + " ] && break; sleep 0.1; done\n"
      "kill -" + signal + " $(" + ranks + " | tail -1)\n"
      "start=$(date +%s%N); timeout 120 tail --pid=$job -f /dev/null; wait $job; rc=$?\n"
      "echo \"exit=$rc after_ms=$(( ($(date +%s%N) - start) / 1000000 ))\"\n"
      "pkill -9 -f '^[^ ]*(brigade train|mpirun) .*" + run.string() + "' || true\n"  // not this script itself
      "cat " + log + "\n";
  Outcome out;
  out.result = run_command(script);
  const auto at = out.result.output.find("after_ms=");
  if (at != std::string::npos) out.seconds_after_signal = std::stod(out.result.output.substr(at + 9)) / 1000.0;
  std::printf("job ended %.1f s after SIG%s\n", out.seconds_after_signal, signal == "9" ? "KILL" : signal.c_str());
  return out;
}

TEST(CliLaunch, AHungRankStopsTheJobWithAnErrorNamingRankAndCollective) {
  TempDir dir;
  auto out = disturb_one_rank(dir.path(), "STOP");  // the rank stays alive but never answers
  EXPECT_EQ(out.result.output.find("exit=0 "), std::string::npos) << out.result.output;
  EXPECT_NE(out.result.output.find("brigade: error (rank "), std::string::npos) << out.result.output;
  EXPECT_NE(out.result.output.find("of world did not finish within 5 s: another rank died or hangs"),
            std::string::npos)
      << out.result.output;
  EXPECT_LT(out.seconds_after_signal, 60.0) << out.result.output;
}

TEST(CliLaunch, AKilledRankStopsTheJob) {
  TempDir dir;
  auto out = disturb_one_rank(dir.path(), "9");
  EXPECT_EQ(out.result.output.find("exit=0 "), std::string::npos) << out.result.output;
  EXPECT_LT(out.seconds_after_signal, 60.0) << out.result.output;
}

// A stage of a 2-stage pipeline that stops answering: its neighbour's point-to-point
// wait (or the step's sum) times out and ends the job with an error.
TEST(CliLaunch, AHungPipelineStageStopsTheJob) {
  TempDir dir;
  auto out = disturb_one_rank(dir.path(), "STOP", "--set parallel.pipeline_parallel=2 --set trainer.grad_accum_steps=2");
  EXPECT_EQ(out.result.output.find("exit=0 "), std::string::npos) << out.result.output;
  EXPECT_NE(out.result.output.find("did not finish within 5 s: another rank died or hangs"), std::string::npos)
      << out.result.output;
  EXPECT_LT(out.seconds_after_signal, 60.0) << out.result.output;
}

}  // namespace
}  // namespace brigade
