// Sampling rules (greedy, temperature, top-k, top-p) and the generation loop.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <set>
#include <vector>

#include "model/continuous_batch.h"
#include "model/generate.h"
#include "tests/testing.h"

namespace brigade::model {
namespace {

torch::Generator make_gen(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

SamplingOptions sampling(double temperature, int64_t top_k = 0, double top_p = 1.0) {
  SamplingOptions o;
  o.temperature = temperature;
  o.top_k = top_k;
  o.top_p = top_p;
  return o;
}

// Counts of each token over `draws` samples.
std::vector<int64_t> histogram(const torch::Tensor& logits, const SamplingOptions& o, int draws, uint64_t seed) {
  auto gen = make_gen(seed);
  std::vector<int64_t> counts(static_cast<size_t>(logits.numel()), 0);
  for (int i = 0; i < draws; ++i) ++counts.at(static_cast<size_t>(sample_token(logits, o, gen)));
  return counts;
}

// Pearson's chi-square statistic of `counts` against `probs` (cells with p = 0 must be empty).
double chi_square(const std::vector<int64_t>& counts, const std::vector<double>& probs) {
  double n = 0;
  for (auto c : counts) n += static_cast<double>(c);
  double chi = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (probs[i] == 0) {
      EXPECT_EQ(counts[i], 0) << "token " << i << " has probability 0";
      continue;
    }
    const double expected = n * probs[i];
    chi += (static_cast<double>(counts[i]) - expected) * (static_cast<double>(counts[i]) - expected) / expected;
  }
  return chi;
}

std::vector<double> softmax(const std::vector<double>& logits, double temperature) {
  std::vector<double> p;
  double total = 0;
  for (double l : logits) total += std::exp(l / temperature);
  for (double l : logits) p.push_back(std::exp(l / temperature) / total);
  return p;
}

TEST(GenerateSample, GreedyIsArgmax) {
  auto gen = make_gen(1);
  torch::manual_seed(0);
  for (int i = 0; i < 20; ++i) {
    auto logits = torch::randn({50});
    EXPECT_EQ(sample_token(logits, sampling(0.0), gen), logits.argmax().item<int64_t>());
  }
  // Any shape flattens; half precision is read as float.
  auto logits = torch::tensor({0.5, -1.0, 3.0, 2.9}).to(torch::kBFloat16).unsqueeze(0);
  EXPECT_EQ(sample_token(logits, sampling(0.0), gen), 2);
}

TEST(GenerateSample, TopK1IsGreedyAtAnyTemperature) {
  torch::manual_seed(1);
  auto gen = make_gen(2);
  for (double t : {0.5, 1.0, 5.0}) {
    for (int i = 0; i < 30; ++i) {
      auto logits = torch::randn({40});
      EXPECT_EQ(sample_token(logits, sampling(t, 1), gen), logits.argmax().item<int64_t>()) << "T=" << t;
    }
  }
}

TEST(GenerateSample, TinyTopPKeepsOnlyTheTopToken) {
  torch::manual_seed(2);
  auto gen = make_gen(3);
  for (int i = 0; i < 50; ++i) {
    auto logits = 0.1 * torch::randn({40});  // nearly flat: plain sampling would rarely pick the argmax
    EXPECT_EQ(sample_token(logits, sampling(1.0, 0, 1e-6), gen), logits.argmax().item<int64_t>());
  }
}

// chi-square with 2 degrees of freedom: P(chi > 13.8) = 0.001.
constexpr double kChi2Df2 = 13.8;
constexpr double kChi2Df1 = 10.8;

TEST(GenerateSample, TemperatureSamplingFollowsSoftmax) {
  const std::vector<double> l = {0.0, 1.0, 2.0};
  auto logits = torch::tensor(l, torch::kFloat);
  for (double t : {1.0, 2.0, 0.5}) {
    auto counts = histogram(logits, sampling(t), 20000, 42);
    EXPECT_LT(chi_square(counts, softmax(l, t)), kChi2Df2) << "T=" << t << " counts " << counts[0] << " "
                                                           << counts[1] << " " << counts[2];
  }
  // The wrong temperature must be rejected by the same statistic (it has power).
  auto counts = histogram(logits, sampling(2.0), 20000, 42);
  EXPECT_GT(chi_square(counts, softmax(l, 1.0)), 100.0);
}

TEST(GenerateSample, TopKRenormalisesOverTheKBest) {
  const std::vector<double> l = {2.0, 0.0, 1.0};
  auto counts = histogram(torch::tensor(l, torch::kFloat), sampling(1.0, 2), 20000, 7);
  const double z = std::exp(2.0) + std::exp(1.0);
  EXPECT_EQ(counts[1], 0);
  EXPECT_LT(chi_square(counts, {std::exp(2.0) / z, 0.0, std::exp(1.0) / z}), kChi2Df1);
}

TEST(GenerateSample, TopPKeepsTheSmallestSetReachingP) {
  // probabilities ~ 0.090, 0.245, 0.665
  const std::vector<double> l = {0.0, 1.0, 2.0};
  const auto p = softmax(l, 1.0);
  auto logits = torch::tensor(l, torch::kFloat);
  // 0.5 < 0.665: the top token alone reaches p.
  auto top_only = histogram(logits, sampling(1.0, 0, 0.5), 2000, 8);
  EXPECT_EQ(top_only[2], 2000);
  // 0.7 needs the top two; the third stays out.
  auto top_two = histogram(logits, sampling(1.0, 0, 0.7), 20000, 9);
  EXPECT_EQ(top_two[0], 0);
  EXPECT_LT(chi_square(top_two, {0.0, p[1] / (p[1] + p[2]), p[2] / (p[1] + p[2])}), kChi2Df1);
}

TEST(GenerateSample, SameSeedSameDraws) {
  auto logits = torch::zeros({100});
  std::vector<int64_t> seq_a, seq_b, seq_c;
  auto ga = make_gen(5), gb = make_gen(5), gc = make_gen(6);
  for (int i = 0; i < 20; ++i) {
    seq_a.push_back(sample_token(logits, sampling(1.0), ga));
    seq_b.push_back(sample_token(logits, sampling(1.0), gb));
    seq_c.push_back(sample_token(logits, sampling(1.0), gc));
  }
  EXPECT_EQ(seq_a, seq_b);
  EXPECT_NE(seq_a, seq_c);
}

TEST(GenerateSample, OptionsValidate) {
  SamplingOptions ok;
  EXPECT_NO_THROW(ok.validate());
  auto o = ok;
  o.max_new_tokens = -1;
  EXPECT_BRIGADE_ERROR(o.validate(), "max_new_tokens must be >= 0");
  o = ok;
  o.temperature = -0.5;
  EXPECT_BRIGADE_ERROR(o.validate(), "temperature must be >= 0");
  o = ok;
  o.temperature = std::nan("");
  EXPECT_BRIGADE_ERROR(o.validate(), "temperature must be >= 0");
  o = ok;
  o.top_k = -3;
  EXPECT_BRIGADE_ERROR(o.validate(), "top_k must be >= 0");
  o = ok;
  o.top_p = 0.0;
  EXPECT_BRIGADE_ERROR(o.validate(), "top_p must be in (0, 1]");
  o = ok;
  o.top_p = 1.5;
  EXPECT_BRIGADE_ERROR(o.validate(), "top_p must be in (0, 1]");
}

// ---------------------------------------------------------------------------------
// generate()

class GenerateLoop : public ::testing::Test {
 protected:
  void SetUp() override {
    options_.vocab_size = 50;
    options_.d_model = 32;
    options_.n_layers = 2;
    options_.n_heads = 4;
    options_.n_kv_heads = 2;
    options_.max_seq_len = 32;
    options_.init_std = 0.5;  // a peaky model, so greedy runs are not all one token
    torch::manual_seed(100);
    model_ = Transformer(options_);
  }

  // Greedy continuation recomputed from scratch each step (no cache).
  std::vector<int64_t> greedy_reference(std::vector<int64_t> seq, int64_t n) {
    torch::NoGradGuard no_grad;
    std::vector<int64_t> out;
    for (int64_t i = 0; i < n; ++i) {
      auto logits = model_->forward(torch::tensor(seq, torch::kLong).unsqueeze(0));
      int64_t next = logits[0][-1].argmax().item<int64_t>();
      out.push_back(next);
      seq.push_back(next);
    }
    return out;
  }

  TransformerOptions options_;
  Transformer model_{nullptr};
  const std::vector<int64_t> prompt_ = {1, 2, 3, 4, 5};
};

TEST_F(GenerateLoop, GreedyMatchesUncachedArgmax) {
  SamplingOptions o;
  o.max_new_tokens = 12;
  auto g = generate(model_, prompt_, o);
  EXPECT_EQ(g.tokens, greedy_reference(prompt_, 12));
  EXPECT_FALSE(g.stopped);
  std::set<int64_t> distinct(g.tokens.begin(), g.tokens.end());
  EXPECT_GT(distinct.size(), 1u) << "degenerate model: the comparison above proves little";
}

TEST_F(GenerateLoop, SeedDeterminesSampledOutput) {
  SamplingOptions o;
  o.max_new_tokens = 20;
  o.temperature = 1.0;
  o.seed = 1;
  auto a = generate(model_, prompt_, o);
  auto b = generate(model_, prompt_, o);
  o.seed = 2;
  auto c = generate(model_, prompt_, o);
  ASSERT_EQ(a.tokens.size(), 20u);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_NE(a.tokens, c.tokens);
  for (auto t : c.tokens) {
    EXPECT_GE(t, 0);
    EXPECT_LT(t, options_.vocab_size);
  }
}

TEST_F(GenerateLoop, StopIdEndsGeneration) {
  SamplingOptions o;
  o.max_new_tokens = 12;
  auto full = generate(model_, prompt_, o);
  ASSERT_EQ(full.tokens.size(), 12u);
  const int64_t stop = full.tokens[3];
  const auto first = std::find(full.tokens.begin(), full.tokens.end(), stop);
  const std::vector<int64_t> expected(full.tokens.begin(), first + 1);  // the stop token included

  o.stop_ids = {options_.vocab_size + 5, stop};  // an id that never appears, then the real one
  auto g = generate(model_, prompt_, o);
  EXPECT_TRUE(g.stopped);
  EXPECT_EQ(g.tokens, expected);
}

TEST_F(GenerateLoop, MaxNewTokensAndContextLimit) {
  SamplingOptions o;
  o.temperature = 1.0;
  o.max_new_tokens = 7;
  auto g = generate(model_, prompt_, o);
  EXPECT_EQ(g.tokens.size(), 7u);
  EXPECT_FALSE(g.stopped);

  o.max_new_tokens = 0;
  EXPECT_TRUE(generate(model_, prompt_, o).tokens.empty());

  // With room for fewer tokens than asked, generation runs until the last position of
  // max_seq_len has been used to predict one more token.
  const std::vector<int64_t> long_prompt(28, 7);
  o.max_new_tokens = 100;
  auto limited = generate(model_, long_prompt, o);
  EXPECT_EQ(static_cast<int64_t>(limited.tokens.size()), options_.max_seq_len - 28 + 1);
  EXPECT_FALSE(limited.stopped);
}

TEST_F(GenerateLoop, TrainingStateIsRestored) {
  SamplingOptions o;
  o.max_new_tokens = 2;
  model_->train();
  generate(model_, prompt_, o);
  EXPECT_TRUE(model_->is_training());
  model_->eval();
  generate(model_, prompt_, o);
  EXPECT_FALSE(model_->is_training());
}

TEST_F(GenerateLoop, InvalidPromptsAndOptions) {
  SamplingOptions o;
  o.max_new_tokens = 3;
  EXPECT_BRIGADE_ERROR(generate(model_, {}, o), "non-empty prompt");
  EXPECT_BRIGADE_ERROR(generate(model_, {1, 50}, o), "prompt token 50 is outside the vocabulary (50)");
  EXPECT_BRIGADE_ERROR(generate(model_, {-1}, o), "prompt token -1 is outside the vocabulary");
  EXPECT_BRIGADE_ERROR(generate(model_, std::vector<int64_t>(32, 1), o), "leaves no room in model.max_seq_len 32");
  o.top_p = 2.0;
  EXPECT_BRIGADE_ERROR(generate(model_, prompt_, o), "top_p must be in (0, 1]");
}

// ---------------------------------------------------------------------------------
// generate_batch()

// Prompts of different lengths (left padding), greedy: every row continues exactly
// as it does alone, and rows that stop early leave the batch without disturbing
// the others.
TEST_F(GenerateLoop, BatchedRowsMatchTheirUnbatchedRuns) {
  const std::vector<std::vector<int64_t>> prompts = {{1, 2, 3, 4, 5}, {7, 8}, {9, 10, 11, 12, 13, 14, 15, 16}, {3}};
  SamplingOptions o;
  o.max_new_tokens = 10;
  const auto alone_first = generate(model_, prompts[1], o);
  o.stop_ids = {alone_first.tokens.at(3)};  // row 1 stops after 4 tokens
  auto batch = generate_batch(model_, prompts, o, {0, 0, 0, 0});
  ASSERT_EQ(batch.size(), prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto alone = generate(model_, prompts[i], o);
    EXPECT_EQ(batch[i].tokens, alone.tokens) << "row " << i;
    EXPECT_EQ(batch[i].stopped, alone.stopped) << "row " << i;
  }
  EXPECT_TRUE(batch[1].stopped);
  EXPECT_LE(batch[1].tokens.size(), 4u);
  // Sampled: each row draws from its own seed, whatever its neighbours.
  SamplingOptions sampled;
  sampled.max_new_tokens = 8;
  sampled.temperature = 1.0;
  auto a = generate_batch(model_, {prompts[0], prompts[2]}, sampled, {11, 12});
  auto b = generate_batch(model_, {prompts[2], prompts[3], prompts[0]}, sampled, {12, 99, 11});
  EXPECT_EQ(a[0].tokens, b[2].tokens);
  EXPECT_EQ(a[1].tokens, b[0].tokens);
  EXPECT_BRIGADE_ERROR(generate_batch(model_, prompts, o, {1}), "4 prompts but 1 seeds");
}

// The top-k log-probabilities are the model's own (temperature 1, before any
// sampling filter) at each generated position.
TEST_F(GenerateLoop, TopKLogprobsAreTheModelsDistribution) {
  SamplingOptions o;
  o.max_new_tokens = 6;
  o.temperature = 0.7;
  o.top_k = 5;
  o.logprobs = 4;
  auto g = generate_batch(model_, {prompt_, {5, 6}}, o, {3, 4});
  torch::NoGradGuard no_grad;
  for (size_t row = 0; row < 2; ++row) {
    std::vector<int64_t> seq = row == 0 ? prompt_ : std::vector<int64_t>{5, 6};
    ASSERT_EQ(g[row].topk_ids.sizes(), (std::vector<int64_t>{6, 4}));
    ASSERT_EQ(g[row].topk_ids.scalar_type(), torch::kInt);
    for (size_t t = 0; t < g[row].tokens.size(); ++t) {
      auto lp = torch::log_softmax(model_->forward(torch::tensor(seq, torch::kLong).unsqueeze(0))[0][-1], -1);
      auto [values, indices] = lp.topk(4);
      EXPECT_TRUE(torch::equal(indices.to(torch::kInt), g[row].topk_ids[static_cast<int64_t>(t)])) << row << " " << t;
      EXPECT_TRUE(torch::allclose(values, g[row].topk_logprobs[static_cast<int64_t>(t)], 1e-5, 1e-5)) << row << " " << t;
      seq.push_back(g[row].tokens[t]);
    }
  }
}

// ---------------------------------------------------------------------------------
// ContinuousBatch: sequences join a running batch between steps.

// Runs `batch` to the end; each sequence's tokens (and top-k rows) in order.
struct Drained {
  std::map<int64_t, Generation> out;
  int64_t widest = 0;  // most sequences running after a step
};
// One step of `batch`, its tokens appended to d.
void step_into(ContinuousBatch& batch, Drained& d) {
  for (auto& t : batch.step()) {
    auto& g = d.out[t.sequence];
    g.tokens.push_back(t.token);
    g.stopped = t.stopped;
    if (t.topk_ids.defined()) {
      g.topk_ids = g.topk_ids.defined() ? torch::cat({g.topk_ids, t.topk_ids.unsqueeze(0)}) : t.topk_ids.unsqueeze(0);
      g.topk_logprobs = g.topk_logprobs.defined() ? torch::cat({g.topk_logprobs, t.topk_logprobs.unsqueeze(0)})
                                                  : t.topk_logprobs.unsqueeze(0);
    }
  }
  d.widest = std::max(d.widest, batch.running());
}

Drained drain(ContinuousBatch& batch, Drained d = {}) {
  while (!batch.idle()) step_into(batch, d);
  return d;
}

// Sequences that join while others run (shorter and longer prompts than the batch's
// positions, so both the newcomer and the batch get left padding), each with its
// own options: every one gives what generate() gives it alone, greedy or sampled,
// with the same top-k log-probabilities.
TEST_F(GenerateLoop, ContinuousBatchMatchesEachSequenceAlone) {
  struct Ask {
    std::vector<int64_t> prompt;
    SamplingOptions o;
    uint64_t seed;
  };
  std::vector<Ask> asks;
  for (int i = 0; i < 6; ++i) {
    Ask a;
    a.prompt.clear();
    for (int j = 0; j < 1 + (i * 5) % 9; ++j) a.prompt.push_back(1 + (i * 7 + j * 3) % 49);
    a.o.max_new_tokens = 4 + i * 2;
    a.o.temperature = i % 2 == 0 ? 0.0 : 0.9;
    a.o.top_p = i == 3 ? 0.8 : 1.0;
    a.o.logprobs = i % 3 == 0 ? 3 : 0;
    a.seed = 40 + static_cast<uint64_t>(i);
    asks.push_back(a);
  }
  asks[4].o.stop_ids = {generate(model_, asks[4].prompt, asks[4].o).tokens.at(2)};  // stops early
  ContinuousBatch batch(model_, 4);
  std::map<int64_t, size_t> ask_of;
  Drained d;
  // Two at once, then one more every second step while the batch runs.
  ask_of[batch.add(asks[0].prompt, asks[0].o, asks[0].seed)] = 0;
  ask_of[batch.add(asks[1].prompt, asks[1].o, asks[1].seed)] = 1;
  for (size_t next = 2; next < asks.size(); ++next) {
    for (int s = 0; s < 2; ++s) step_into(batch, d);
    ask_of[batch.add(asks[next].prompt, asks[next].o, asks[next].seed)] = next;
  }
  d = drain(batch, std::move(d));
  EXPECT_GE(d.widest, 3);  // they really ran together
  ASSERT_EQ(d.out.size(), asks.size());
  for (const auto& [id, g] : d.out) {
    const auto& a = asks[ask_of.at(id)];
    SamplingOptions alone_options = a.o;
    alone_options.seed = a.seed;
    const auto alone = generate(model_, a.prompt, alone_options);
    EXPECT_EQ(g.tokens, alone.tokens) << "sequence " << id;
    EXPECT_EQ(g.stopped, alone.stopped) << "sequence " << id;
    if (a.o.logprobs > 0) {
      ASSERT_TRUE(g.topk_ids.defined());
      EXPECT_TRUE(torch::equal(g.topk_ids, alone.topk_ids)) << "sequence " << id;
      EXPECT_TRUE(torch::allclose(g.topk_logprobs, alone.topk_logprobs, 1e-5, 1e-5)) << "sequence " << id;
    }
  }
  EXPECT_TRUE(d.out.at(4).stopped);
  EXPECT_EQ(batch.length(), 0);  // empty again: positions start over
}

// max_rows bounds the batch; a sequence that would overflow the context of a
// running batch waits, and is answered once the batch has drained; a cancelled
// sequence gives nothing more; bad prompts are errors that name the numbers.
TEST_F(GenerateLoop, ContinuousBatchBoundsRowsAndContext) {
  SamplingOptions o;
  o.max_new_tokens = 20;  // context 32
  const std::vector<int64_t> first = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  ContinuousBatch batch(model_, 2);
  const auto a = batch.add(first, o, 0);
  for (int i = 0; i < 5; ++i) batch.step();
  EXPECT_EQ(batch.length(), 14);
  // b needs 19 more positions after its prefill: 15 + 19 > 32 while a runs.
  const auto b = batch.add({7}, o, 0);
  const auto c = batch.add({8}, o, 0);
  batch.step();
  EXPECT_EQ(batch.running(), 1);  // b waits for the context, c behind it (first come, first served)
  EXPECT_EQ(batch.queued(), 2);
  batch.cancel(c);
  EXPECT_EQ(batch.queued(), 1);
  auto d = drain(batch);
  EXPECT_EQ(d.out.count(c), 0u);
  EXPECT_EQ(d.out.at(a).tokens.size(), 14u);  // 6 came before drain(): 20 in all
  EXPECT_EQ(d.out.at(b).tokens.size(), 20u);
  EXPECT_EQ(d.out.at(b).tokens, generate(model_, {7}, o).tokens);
  // Rows: three short ones, two at a time.
  SamplingOptions shorter;
  shorter.max_new_tokens = 3;
  for (int i = 0; i < 3; ++i) batch.add({static_cast<int64_t>(i + 1)}, shorter, 0);
  EXPECT_EQ(drain(batch).widest, 2);
  // A budget past the context ends where generate() ends.
  SamplingOptions longer;
  longer.max_new_tokens = 100;
  const auto e = batch.add({1, 2, 3, 4}, longer, 0);
  EXPECT_EQ(drain(batch).out.at(e).tokens, generate(model_, {1, 2, 3, 4}, longer).tokens);
  EXPECT_BRIGADE_ERROR(batch.add({}, o, 0), "non-empty prompt");
  EXPECT_BRIGADE_ERROR(batch.add({1, 50}, o, 0), "prompt token 50 is outside the vocabulary (50)");
  EXPECT_BRIGADE_ERROR(batch.add(std::vector<int64_t>(32, 1), o, 0), "prompt of 32 tokens leaves no room");
}

}  // namespace
}  // namespace brigade::model
