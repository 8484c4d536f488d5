// On-policy distillation's pieces: the teacher scores each token the student wrote
// (checked against the teacher run on each sample alone), and the per-token reverse
// KL on those records equals the float64 divergence of the two full distributions,
// in value and in gradient; the scored samples pack with aligned KD targets.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "core/fs.h"
#include "distill/build.h"
#include "distill/generate.h"
#include "distill/kd.h"
#include "distill/onpolicy.h"
#include "distill/traces.h"
#include "model/transformer.h"
#include "tests/testing.h"

namespace brigade::distill {
namespace {

using testing::TempDir;

model::Transformer tiny_teacher(int64_t vocab) {
  torch::manual_seed(3);
  model::TransformerOptions o;
  o.vocab_size = vocab;
  o.d_model = 32;
  o.n_layers = 2;
  o.n_heads = 4;
  o.n_kv_heads = 2;
  o.d_ff = 64;
  o.max_seq_len = 64;
  o.init_std = 0.2;  // sharp enough distributions that the top-k order matters
  model::Transformer t(o);
  t->eval();
  return t;
}

TEST(DistillOnPolicy, TheTeacherScoresEveryStudentTokenAndTheReverseKlIsExact) {
  TempDir dir;
  const data::ByteTokenizer tokenizer;
  const int64_t vocab = tokenizer.vocab_size();  // 261: the records hold the whole distribution
  model::Transformer teacher = tiny_teacher(vocab);
  const std::vector<Prompt> prompts = {{.id = "a", .prompt = "Problem: 1+2\n", .answer = "3"},
                                       {.id = "b", .prompt = "Q", .answer = "x"},
                                       {.id = "c", .prompt = "longer prompt here", .answer = "y"}};
  {
    TraceWriter samples(dir / "samples", 0);
    auto add = [&](const std::string& id, const std::string& text, const std::string& finish) {
      Trace t;
      t.prompt_id = id;
      t.text = text;
      t.finish_reason = finish;
      samples.append(t);
    };
    add("a", "<think>1+2=3</think> \\boxed{3}", "stop");
    add("b", "hi", "stop");
    add("c", "cut off", "length");  // no EOS: left out
    samples.flush();
  }
  const auto stats = score_with_teacher(teacher, tokenizer, prompts, dir / "samples", 1000, 2, dir / "scored");
  EXPECT_EQ(stats.scored, 2);
  EXPECT_EQ(stats.skipped, 1);
  const TraceReader scored(dir / "scored");
  ASSERT_EQ(scored.size(), 2);
  EXPECT_EQ(scored.k(), vocab);

  torch::NoGradGuard no_grad;
  for (const Trace& t : scored.traces()) {
    const Prompt& p = t.prompt_id == "a" ? prompts[0] : prompts[1];
    const auto context = prompt_tokens(tokenizer, p);
    const auto completion = tokenizer.encode(t.text);
    std::vector<int64_t> ids = context;
    ids.insert(ids.end(), completion.begin(), completion.end());
    // The teacher on this sample alone (no batch, no padding), in float64 from here on.
    const auto alone = teacher->forward(torch::tensor(ids).unsqueeze(0))[0].to(torch::kDouble);
    const auto n = static_cast<int64_t>(completion.size());
    const auto reference = torch::log_softmax(alone.narrow(0, static_cast<int64_t>(context.size()) - 1, n + 1), -1);
    ASSERT_EQ(t.topk_ids.size(0), n + 1) << "one record per completion token and one for the EOS";
    const auto gathered = reference.gather(1, t.topk_ids.to(torch::kLong));
    EXPECT_LT((gathered - t.topk_logprobs.to(torch::kDouble)).abs().max().item<double>(), 1e-5) << t.prompt_id;
    // Sorted, most likely first.
    EXPECT_TRUE(torch::all(t.topk_logprobs.narrow(1, 0, vocab - 1) >= t.topk_logprobs.narrow(1, 1, vocab - 1)).item<bool>());

    // Reverse KL of a student on these records = KL(q || p) over the full vocabulary, value and gradient.
    torch::manual_seed(11);
    const auto student = torch::randn({n + 1, vocab}, torch::kDouble) * 2.0;
    KdOptions o;
    o.loss = KdLoss::kReverseKl;
    torch::AutoGradMode grad(true);
    auto x32 = student.to(torch::kFloat).clone().requires_grad_(true);
    const auto loss = kd_loss(x32, t.topk_ids, t.topk_logprobs, torch::ones({n + 1}, torch::kBool), o);
    loss.backward();
    auto x64 = student.clone().requires_grad_(true);
    const auto q = torch::log_softmax(x64, -1);
    const auto expected = (q.exp() * (q - reference)).sum(-1).mean();
    expected.backward();
    EXPECT_NEAR(loss.item<double>(), expected.item<double>(), 1e-5 * std::max(1.0, expected.item<double>()));
    EXPECT_LT((x32.grad().to(torch::kDouble) - x64.grad()).abs().max().item<double>(), 1e-6);
  }

  // The scored samples pack with their KD targets lined up (nothing misaligned).
  EXPECT_EQ(write_scored_samples(dir / "scored", prompts, dir / "accepted.jsonl"), 2);
  const auto built = build_sft_shard(dir / "accepted.jsonl", tokenizer, 63, dir / "build", dir / "scored" / kTopkFile);
  EXPECT_EQ(built["kd_documents"], 2);
  EXPECT_EQ(built["kd_misaligned"], 0);

  // A rerun keeps what was scored.
  EXPECT_EQ(score_with_teacher(teacher, tokenizer, prompts, dir / "samples", 1000, 2, dir / "scored").already_done, 2);
}

TEST(DistillOnPolicy, RoundsRotateThroughThePromptsAndOptionsAreChecked) {
  std::vector<Prompt> prompts;
  for (int i = 0; i < 5; ++i) prompts.push_back({.id = std::to_string(i), .prompt = "p"});
  auto ids = [](const std::vector<Prompt>& ps) {
    std::string out;
    for (const auto& p : ps) out += p.id;
    return out;
  };
  EXPECT_EQ(ids(round_prompts(prompts, 0, 3)), "012");
  EXPECT_EQ(ids(round_prompts(prompts, 1, 3)), "340");
  EXPECT_EQ(ids(round_prompts(prompts, 0, 9)), "01234");
  OnPolicyOptions o;
  EXPECT_NO_THROW(o.validate());
  o.rounds = 1;
  o.loss = KdLoss::kNone;
  EXPECT_BRIGADE_ERROR(o.validate(), "distill.onpolicy.loss must be forward_kl, reverse_kl or jsd");
  o.loss = KdLoss::kJsd;
  o.temperature = 0;
  EXPECT_BRIGADE_ERROR(o.validate(), "distill.onpolicy.temperature must be > 0");
  const std::vector<Prompt> chat = {
      {.id = "c", .prompt = "hi", .conversation = R"({"messages":[{"role":"user","content":"hi"}]})"}};
  TempDir dir;
  { TraceWriter w(dir / "s", 0); }
  model::Transformer teacher = tiny_teacher(261);
  EXPECT_BRIGADE_ERROR(score_with_teacher(teacher, data::ByteTokenizer(), chat, dir / "s", 4, 1, dir / "o"),
                       "on-policy distillation takes text prompts only");
}

}  // namespace
}  // namespace brigade::distill
