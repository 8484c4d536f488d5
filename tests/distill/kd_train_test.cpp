// Logit distillation in training: the build stage's kd.safetensors puts each
// teacher record at the shard position that predicts its token, the trainer mixes
// kd_loss into the cross-entropy (weight 0 is plain SFT bit for bit), and the
// recipe rejects KD without the teacher's logprobs.
#include <gtest/gtest.h>

#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/fs.h"
#include "data/corpus.h"
#include "data/tokenizer.h"
#include "distill/build.h"
#include "distill/kd_objective.h"
#include "distill/traces.h"
#include "model/safetensors.h"
#include "recipes/build.h"
#include "recipes/recipe.h"
#include "tests/distill/kd_fixture.h"
#include "tests/testing.h"
#include "trainer/trainer.h"

namespace brigade::distill {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

constexpr int64_t kK = 4;

struct Sample {
  std::string prompt;
  std::string completion;
  int64_t records;  // teacher records; completion tokens + 1 (the EOS) aligns
};

// The teacher's top-k for `records` generated tokens: the most likely id is the
// token it generated (the completion's bytes, then EOS), the others are distinct.
Trace teacher_trace(const data::Tokenizer& tok, const std::string& id, const Sample& s) {
  std::vector<int64_t> generated = tok.encode(s.completion);
  generated.push_back(tok.eos_id());
  Trace t;
  t.prompt_id = id;
  t.text = s.completion;
  t.finish_reason = "stop";
  t.prompt_tokens = static_cast<int64_t>(tok.encode(s.prompt).size()) + 1;
  t.completion_tokens = s.records;
  t.topk_ids = torch::empty({s.records, kK}, torch::kInt32);
  t.topk_logprobs = torch::tensor({-0.2f, -2.0f, -3.0f, -4.5f}).repeat({s.records, 1});
  for (int64_t r = 0; r < s.records; ++r) {
    const int64_t first = r < static_cast<int64_t>(generated.size()) ? generated[static_cast<size_t>(r)] : 'z';
    for (int64_t j = 0; j < kK; ++j) t.topk_ids[r][j] = static_cast<int32_t>(j == 0 ? first : (first + 7 * j) % 250);
  }
  return t;
}

// A trace store and the accepted.jsonl verify would write for `samples`.
void write_accepted(const fs::path& dir, const data::Tokenizer& tok, const std::vector<Sample>& samples) {
  {
    TraceWriter writer(dir / "traces", kK);
    for (size_t i = 0; i < samples.size(); ++i) writer.append(teacher_trace(tok, "p" + std::to_string(i), samples[i]));
    writer.flush();
  }
  const TraceReader reader(dir / "traces");
  std::ofstream out(dir / "accepted.jsonl");
  for (size_t i = 0; i < samples.size(); ++i) {
    const auto& range = reader.topk_range(static_cast<int64_t>(i));
    out << nlohmann::json{{"prompt_id", "p" + std::to_string(i)}, {"sample", 0}, {"prompt", samples[i].prompt},
                          {"completion", samples[i].completion}, {"answer", "1"},
                          {"topk", {{"offset", range.offset}, {"positions", range.positions}}}}
               .dump()
        << "\n";
  }
}

TEST(DistillKdBuild, TeacherRecordsLandAtThePositionsThatPredictTheirTokens) {
  TempDir dir;
  const auto tok = data::make_tokenizer("byte");
  // Rows of 16 tokens. Row 0: "ab"+"xyz" at 0 (7 tokens), "c"+"uv" at 7 (5 tokens).
  // Row 1: "ef"+"pqr" at 16 with two records short (misaligned), "d"+"w" at 23
  // without the EOS record (as servers report it: aligned, the EOS has no target).
  write_accepted(dir.path(), *tok, {{"ab", "xyz", 4}, {"c", "uv", 3}, {"ef", "pqr", 2}, {"d", "w", 1}});
  const auto stats = build_sft_shard(dir / "accepted.jsonl", *tok, /*seq_len=*/15, dir / "build",
                                     dir / "traces" / kTopkFile);
  EXPECT_EQ(stats["rows"].get<int64_t>(), 2);
  EXPECT_EQ(stats["kd_documents"].get<int64_t>(), 3);
  EXPECT_EQ(stats["kd_misaligned"].get<int64_t>(), 1);
  EXPECT_EQ(stats["kd_k"].get<int64_t>(), kK);
  EXPECT_EQ(nlohmann::json::parse(read_file(dir / "build" / "build.json"))["kd_misaligned"].get<int64_t>(), 1);

  const auto targets = load_kd_targets(dir / "build" / kKdTargets);
  ASSERT_EQ(targets.tokens(), 32);
  ASSERT_EQ(targets.k(), kK);
  // Document at o with P context tokens: records at o + P - 1 .. o + P - 1 + n.
  const std::set<int64_t> expected = {2, 3, 4, 5, 8, 9, 10, 24};
  auto corpus = data::TokenCorpus::from_shards({dir / "build" / kSftShard});
  std::vector<int64_t> tokens(32);
  std::vector<uint8_t> mask(32);
  corpus.read(0, 32, tokens.data(), mask.data());
  for (int64_t j = 0; j < 32; ++j) {
    const bool valid = targets.valid[j].item<uint8_t>() == 1;
    EXPECT_EQ(valid, expected.count(j) == 1) << "position " << j;
    if (!valid) continue;
    // The teacher's top-1 is the token it generated: the shard's next token, which is trained.
    EXPECT_EQ(targets.ids[j][0].item<int32_t>(), tokens[static_cast<size_t>(j + 1)]) << "position " << j;
    EXPECT_EQ(mask[static_cast<size_t>(j + 1)], 1) << "position " << j;
    EXPECT_FLOAT_EQ(targets.logprobs[j][1].item<float>(), -2.0f);
  }
  EXPECT_EQ(targets.ids[5][0].item<int32_t>(), tok->eos_id());  // "xyz"'s EOS record
  EXPECT_EQ(targets.ids[24][0].item<int32_t>(), 'w');  // "w" has no EOS record: position 25 has no target

  // Without a sidecar: the shard alone, no KD targets.
  const auto plain = build_sft_shard(dir / "accepted.jsonl", *tok, 15, dir / "plain");
  EXPECT_FALSE(plain.contains("kd_documents"));
  EXPECT_FALSE(fs::exists(dir / "plain" / kKdTargets));
}

recipes::Recipe kd_recipe(const fs::path& build, const std::vector<std::string>& kd) {
  const std::string yaml = R"(
name: kd
model: {vocab_size: 264, d_model: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 64, max_seq_len: 64}
data: {seq_len: 32, source: shards, packed: true, eval_fraction: 0.1}
trainer: {max_steps: 12, micro_batch_size: 4, warmup_steps: 2, lr: 0.01, log_every: 1,
          eval_every: 0, eval_batches: 1, checkpoint_every: 0, threads: 1}
)";
  std::vector<std::string> overrides = testing::kd_data_settings(build);
  overrides.insert(overrides.end(), kd.begin(), kd.end());
  return recipes::parse_recipe(yaml, "kd.yaml", overrides);
}

struct TrainRun {
  std::vector<double> losses;
  std::vector<double> kd;  // metrics.jsonl's kd_loss per step (empty without KD)
  model::NamedTensors params;
};

TrainRun train(const recipes::Recipe& recipe, const fs::path& run_dir) {
  auto t = recipes::build_trainer(recipe, run_dir);
  t->run();
  TrainRun r;
  std::istringstream metrics(read_file(run_dir / "metrics.jsonl"));
  for (std::string line; std::getline(metrics, line);) {
    const auto j = nlohmann::json::parse(line);
    if (!j.contains("loss")) continue;
    r.losses.push_back(j["loss"].get<double>());
    if (j.contains("kd_loss")) r.kd.push_back(j["kd_loss"].get<double>());
  }
  for (const auto& item : t->model()->named_parameters()) r.params.emplace_back(item.key(), item.value().clone());
  return r;
}

TEST(DistillKdTrain, WeightZeroIsPlainSftBitForBitAndKdTrains) {
  TempDir dir;
  const auto build = testing::build_kd_shard(dir.path());
  const TrainRun sft = train(kd_recipe(build, {}), dir / "sft");
  const TrainRun zero = train(kd_recipe(build, {"distill.kd.loss=forward_kl", "distill.kd.weight=0"}), dir / "zero");
  ASSERT_EQ(sft.losses.size(), 12u);
  EXPECT_TRUE(sft.kd.empty());
  ASSERT_EQ(zero.losses.size(), sft.losses.size());
  for (size_t i = 0; i < sft.losses.size(); ++i) EXPECT_EQ(zero.losses[i], sft.losses[i]) << "step " << i + 1;
  ASSERT_EQ(zero.params.size(), sft.params.size());
  for (size_t i = 0; i < sft.params.size(); ++i) {
    EXPECT_TRUE(torch::equal(zero.params[i].second, sft.params[i].second)) << sft.params[i].first;
  }
  // At weight 0 the KD term is still measured: positive, finite, one per step.
  ASSERT_EQ(zero.kd.size(), 12u);
  EXPECT_GT(zero.kd.front(), 0.0);

  // Weight 1: only KD trains, and it falls; a mixed loss differs from SFT's.
  const TrainRun kd = train(kd_recipe(build, {"distill.kd.loss=forward_kl", "distill.kd.weight=1"}), dir / "kd");
  ASSERT_EQ(kd.kd.size(), 12u);
  for (double v : kd.kd) EXPECT_TRUE(std::isfinite(v));
  EXPECT_LT(kd.kd.back(), 0.7 * kd.kd.front());
  const TrainRun mixed = train(kd_recipe(build, {"distill.kd.loss=jsd", "distill.kd.weight=0.5", "distill.kd.temperature=2"}),
                          dir / "mixed");
  ASSERT_EQ(mixed.losses.size(), 12u);
  EXPECT_NE(mixed.losses.front(), sft.losses.front());
  for (double v : mixed.losses) EXPECT_TRUE(std::isfinite(v));
  // Step 1 starts from the same weights: its loss is exactly the mix of the two terms.
  EXPECT_NEAR(mixed.losses.front(), 0.5 * sft.losses.front() + 0.5 * mixed.kd.front(), 1e-5);
}

TEST(DistillKdTrain, KdWithoutItsInputsIsAClearError) {
  TempDir dir;
  const std::string yaml = "name: kd\ndistill: {kd: {loss: forward_kl}}\n";
  EXPECT_BRIGADE_ERROR(recipes::parse_recipe(yaml, "kd.yaml", {}), "distill.generate.logprobs");
  EXPECT_BRIGADE_ERROR(recipes::parse_recipe(yaml, "kd.yaml", {}), "distill.kd.loss is forward_kl");
  // KD on the synthetic corpus (no teacher top-k to read).
  EXPECT_BRIGADE_ERROR(recipes::build_trainer(recipes::parse_recipe(yaml, "kd.yaml", {"distill.generate.logprobs=4"}),
                                              dir.path()),
                       "data.kd_file");
  const auto build = testing::build_kd_shard(dir.path());
  EXPECT_BRIGADE_ERROR(
      recipes::build_trainer(kd_recipe(build, {"distill.kd.loss=reverse_kl", "data.kd_file=" + (dir / "none").string()}),
                             dir / "run"),
      "do not exist");
}

}  // namespace
}  // namespace brigade::distill

namespace brigade::testing {

std::filesystem::path build_kd_shard(const std::filesystem::path& dir) {
  const auto tok = data::make_tokenizer("byte");
  std::vector<distill::Sample> samples;
  for (int i = 0; i < 24; ++i) {
    const std::string completion = "<t>" + std::to_string(i * 7) + "</t>=" + std::to_string(i * 37 % 100);
    samples.push_back({"Q" + std::to_string(i) + "*7?", completion, static_cast<int64_t>(completion.size()) + 1});
  }
  distill::write_accepted(dir, *tok, samples);
  distill::build_sft_shard(dir / "accepted.jsonl", *tok, 32, dir / "build", dir / "traces" / distill::kTopkFile);
  return dir / "build";
}

std::vector<std::string> kd_data_settings(const std::filesystem::path& build) {
  return {"data.source=shards", "data.packed=true", "data.shards=[" + (build / distill::kSftShard).string() + "]",
          "data.kd_file=" + (build / distill::kKdTargets).string(), "distill.generate.logprobs=" + std::to_string(distill::kK)};
}

}  // namespace brigade::testing
