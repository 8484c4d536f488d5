// Multi-token prediction modules: what each depth sees and predicts (written out
// from DeepSeek-V3 eq. 21-23 with the model's own pieces), causality, and that MTP
// runs in training forwards only.
#include <gtest/gtest.h>

#include <iostream>
#include <string>

#include <torch/torch.h>

#include "model/generate.h"
#include "model/speculative.h"
#include "model/transformer.h"
#include "recipes/recipe.h"
#include "tests/testing.h"

namespace brigade::model {
namespace {

TransformerOptions mtp_options(bool mla) {
  TransformerOptions o;
  o.vocab_size = 29;
  o.d_model = 32;
  o.n_layers = 2;
  o.n_heads = 4;
  o.d_ff = 48;
  o.max_seq_len = 32;
  o.rope_theta = 100.0;
  o.mtp.depth = 2;
  o.tie_embeddings = false;
  if (mla) {
    o.attention = AttentionKind::kMla;
    o.mla.kv_lora_rank = 12;
    o.mla.qk_nope_head_dim = 6;
    o.mla.qk_rope_head_dim = 4;
    o.mla.v_head_dim = 5;
  }
  return o;
}

void randomize(Transformer& model) {
  torch::NoGradGuard no_grad;
  for (auto& item : model->named_parameters()) {
    auto& p = item.value();
    p.copy_(p.dim() == 1 ? 1.0 + 0.3 * torch::randn_like(p) : torch::randn_like(p) / std::sqrt(double(p.size(-1))));
  }
}

class Mtp : public ::testing::TestWithParam<bool> {};

TEST_P(Mtp, DepthKSeesTokenIPlusKAndTheHiddenStateOfDepthKMinus1) {
  const auto o = mtp_options(GetParam());
  torch::manual_seed(1);
  Transformer model(o);
  randomize(model);
  model->train();
  const auto tokens = torch::randint(0, o.vocab_size, {2, 10}, torch::kLong);
  const auto main_logits = model->forward(tokens);
  const auto got = model->mtp_logits();
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got[0].sizes(), (std::vector<int64_t>{2, 9, o.vocab_size}));
  EXPECT_EQ(got[1].sizes(), (std::vector<int64_t>{2, 8, o.vocab_size}));
  EXPECT_TRUE(model->mtp_logits().empty()) << "a second call must not reuse the forward";

  // The chain written out: h0 = the last block's output (before the final norm).
  torch::NoGradGuard no_grad;
  auto tables = [&](int64_t n) {
    return std::pair{model->named_buffers()["rope_cos"].narrow(0, 0, n), model->named_buffers()["rope_sin"].narrow(0, 0, n)};
  };
  auto [cos, sin] = tables(10);
  auto h = model->embed_tokens(tokens);
  for (int64_t i = 0; i < o.n_layers; ++i) h = model->layers[i]->as<BlockImpl>()->forward(h, cos, sin, nullptr, i);
  EXPECT_LE((model->lm_head(model->norm(h)) - main_logits).abs().max().item<double>(), 1e-5);
  for (int64_t k = 1; k <= 2; ++k) {
    auto& m = *model->mtp[k - 1]->as<MtpModuleImpl>();
    const int64_t n = 10 - k;
    auto [c, s] = tables(n);
    auto x = m.eh_proj(torch::cat({m.enorm(model->embed_tokens(tokens.narrow(1, k, n))), m.hnorm(h.narrow(1, 0, n))}, -1));
    h = m.block->forward(x, c, s, nullptr, 0);
    auto want = model->lm_head(m.norm(h));
    EXPECT_LE((got[k - 1] - want).abs().max().item<double>(), 1e-5) << "depth " << k;
  }
}

TEST_P(Mtp, PositionIOfDepthKDependsOnTokensUpToIPlusKOnly) {
  const auto o = mtp_options(GetParam());
  torch::manual_seed(2);
  Transformer model(o);
  randomize(model);
  model->train();
  auto tokens = torch::randint(0, o.vocab_size, {1, 12}, torch::kLong);
  model->forward(tokens);
  const auto before = model->mtp_logits();
  tokens[0][7] = (tokens[0][7].item<int64_t>() + 1) % o.vocab_size;
  model->forward(tokens);
  const auto after = model->mtp_logits();
  for (int64_t k = 1; k <= 2; ++k) {
    const auto diff = (before[k - 1] - after[k - 1]).abs().amax(-1)[0];  // per position
    const int64_t first = 7 - k;  // the first position whose inputs include token 7
    EXPECT_EQ(diff.narrow(0, 0, first).max().item<double>(), 0.0) << "depth " << k << " saw the future";
    EXPECT_GT(diff[first].item<double>(), 1e-4) << "depth " << k << " ignores token i + k";
  }
}

TEST_P(Mtp, RunsInTrainingForwardsOnly) {
  const auto o = mtp_options(GetParam());
  torch::manual_seed(3);
  Transformer model(o);
  const auto tokens = torch::randint(0, o.vocab_size, {1, 6}, torch::kLong);
  model->eval();
  model->forward(tokens);
  EXPECT_TRUE(model->mtp_logits().empty());
  model->train();
  {
    torch::NoGradGuard no_grad;
    model->forward(tokens);
    EXPECT_TRUE(model->mtp_logits().empty());
  }
  auto cache = model->make_cache(1, 8);
  model->forward(tokens, &cache);
  EXPECT_TRUE(model->mtp_logits().empty());
  auto depth0 = o;
  depth0.mtp.depth = 0;
  Transformer plain(depth0);
  // The modules are extra parameters; the main model's are the same set.
  EXPECT_GT(model->parameter_count().total, plain->parameter_count().total);
  EXPECT_EQ(plain->named_parameters().find("mtp.0.eh_proj.weight"), nullptr);
  ASSERT_NE(model->named_parameters().find("mtp.1.eh_proj.weight"), nullptr);
  EXPECT_EQ(model->named_parameters()["mtp.1.eh_proj.weight"].sizes(), (std::vector<int64_t>{32, 64}));
  depth0.mtp.depth = -1;
  EXPECT_BRIGADE_ERROR(depth0.validate(), "model.mtp.depth");
}

// The decoding pieces speculative decoding uses (caches, chunks of positions, the
// absorbed MLA form) compute what the training chain computes.
TEST_P(Mtp, IncrementalDecodePiecesMatchTheTrainingChain) {
  const auto o = mtp_options(GetParam());
  torch::manual_seed(4);
  Transformer model(o);
  randomize(model);
  model->train();
  const auto tokens = torch::randint(0, o.vocab_size, {1, 10}, torch::kLong);
  const auto main_logits = model->forward(tokens).detach();
  const auto want = model->mtp_logits();
  model->eval();
  torch::NoGradGuard no_grad;
  auto cache = model->make_cache(1, 10);
  std::vector<torch::Tensor> parts;
  for (auto [from, n] : {std::pair<int64_t, int64_t>{0, 4}, {4, 1}, {5, 5}})
    parts.push_back(model->decode_hidden(tokens.narrow(1, from, n), cache));
  auto h = torch::cat(parts, 1);
  const double scale = main_logits.abs().max().item<double>();
  EXPECT_LE((model->decode_logits(h) - main_logits).abs().max().item<double>(), 1e-5 * scale);
  for (int64_t k = 1; k <= 2; ++k) {
    const int64_t n = 10 - k;
    auto mtp_cache = model->make_mtp_cache(1, 10);
    std::vector<torch::Tensor> g;
    for (auto [from, len] : {std::pair<int64_t, int64_t>{0, 3}, {3, 1}, {4, n - 4}})
      g.push_back(model->mtp_decode_hidden(k, h.narrow(1, from, len), tokens.narrow(1, from + k, len), mtp_cache));
    h = torch::cat(g, 1);
    const auto got = model->mtp_decode_logits(k, h);
    EXPECT_LE((got - want[k - 1].detach()).abs().max().item<double>(), 1e-5 * scale) << "depth " << k;
  }
}

// Speculative decoding drafted by the MTP modules emits greedy decoding's tokens, with
// stop ids, the new-token limit and the context limit.
TEST_P(Mtp, SpeculativeDecodingGivesTheGreedyTokens) {
  auto o = mtp_options(GetParam());
  torch::manual_seed(5);
  Transformer model(o);
  randomize(model);
  int64_t accepted = 0;
  for (int64_t depth : {1, 2}) {
    for (int64_t prompt_len : {1, 3, 6}) {
      std::vector<int64_t> prompt;
      for (int64_t i = 0; i < prompt_len; ++i) prompt.push_back((7 * i + 3 * prompt_len) % o.vocab_size);
      for (int64_t max_new : {1, 9, 40}) {  // 40 runs into max_seq_len (32)
        SamplingOptions greedy;
        greedy.max_new_tokens = max_new;
        const auto plain = generate(model, prompt, greedy);
        SpeculativeStats stats;
        const auto spec = generate_speculative(model, prompt, greedy, depth, &stats);
        EXPECT_EQ(spec.tokens, plain.tokens) << "depth " << depth << " prompt " << prompt_len << " max " << max_new;
        EXPECT_EQ(static_cast<int64_t>(spec.tokens.size()), 1 + stats.rounds + stats.accepted);
        accepted += stats.accepted;
        if (plain.tokens.size() > 2) {  // stop at the third token
          SamplingOptions stopping = greedy;
          stopping.stop_ids = {plain.tokens[2]};
          const auto a = generate(model, prompt, stopping), b = generate_speculative(model, prompt, stopping, depth);
          EXPECT_EQ(b.tokens, a.tokens);
          EXPECT_TRUE(b.stopped);
        }
      }
    }
  }
  std::cout << "[ measured ] random " << (GetParam() ? "MLA" : "GQA") << " model: " << accepted
            << " drafts accepted over the cases\n";

  SamplingOptions hot;
  hot.temperature = 0.7;
  EXPECT_BRIGADE_ERROR(generate_speculative(model, {1, 2}, hot), "temperature must be 0");
  o.mtp.depth = 0;
  Transformer plain(o);
  EXPECT_BRIGADE_ERROR(generate_speculative(plain, {1, 2}, {}), "needs MTP modules");
}

// A draft that is always right: with the final norms zeroed every logit is 0, so the
// main model and both modules always choose token 0. Every round then keeps both
// drafts and the choice after them.
TEST_P(Mtp, SpeculativeDecodingKeepsEveryRightDraft) {
  const auto o = mtp_options(GetParam());
  torch::manual_seed(6);
  Transformer model(o);
  randomize(model);
  {
    torch::NoGradGuard no_grad;
    model->norm->weight.zero_();
    for (const auto& m : *model->mtp) m->as<MtpModuleImpl>()->norm->weight.zero_();
  }
  SamplingOptions greedy;
  greedy.max_new_tokens = 19;
  SpeculativeStats stats;
  const auto out = generate_speculative(model, {4, 5}, greedy, 2, &stats);
  EXPECT_EQ(out.tokens, std::vector<int64_t>(19, 0));
  EXPECT_EQ(stats.rounds, 6);  // the prefill's token, then 6 rounds of 3
  EXPECT_EQ(stats.accepted, 12);
  EXPECT_DOUBLE_EQ(stats.acceptance(), 1.0);
  EXPECT_DOUBLE_EQ(stats.tokens_per_round(), 3.0);
}

INSTANTIATE_TEST_SUITE_P(Attention, Mtp, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Mla" : "Gqa"; });

}  // namespace
}  // namespace brigade::model

namespace brigade::model {
namespace {

void expect_same_count(const TransformerOptions& o, const std::string& what) {
  torch::manual_seed(0);
  Transformer built(o);
  const auto want = built->parameter_count(), got = count_parameters(o);
  EXPECT_EQ(got.total, want.total) << what;
  EXPECT_EQ(got.activated, want.activated) << what;
  EXPECT_EQ(got.embedding, want.embedding) << what;
  EXPECT_EQ(got.matmul, want.matmul) << what;
  EXPECT_EQ(got.routed, want.routed) << what;
}

TEST(CountParameters, MatchesTheBuiltModel) {
  auto gqa = mtp_options(false);
  expect_same_count(gqa, "gqa untied, mtp 2");
  gqa.mtp.depth = 0;
  gqa.tie_embeddings = true;
  gqa.n_kv_heads = 2;
  gqa.qkv_bias = true;
  expect_same_count(gqa, "gqa tied, qkv bias");
  gqa.qkv_bias = false;
  gqa.qk_norm = true;
  gqa.moe.num_experts = 4;
  gqa.moe.top_k = 2;
  gqa.moe.expert_d_ff = 16;
  gqa.moe.num_shared_experts = 1;
  gqa.moe.first_k_dense = 1;
  expect_same_count(gqa, "gqa moe");
  auto mla = mtp_options(true);
  mla.moe = gqa.moe;
  expect_same_count(mla, "mla moe, mtp 2");
  mla.mla.q_lora_rank = 10;
  expect_same_count(mla, "mla with query latent");
}

// The published sizes, from the shipped recipes (too large to build here).
TEST(CountParameters, DeepSeekV3IsSixHundredSeventyOneBillion) {
  auto r = recipes::load_recipe(std::string(BRIGADE_SOURCE_DIR) + "/recipes/deepseek-v3-671b.yaml");
  auto main_model = r.model;
  main_model.mtp.depth = 0;  // the report's 671B / 37B exclude the MTP module
  const auto c = count_parameters(main_model);
  EXPECT_NEAR(static_cast<double>(c.total) / 671e9, 1.0, 0.005) << c.total;
  // "37B activated": 36.6B without the input embedding (a lookup, no matmul), 37.6B
  // with it; the report rounds, so the bound is 2%.
  EXPECT_NEAR(static_cast<double>(c.activated - c.embedding) / 37e9, 1.0, 0.02) << c.activated;
  auto lite = recipes::load_recipe(std::string(BRIGADE_SOURCE_DIR) + "/recipes/deepseek-v2-lite.yaml").model;
  const auto l = count_parameters(lite);
  EXPECT_NEAR(static_cast<double>(l.total) / 15.7e9, 1.0, 0.005) << l.total;
  EXPECT_NEAR(static_cast<double>(l.activated - l.embedding) / 2.4e9, 1.0, 0.03) << l.activated;
  std::cout << "[ measured ] deepseek-v3-671b: " << c.total << " total, " << c.activated - c.embedding
            << " activated (no input embedding); with MTP " << count_parameters(r.model).total
            << "; deepseek-v2-lite: " << l.total << " total, " << l.activated - l.embedding << " activated\n";
}

}  // namespace
}  // namespace brigade::model
