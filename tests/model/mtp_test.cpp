// Multi-token prediction modules: what each depth sees and predicts (written out
// from DeepSeek-V3 eq. 21-23 with the model's own pieces), causality, and that MTP
// runs in training forwards only.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "model/transformer.h"
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

INSTANTIATE_TEST_SUITE_P(Attention, Mtp, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "Mla" : "Gqa"; });

}  // namespace
}  // namespace brigade::model
