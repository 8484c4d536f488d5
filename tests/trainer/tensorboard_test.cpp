// TensorBoard event files: the record framing and CRC-32C against known values, the
// metrics flattening, and a trained + resumed run read back by the tensorboard
// package's own reader (every metrics.jsonl value, each step once).
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "recipes/build.h"
#include "recipes/recipe.h"
#include "tests/testing.h"
#include "trainer/tensorboard.h"

namespace brigade::trainer {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

TEST(TensorBoard, Crc32cAndRecordFraming) {
  EXPECT_EQ(crc32c("123456789"), 0xe3069283u);  // the CRC-32C check value
  EXPECT_EQ(crc32c(""), 0u);
  EXPECT_EQ(crc32c(std::string(32, '\0')), 0x8a9136aau);  // RFC 3720, 32 zero bytes
  const std::string record = tf_record("abc");
  ASSERT_EQ(record.size(), 8u + 4u + 3u + 4u);
  EXPECT_EQ(record.substr(12, 3), "abc");
  EXPECT_EQ(static_cast<uint8_t>(record[0]), 3);
}

TEST(TensorBoard, MetricsBecomeTaggedScalars) {
  const auto record = nlohmann::json::parse(
      R"({"step": 7, "loss": 1.5, "phase": "train", "moe_load": [1.0, 2.0], "fp8": {"amax": 3.0}, "ok": true})");
  const auto scalars = scalars_of(record);
  const std::map<std::string, double> got(scalars.begin(), scalars.end());
  const std::map<std::string, double> want = {{"loss", 1.5}, {"moe_load/0", 1.0}, {"moe_load/1", 2.0}, {"fp8/amax", 3.0}};
  EXPECT_EQ(got, want);
}

// A tiny MoE run stopped at step 20, resumed to 40: TensorBoard's reader sees every
// number of metrics.jsonl at its step, once, as float32.
TEST(TensorBoard, ResumedRunReadsBackInTensorBoard) {
  TempDir dir;
  const std::string recipe = std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-moe.yaml";
  const std::string shrink =
      " --set model.d_model=32 --set model.n_layers=2 --set model.d_ff=64 --set model.max_seq_len=64"
      " --set model.moe.expert_d_ff=16 --set data.seq_len=32 --set data.synthetic.num_problems=200"
      " --set data.synthetic.eval_problems=20 --set trainer.max_steps=40 --set trainer.warmup_steps=2"
      " --set trainer.micro_batch_size=2 --set trainer.log_every=5 --set trainer.eval_every=10"
      " --set trainer.checkpoint_every=10";
  const fs::path run = dir / "run";
  // The first attempt dies after step 25 (its events of steps 21-25 get redone).
  auto first = testing::run_brigade("train " + recipe + shrink + " --set trainer.stop_after=25 --run-dir " + run.string());
  ASSERT_EQ(first.exit_code, 0) << first.output;
  fs::remove_all(run / "checkpoints" / "step_00000025");
  fs::remove(run / "checkpoints" / "latest");
  fs::create_directory_symlink("step_00000020", run / "checkpoints" / "latest");
  auto resumed = testing::run_brigade("train " + recipe + shrink + " --resume --run-dir " + run.string());
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;

  auto check = testing::run_command(std::string(BRIGADE_VENV_PYTHON) + " " + BRIGADE_SOURCE_DIR +
                                    "/tests/trainer/tensorboard_check.py " + (run / "tensorboard").string() + " 2>&1");
  if (check.exit_code == 3) GTEST_SKIP() << check.output;
  ASSERT_EQ(check.exit_code, 0) << check.output;
  const auto tb = nlohmann::json::parse(check.output.substr(check.output.find("{\"files\"")));
  EXPECT_EQ(tb["files"], 1);
  EXPECT_EQ(tb["version"], "brain.Event:2");

  // What metrics.jsonl says, as TensorBoard stores it (float32).
  std::map<std::string, std::vector<std::pair<int64_t, float>>> want;
  std::ifstream in(run / "metrics.jsonl");
  int64_t records = 0;
  for (std::string l; std::getline(in, l);) {
    const auto record = nlohmann::json::parse(l);
    ++records;
    for (const auto& [tag, v] : scalars_of(record))
      want[tag].emplace_back(record["step"].get<int64_t>(), static_cast<float>(v));
  }
  ASSERT_GT(records, 8);
  for (const char* tag : {"loss", "lr", "grad_norm", "tokens_per_sec", "eval_loss", "moe_load_max_over_mean/0"})
    EXPECT_TRUE(want.contains(tag)) << tag;
  std::map<std::string, std::vector<std::pair<int64_t, float>>> got;
  for (const auto& [tag, points] : tb["scalars"].items())
    for (const auto& p : points) got[tag].emplace_back(p[0].get<int64_t>(), p[1].get<float>());
  EXPECT_EQ(got, want);
  const auto& loss = got["loss"];
  std::set<int64_t> steps;
  for (const auto& [s, v] : loss) steps.insert(s);
  EXPECT_EQ(steps.size(), loss.size()) << "a step twice: the resumed run duplicated its curve";
  EXPECT_EQ(loss.size(), 8u);  // steps 5, 10, ..., 40
}

}  // namespace
}  // namespace brigade::trainer
