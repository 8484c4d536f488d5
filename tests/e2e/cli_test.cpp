// End-to-end tests: drive the real build/brigade binary as a user would.
#include <gtest/gtest.h>

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "tests/testing.h"

namespace brigade {
namespace {

namespace fs = std::filesystem;
using testing::run_brigade;
using testing::run_command;
using testing::TempDir;

const std::string kSmall =
    testing::kSmallModelOverrides + " --set trainer.micro_batch_size=4 --set trainer.warmup_steps=2 --set trainer.eval_batches=2"
    " --set trainer.threads=1";

std::string recipe() { return std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-dense.yaml"; }

// Every file under `dir` with its content, to prove a failed command changed nothing.
std::map<std::string, std::string> snapshot(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.is_regular_file() && !e.is_symlink()) out[e.path().string()] = read_file(e.path());
    if (e.is_symlink()) out[e.path().string()] = fs::read_symlink(e.path()).string();
  }
  return out;
}

// Expects a failing command with one clear error line containing `text`.
void expect_error(const testing::CommandResult& r, const std::string& text) {
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("brigade: error: "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(text), std::string::npos) << "expected '" << text << "' in:\n" << r.output;
}

class CliTest : public ::testing::Test {
 protected:
  // One trained run shared by the tests of this fixture.
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    auto r = run_brigade("train " + recipe() + kSmall + " --set trainer.max_steps=12 --set trainer.log_every=3" +
                         " --set trainer.checkpoint_every=6 --run-dir " + (dir_->path() / "run").string());
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  static void TearDownTestSuite() { delete dir_; }
  static fs::path run() { return dir_->path() / "run"; }
  static TempDir* dir_;
};
TempDir* CliTest::dir_ = nullptr;

TEST_F(CliTest, TrainWritesRunDirectoryContract) {
  EXPECT_TRUE(fs::exists(run() / "recipe.yaml"));
  EXPECT_TRUE(fs::is_symlink(run() / "checkpoints" / "latest"));
  EXPECT_EQ(fs::read_symlink(run() / "checkpoints" / "latest"), "step_00000012");
  for (auto f : {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json", "recipe.yaml"})
    EXPECT_TRUE(fs::exists(run() / "checkpoints" / "step_00000012" / f)) << f;
  std::ifstream in(run() / "metrics.jsonl");
  int train_lines = 0;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    ASSERT_TRUE(j.contains("step"));
    if (!j.contains("loss")) continue;
    ++train_lines;
    for (auto key : {"loss", "lr", "grad_norm", "tokens_per_sec"}) EXPECT_TRUE(j.contains(key)) << key << ": " << line;
    EXPECT_GT(j["tokens_per_sec"].get<double>(), 0.0);
  }
  EXPECT_EQ(train_lines, 4);
}

TEST_F(CliTest, GeneratePrintsPromptAndContinuation) {
  auto r = run_brigade("generate --checkpoint " + run().string() + " --prompt 'Problem: 2+3' --max-new-tokens 8");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("Problem: 2+3"), std::string::npos) << r.output;
  auto sampled = run_brigade("generate --checkpoint " + run().string() +
                             " --prompt 'Problem: 2+3' --max-new-tokens 8 --temperature 0.8 --top-k 20 --top-p 0.9 --seed 7");
  EXPECT_EQ(sampled.exit_code, 0) << sampled.output;
}

TEST_F(CliTest, ExistingRunIsNotOverwrittenWithoutResume) {
  auto before = snapshot(run());
  auto r = run_brigade("train " + recipe() + kSmall + " --set trainer.max_steps=12 --run-dir " + run().string());
  expect_error(r, "already holds a run; pass --resume");
  EXPECT_EQ(before, snapshot(run()));
}

TEST_F(CliTest, CheckpointFromDifferentModelShapeIsRejectedAndNothingChanges) {
  auto before = snapshot(run());
  auto r = run_brigade("train " + recipe() + kSmall + " --set model.d_model=64 --set trainer.max_steps=20 --resume --run-dir " +
                       run().string());
  expect_error(r, "different model shape: model.d_model: checkpoint 32, recipe 64");
  EXPECT_EQ(before, snapshot(run()));
  auto g = run_brigade("generate --checkpoint " + run().string() + " --prompt x --set model.n_layers=3");
  expect_error(g, "different model shape");
}

TEST_F(CliTest, RecipeShowPrintsEffectiveRecipe) {
  auto r = run_brigade("recipe show " + std::string(BRIGADE_SOURCE_DIR) + "/recipes/small-dense.yaml --set trainer.lr=0.002");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("d_model: 512"), std::string::npos);       // the file
  EXPECT_NE(r.output.find("tie_embeddings: true"), std::string::npos);  // inherited
  EXPECT_NE(r.output.find("lr: 0.002"), std::string::npos);           // the override
}

TEST(CliBadInput, EachGivesOneClearLine) {
  TempDir dir;
  write_file_atomic(dir / "typo.yaml", "model:\n  d_model: 64\n  n_layrs: 3\n");
  expect_error(run_brigade("train " + (dir / "typo.yaml").string()), "typo.yaml:3: unknown key 'model.n_layrs' (did you mean 'model.n_layers'?)");
  write_file_atomic(dir / "type.yaml", "trainer:\n  lr: fast\n");
  expect_error(run_brigade("train " + (dir / "type.yaml").string()), "type.yaml:2: trainer.lr: expected a number, got 'fast'");
  expect_error(run_brigade("train " + (dir / "missing.yaml").string()), "recipe not found");
  expect_error(run_brigade("train " + recipe() + " --set trainer.lr=-1"), "--set trainer.lr=-1: trainer.lr = -1 is out of range");
  expect_error(run_brigade("train " + recipe() + " --set model.n_heads=3"), "model.n_heads (3) must divide model.d_model (128)");
  expect_error(run_brigade("train " + recipe() + " --set trainer.bogus=1"), "unknown key 'trainer.bogus'");
  expect_error(run_brigade("generate --checkpoint " + (dir / "nowhere").string() + " --prompt x"), "checkpoint not found");
  EXPECT_FALSE(fs::exists("runs/typo"));
}

TEST(CliBadInput, BadShardsNameTheFile) {
  TempDir dir;
  write_file_atomic(dir / "corpus.txt", std::string(3000, 'a') + "\n\n" + std::string(3000, 'b') + "\n");
  auto prep = run_brigade("data prepare --input " + (dir / "corpus.txt").string() + " --out " + (dir / "shards").string());
  ASSERT_EQ(prep.exit_code, 0) << prep.output;
  const fs::path shard = dir / "shards" / "shard_00000.bin";
  ASSERT_TRUE(fs::exists(shard));
  const std::string good = read_file(shard);
  const std::string train = "train " + recipe() + kSmall + " --set data.source=shards --set data.eval_fraction=0.1"
                            " --set trainer.max_steps=2 --set data.shards=" + shard.string() + " --run-dir ";
  auto ok = run_brigade(train + (dir / "ok").string());
  EXPECT_EQ(ok.exit_code, 0) << ok.output;

  write_file_atomic(shard, good.substr(0, good.size() - 100));  // truncated
  auto r = run_brigade(train + (dir / "r1").string());
  expect_error(r, shard.string());
  expect_error(r, "truncated");
  write_file_atomic(shard, good + "extra");  // header disagrees with the size
  expect_error(run_brigade(train + (dir / "r2").string()), "trailing bytes");
  write_file_atomic(shard, "garbage");
  expect_error(run_brigade(train + (dir / "r3").string()), shard.string());
  fs::remove(shard);
  expect_error(run_brigade(train + (dir / "r4").string()), shard.string());
  for (auto r : {"r1", "r2", "r3", "r4"}) EXPECT_FALSE(fs::exists(dir / r)) << r;
}

TEST(CliResume, KilledRunLeavesALoadableCheckpointAndResumes) {
  TempDir dir;
  const fs::path run = dir / "run";
  const std::string args = "train " + recipe() + kSmall +
                           " --set trainer.max_steps=1000000 --set trainer.checkpoint_every=2 --set trainer.eval_every=0"
                           " --run-dir " + run.string();
  // Kill -9 at a few different moments; every time the latest checkpoint must load.
  for (int delay_ms : {700, 1100, 1500}) {
    const std::string cmd = std::string(BRIGADE_BINARY) + " " + args + (fs::exists(run) ? " --resume" : "") +
                            " > /dev/null 2>&1 & echo $!";
    auto started = run_command(cmd);
    const pid_t pid = std::stoi(started.output);
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    ::kill(pid, SIGKILL);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (!fs::exists(run / "checkpoints" / "latest")) continue;  // killed before the first checkpoint
    auto g = run_brigade("generate --checkpoint " + run.string() + " --prompt 'Problem: 1+1' --max-new-tokens 4");
    EXPECT_EQ(g.exit_code, 0) << "after kill at " << delay_ms << " ms: " << g.output;
  }
  ASSERT_TRUE(fs::exists(run / "checkpoints" / "latest")) << "no checkpoint written at all";
  const std::string latest = fs::read_symlink(run / "checkpoints" / "latest").string();
  const int64_t step = std::stoll(latest.substr(5));
  auto r = run_brigade(args + " --resume --set trainer.stop_after=" + std::to_string(step + 4));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resumed from"), std::string::npos) << r.output;
  char expected[32];
  std::snprintf(expected, sizeof expected, "step_%08lld", static_cast<long long>(step + 4));
  EXPECT_EQ(fs::read_symlink(run / "checkpoints" / "latest").string(), expected);
}

// Preemption as Slurm does it: SIGTERM (twice: the second arrives while the first is
// being handled) to a running `brigade train`. It ends after the current step with a
// checkpoint of that step, exits 75 (requeue), and --resume reaches the weights of
// the uninterrupted run bit for bit.
TEST(CliPreemption, SigtermWritesACheckpointExits75AndResumesBitwise) {
  TempDir dir;
  const std::string common = "train " + recipe() + kSmall +
                             " --set trainer.max_steps=80 --set trainer.checkpoint_every=0 --set trainer.eval_every=0"
                             " --set trainer.log_every=1 --run-dir ";
  auto straight = run_brigade(common + (dir / "straight").string());
  ASSERT_EQ(straight.exit_code, 0) << straight.output;
  const fs::path run = dir / "run";
  const std::string script = std::string(BRIGADE_BINARY) + " " + common + run.string() + " > " +
                             (dir / "log").string() + " 2>&1 & pid=$!; m=" + (run / "metrics.jsonl").string() +
                             "; for i in $(seq 600); do [ -f $m ] && [ $(wc -l < $m) -ge 5 ] && break; sleep 0.02; done;"
                             " kill -TERM $pid; kill -TERM $pid; wait $pid; echo \"rc=$?\"";
  auto stopped = testing::run_command("bash -c '" + script + "'");
  const std::string log = read_file(dir / "log");
  ASSERT_NE(stopped.output.find("rc=75"), std::string::npos) << stopped.output << log;
  const auto at = log.find("stopped by a signal at step ");
  ASSERT_NE(at, std::string::npos) << log;
  const int64_t step = std::stoll(log.substr(at + 28));
  EXPECT_GE(step, 5);
  EXPECT_LT(step, 80) << "the run finished before the signal: nothing was tested";
  char name[32];
  std::snprintf(name, sizeof name, "step_%08lld", static_cast<long long>(step));
  EXPECT_EQ(fs::read_symlink(run / "checkpoints" / "latest").string(), name);

  auto resumed = run_brigade(common + run.string() + " --resume");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  const auto a = read_file(run / "checkpoints" / "step_00000080" / "model.safetensors");
  const auto b = read_file(dir / "straight" / "checkpoints" / "step_00000080" / "model.safetensors");
  EXPECT_TRUE(a == b) << "the resumed run's weights differ from the uninterrupted run's";
}

}  // namespace
}  // namespace brigade

namespace brigade {
namespace {

// The balance criterion on the shipped tiny-moe recipe, through the CLI:
// with the aux-loss-free bias update on, each MoE layer's max/mean expert load,
// averaged over the last 20% of steps, is at most 1.3. (bench/moe_balance.py
// reports the same run beside the one with the update off.)
TEST(CliMoE, TinyMoEBalancesExpertLoad) {
  testing::TempDir dir;
  const std::string recipe = std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-moe.yaml";
  // One compute thread: CTest runs other tests beside this one, and OpenMP threads
  // of oversubscribed processes slow each other down badly.
  auto r = testing::run_brigade("train " + recipe + " --set trainer.log_every=1 --set trainer.eval_every=0" +
                                " --set trainer.checkpoint_every=0 --set trainer.threads=1 --run-dir " +
                                (dir / "run").string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("activated per token"), std::string::npos) << r.output;
  std::ifstream in(dir / "run" / "metrics.jsonl");
  std::vector<std::vector<double>> loads;  // per step, per layer
  std::vector<double> losses;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (!j.contains("moe_load_max_over_mean")) continue;
    loads.push_back(j["moe_load_max_over_mean"].get<std::vector<double>>());
    losses.push_back(j["loss"].get<double>());
  }
  ASSERT_EQ(loads.size(), 600u);
  ASSERT_EQ(loads[0].size(), 3u);  // layers 1..3 (first_k_dense: 1)
  const size_t tail = loads.size() * 4 / 5;
  for (size_t layer = 0; layer < 3; ++layer) {
    double sum = 0.0, first = 0.0;
    for (size_t s = tail; s < loads.size(); ++s) sum += loads[s][layer];
    for (size_t s = 0; s < 20; ++s) first += loads[s][layer] / 20.0;
    const double mean = sum / static_cast<double>(loads.size() - tail);
    EXPECT_LE(mean, 1.3) << "layer " << layer + 1;
    std::cout << "layer " << layer + 1 << ": max/mean load " << first << " over the first 20 steps, " << mean
              << " over the last 20%\n";
  }
  EXPECT_LT(losses.back(), 0.7 * losses.front());
}

}  // namespace
}  // namespace brigade
