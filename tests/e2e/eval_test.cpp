// `brigade eval` end to end: a small trained checkpoint scored on a problem set,
// locally and through `brigade serve` (the same model, so the same greedy answers),
// resumed from its trace store, and refused when the store belongs to other settings.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "data/arith.h"
#include "distill/eval.h"
#include "tests/testing.h"

namespace brigade {
namespace {

namespace fs = std::filesystem;
using testing::Background;
using testing::run_brigade;
using testing::TempDir;
using testing::wait_for;

std::vector<nlohmann::json> jsonl(const fs::path& file) {
  std::vector<nlohmann::json> out;
  std::istringstream in(read_file(file));
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  }
  return out;
}

TEST(CliEval, ScoresACheckpointLocallyAndThroughServe) {
  TempDir dir;
  auto train = run_brigade("train " + std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-dense.yaml" +
                           testing::kSmallModelOverrides +
                           " --set trainer.lr=0.01 --set trainer.max_steps=150 --set trainer.warmup_steps=5"
                           " --set trainer.micro_batch_size=8 --set trainer.eval_every=0 --set trainer.threads=1"
                           " --set trainer.checkpoint_every=0 --run-dir " + (dir / "run").string());
  ASSERT_EQ(train.exit_code, 0) << train.output;

  // Held-out arithmetic problems in brigade's prompt format, answers in \boxed{}.
  {
    data::ArithmeticOptions synth;
    std::ofstream out(dir / "problems.jsonl");
    for (uint64_t i = 0; i < 8; ++i) {
      const auto p = data::make_arithmetic_problem(synth, 100000 + i);
      out << nlohmann::json{{"id", "q" + std::to_string(i)}, {"prompt", p.prompt}, {"answer", p.answer}}.dump() << "\n";
    }
  }
  const std::string base = "eval --checkpoint " + (dir / "run").string() + " --problems " +
                           (dir / "problems.jsonl").string() + " --answer boxed --max-new-tokens 40";
  auto sampled = run_brigade(base + " -n 3 --k 1,2,3 --temperature 0.8 --out " + (dir / "sampled").string());
  ASSERT_EQ(sampled.exit_code, 0) << sampled.output;
  const auto result = nlohmann::json::parse(read_file(dir / "sampled" / "eval.json"));
  const auto samples = jsonl(dir / "sampled" / "samples.jsonl");
  ASSERT_EQ(samples.size(), 24u);
  // The reported pass@k are the estimator applied to the per-sample verdicts.
  std::map<std::string, int64_t> correct;
  for (const auto& s : samples) correct[s["prompt_id"].get<std::string>()] += s["correct"].get<bool>() ? 1 : 0;
  ASSERT_EQ(correct.size(), 8u);
  for (int64_t k = 1; k <= 3; ++k) {
    double expected = 0;
    for (const auto& [id, c] : correct) expected += distill::pass_at_k(3, c, k) / 8.0;
    EXPECT_NEAR(result["pass"]["pass@" + std::to_string(k)].get<double>(), expected, 1e-12) << k;
  }
  EXPECT_NE(sampled.output.find("| model | problems | samples | pass@1 | pass@2 | pass@3 |"), std::string::npos)
      << sampled.output;

  // A rerun draws nothing new and reports the same; other settings on the same store are refused.
  auto again = run_brigade(base + " -n 3 --k 1,2,3 --temperature 0.8 --out " + (dir / "sampled").string());
  ASSERT_EQ(again.exit_code, 0) << again.output;
  EXPECT_NE(again.output.find("24 of 24 samples already in"), std::string::npos) << again.output;
  EXPECT_EQ(nlohmann::json::parse(read_file(dir / "sampled" / "eval.json")), result);
  auto other = run_brigade(base + " -n 3 --temperature 0.5 --out " + (dir / "sampled").string());
  EXPECT_NE(other.exit_code, 0);
  EXPECT_NE(other.output.find("holds samples drawn with another model"), std::string::npos) << other.output;
  auto bad_k = run_brigade(base + " -n 2 --k 3 --temperature 0.8 --out " + (dir / "badk").string());
  EXPECT_NE(bad_k.exit_code, 0);
  EXPECT_NE(bad_k.output.find("--k 3 needs 1 <= k <= --samples (2)"), std::string::npos) << bad_k.output;

  // Greedy, locally and through brigade serve: the same answers.
  auto local = run_brigade(base + " --out " + (dir / "greedy-local").string());
  ASSERT_EQ(local.exit_code, 0) << local.output;
  Background server(std::string(BRIGADE_BINARY) + " serve --checkpoint " + (dir / "run").string() +
                        " --port 0 --port-file " + (dir / "port").string(),
                    dir / "serve.log");
  std::string port;
  ASSERT_TRUE(wait_for([&] {
    if (!fs::exists(dir / "port")) return false;
    port = read_file(dir / "port");
    while (!port.empty() && port.back() == '\n') port.pop_back();
    return !port.empty();
  }, 120)) << read_file(dir / "serve.log");
  auto remote = run_brigade("eval --url http://127.0.0.1:" + port + "/v1 --model tiny --problems " +
                            (dir / "problems.jsonl").string() + " --answer boxed --max-new-tokens 40 --out " +
                            (dir / "greedy-remote").string());
  ASSERT_EQ(remote.exit_code, 0) << remote.output;
  const auto local_samples = jsonl(dir / "greedy-local" / "samples.jsonl");
  const auto remote_samples = jsonl(dir / "greedy-remote" / "samples.jsonl");
  ASSERT_EQ(local_samples.size(), 8u);
  ASSERT_EQ(remote_samples.size(), 8u);
  for (size_t i = 0; i < 8; ++i) {
    EXPECT_EQ(local_samples[i]["answer"], remote_samples[i]["answer"]) << i;
    EXPECT_EQ(local_samples[i]["correct"], remote_samples[i]["correct"]) << i;
  }
}

}  // namespace
}  // namespace brigade
