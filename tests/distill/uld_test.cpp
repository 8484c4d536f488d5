// Cross-tokenizer distillation with ULD: the loss against a float64 reference (value
// and gradient), teacher ids from another vocabulary, records placed by index for a
// student whose BPE tokenizer is not the teacher's, and a student trained on them.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/fs.h"
#include "data/bpe.h"
#include "distill/build.h"
#include "distill/kd.h"
#include "distill/traces.h"
#include "recipes/build.h"
#include "recipes/recipe.h"
#include "tests/testing.h"
#include "trainer/trainer.h"

namespace brigade::distill {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

// ULD in float64, written directly: both distributions sorted, the k largest compared,
// plus the rest of each.
torch::Tensor uld_reference(const torch::Tensor& logits, const torch::Tensor& teacher_logprobs) {
  const int64_t k = std::min(teacher_logprobs.size(1), logits.size(1));
  const auto p = std::get<0>(teacher_logprobs.exp().sort(1, true)).narrow(1, 0, k);
  const auto q = std::get<0>(torch::softmax(logits, 1).sort(1, true)).narrow(1, 0, k);
  return ((p - q).abs().sum(1) + ((1 - p.sum(1)) - (1 - q.sum(1))).abs()).mean();
}

TEST(DistillUld, MatchesTheFloat64ReferenceInValueAndGradient) {
  torch::manual_seed(5);
  const int64_t n = 6, vocab = 40, k = 5;
  // The teacher's top-5 of a 300-token vocabulary: ids far outside the student's 40.
  const auto teacher = torch::log_softmax(torch::randn({n, 300}, torch::kDouble) * 2, 1);
  const auto [values, indices] = teacher.topk(k, 1);
  const auto student = torch::randn({n, vocab}, torch::kDouble) * 2;
  KdOptions o;
  o.loss = KdLoss::kUld;
  auto x32 = student.to(torch::kFloat).clone().requires_grad_(true);
  const auto loss = kd_loss(x32, indices, values.to(torch::kFloat), torch::ones({n}, torch::kBool), o);
  loss.backward();
  auto x64 = student.clone().requires_grad_(true);
  const auto expected = uld_reference(x64, values);
  expected.backward();
  EXPECT_NEAR(loss.item<double>(), expected.item<double>(), 1e-6);
  EXPECT_LT((x32.grad().to(torch::kDouble) - x64.grad()).abs().max().item<double>(), 1e-6);
  // The same sorted distribution under other ids costs nothing.
  const auto same = torch::log_softmax(torch::randn({1, vocab}, torch::kDouble), 1);
  const auto [sv, si] = same.topk(vocab, 1);
  const auto shuffled = (si + 1000).to(torch::kLong);  // ids the student does not have
  EXPECT_LT(kd_loss(same.to(torch::kFloat), shuffled, sv.to(torch::kFloat), torch::ones({1}, torch::kBool), o).item<double>(), 1e-6);
  EXPECT_EQ(parse_kd_loss("uld"), KdLoss::kUld);
  EXPECT_EQ(to_string(KdLoss::kUld), "uld");
}

// Teacher records in one BPE's ids, a student with a smaller BPE: placed by index
// (none misaligned), and a student trained on them with ULD alone.
TEST(DistillUld, ATeacherWithAnotherTokenizerTeachesByIndex) {
  TempDir dir;
  std::vector<std::string> corpus;
  const char* words[] = {"seven", "times", "three", "makes", "twenty", "one", "plus", "four", "minus", "eleven", "so", "the"};
  for (int i = 0; i < 40; ++i) {
    std::string line = "<think>";
    for (int w = 0; w < 8; ++w) line += std::string(w ? " " : "") + words[(i * 5 + w * 3) % 12];
    corpus.push_back(line + "</think> " + words[i % 12]);
  }
  const std::vector<std::string> specials = {"<|bos|>", "<|eos|>", "<|pad|>"};
  const data::BpeTokenizer teacher_tok = data::train_bpe(corpus, 330, specials);
  data::train_bpe(corpus, 290, specials).save(dir / "student");
  const data::BpeTokenizer student_tok = data::BpeTokenizer::load(dir / "student" / "tokenizer.json");
  ASSERT_NE(teacher_tok.vocab_size(), student_tok.vocab_size());
  const int64_t k = 4;
  {
    TraceWriter store(dir / "traces", k);
    std::ofstream accepted(dir / "accepted.jsonl");
    int64_t offset = 0;  // records before this trace in the sidecar
    for (int i = 0; i < 24; ++i) {
      const std::string prompt = "Q" + std::to_string(i) + "*7?", completion = corpus[static_cast<size_t>(i)];
      std::vector<int64_t> generated = teacher_tok.encode(completion);
      generated.push_back(teacher_tok.eos_id());
      const auto records = static_cast<int64_t>(generated.size());
      Trace t;
      t.prompt_id = std::to_string(i);
      t.text = completion;
      t.finish_reason = "stop";
      t.completion_tokens = records;
      t.topk_ids = torch::empty({records, k}, torch::kInt32);
      t.topk_logprobs = torch::tensor({-0.1f, -2.5f, -3.5f, -5.0f}).repeat({records, 1});
      for (int64_t r = 0; r < records; ++r)
        for (int64_t j = 0; j < k; ++j) t.topk_ids[r][j] = static_cast<int32_t>((generated[static_cast<size_t>(r)] + 11 * j) % 330);
      store.append(t);
      accepted << nlohmann::json{{"prompt_id", t.prompt_id}, {"sample", 0}, {"prompt", prompt}, {"completion", completion},
                                 {"answer", ""}, {"topk", {{"offset", offset}, {"positions", records}}}}.dump()
               << "\n";
      offset += records;
    }
    store.flush();
  }
  const auto strict = build_sft_shard(dir / "accepted.jsonl", student_tok, 32, dir / "strict", dir / "traces" / kTopkFile);
  EXPECT_GT(strict["kd_misaligned"].get<int64_t>(), 0) << "another tokenizer does not line up token for token";
  const auto built = build_sft_shard(dir / "accepted.jsonl", student_tok, 32, dir / "build", dir / "traces" / kTopkFile,
                                     /*align_by_index=*/true);
  EXPECT_EQ(built["kd_misaligned"].get<int64_t>(), 0);
  EXPECT_EQ(built["kd_documents"].get<int64_t>(), built["documents"].get<int64_t>());

  const std::string yaml = "name: uld\nmodel: {vocab_size: " + std::to_string((student_tok.vocab_size() + 7) / 8 * 8) +
                           ", d_model: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 64, max_seq_len: 64}\n"
                           "data: {seq_len: 32, source: shards, packed: true, eval_fraction: 0.1, tokenizer: " +
                           (dir / "student").string() +
                           "}\n"
                           "distill: {generate: {logprobs: 4}, kd: {loss: uld, weight: 1}}\n"
                           "trainer: {max_steps: 30, micro_batch_size: 4, warmup_steps: 2, lr: 0.01, log_every: 1,\n"
                           "          eval_every: 0, eval_batches: 1, checkpoint_every: 0, threads: 1}\n";
  const auto recipe = recipes::parse_recipe(yaml, "uld.yaml", {"data.shards=[" + (dir / "build" / kSftShard).string() + "]",
                                                               "data.kd_file=" + (dir / "build" / kKdTargets).string()});
  auto t = recipes::build_trainer(recipe, dir / "run");
  t->run();
  std::vector<double> kd;
  std::istringstream metrics(read_file(dir / "run" / "metrics.jsonl"));
  for (std::string line; std::getline(metrics, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("kd_loss")) kd.push_back(j["kd_loss"].get<double>());
  }
  ASSERT_EQ(kd.size(), 30u);
  for (double v : kd) EXPECT_TRUE(std::isfinite(v));
  EXPECT_LT(kd.back(), 0.5 * kd.front()) << "the student's sorted distributions approach the teacher's";
}

}  // namespace
}  // namespace brigade::distill
