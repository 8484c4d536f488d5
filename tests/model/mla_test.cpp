// Multi-head latent attention: the module against a float64 reference written from
// the DeepSeek-V2 formulas, the absorbed cached decode against the naive full
// forward, the cache's size, batched left-padded generation, FP8 training, option
// validation, and the RoPE scaling tables' defining properties. (Agreement with
// transformers' DeepseekV2/V3 is in hf_test.cpp.)
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "model/generate.h"
#include "model/mla.h"
#include "model/rope.h"
#include "model/transformer.h"
#include "precision/fp8_recipe.h"
#include "tests/testing.h"

namespace brigade::model {
namespace {

TransformerOptions mla_options(int64_t q_lora_rank) {
  TransformerOptions o;
  o.vocab_size = 41;
  o.d_model = 32;
  o.n_layers = 2;
  o.n_heads = 4;
  o.d_ff = 48;
  o.max_seq_len = 32;
  o.rope_theta = 100.0;
  o.attention = AttentionKind::kMla;
  o.mla.q_lora_rank = q_lora_rank;
  o.mla.kv_lora_rank = 12;
  o.mla.qk_nope_head_dim = 6;
  o.mla.qk_rope_head_dim = 4;
  o.mla.v_head_dim = 5;  // unlike qk_head_dim, so a swapped size cannot pass
  return o;
}

// O(1)-scale weights (the default init makes attention nearly uniform).
void randomize(torch::nn::Module& model, uint64_t seed) {
  torch::manual_seed(seed);
  torch::NoGradGuard no_grad;
  for (auto& item : model.named_parameters()) {
    auto& p = item.value();
    if (p.dim() == 1) {
      p.copy_(1.0 + 0.3 * torch::randn_like(p));  // norm weights
    } else if (item.key().find("embed_tokens") != std::string::npos) {
      p.copy_(torch::randn_like(p));
    } else {
      p.copy_(torch::randn_like(p) * (1.5 / std::sqrt(static_cast<double>(p.size(1)))));
    }
  }
}

void expect_close(const torch::Tensor& got, const torch::Tensor& want, double tol = 1e-5) {
  ASSERT_EQ(got.sizes(), want.sizes());
  const double scale = std::max(1.0, want.abs().max().item<double>());
  const double diff = (got.to(torch::kDouble) - want.to(torch::kDouble)).abs().max().item<double>();
  EXPECT_LE(diff, tol * scale) << "scale " << scale;
}

torch::Tensor rms(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  return x / (x.pow(2).mean(-1, true) + eps).sqrt() * w;
}

// Rotate-half RoPE with angles position * theta^(-2i/d), written out.
torch::Tensor rope(const torch::Tensor& x, double theta) {  // x [..., seq, d] float64
  const int64_t seq = x.size(-2), d = x.size(-1), half = d / 2;
  auto pos = torch::arange(seq, torch::kDouble).unsqueeze(1);
  auto inv = torch::pow(theta, -torch::arange(0, d, 2, torch::kDouble) / static_cast<double>(d));
  auto ang = pos * inv.unsqueeze(0);  // [seq, half]
  auto c = ang.cos(), s = ang.sin();
  auto x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  return torch::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1);
}

// MLA in float64 from the formulas: per-head keys [W_uk c ; k_rope], values W_uv c,
// causal softmax with scale 1/sqrt(qk_head_dim).
torch::Tensor reference_mla(MLAttentionImpl& m, const torch::Tensor& x32, int64_t heads, double theta) {
  const auto& o = m.options();
  const int64_t dn = o.qk_nope_head_dim, dr = o.qk_rope_head_dim, dv = o.v_head_dim, r = o.kv_lora_rank;
  auto W = [](const precision::Linear& l) { return l->weight.detach().to(torch::kDouble); };
  auto x = x32.to(torch::kDouble)[0];  // [seq, d_model]
  const int64_t seq = x.size(0);
  torch::Tensor q = m.q_proj ? x.matmul(W(m.q_proj).t())
                             : rms(x.matmul(W(m.q_a_proj).t()), m.q_a_layernorm->weight.detach().to(torch::kDouble),
                                   kLatentNormEps)
                                   .matmul(W(m.q_b_proj).t());
  auto kv = x.matmul(W(m.kv_a_proj_with_mqa).t());
  auto c = rms(kv.narrow(1, 0, r), m.kv_a_layernorm->weight.detach().to(torch::kDouble), kLatentNormEps);
  auto k_rope = rope(kv.narrow(1, r, dr), theta);  // [seq, dr]
  auto up = c.matmul(W(m.kv_b_proj).t()).view({seq, heads, dn + dv});
  std::vector<torch::Tensor> outs;
  for (int64_t h = 0; h < heads; ++h) {
    auto qh = q.view({seq, heads, dn + dr}).select(1, h);
    auto qcat = torch::cat({qh.narrow(1, 0, dn), rope(qh.narrow(1, dn, dr), theta)}, 1);
    auto kcat = torch::cat({up.select(1, h).narrow(1, 0, dn), k_rope}, 1);
    auto scores = qcat.matmul(kcat.t()) / std::sqrt(static_cast<double>(dn + dr));
    scores = scores.masked_fill(torch::ones({seq, seq}, torch::kBool).triu(1), -INFINITY);
    outs.push_back(scores.softmax(-1).matmul(up.select(1, h).narrow(1, dn, dv)));
  }
  return torch::cat(outs, 1).matmul(W(m.o_proj).t()).unsqueeze(0);
}

class MlaModule : public ::testing::TestWithParam<int64_t> {};

TEST_P(MlaModule, MatchesTheFormulas) {
  const auto o = mla_options(GetParam());
  torch::manual_seed(3);
  MLAttention m(o.d_model, o.n_heads, o.mla, 1.0 / std::sqrt(static_cast<double>(o.mla.qk_head_dim())));
  randomize(*m, 4);
  EXPECT_EQ(static_cast<bool>(m->q_proj), GetParam() == 0);
  EXPECT_EQ(static_cast<bool>(m->q_a_proj), GetParam() > 0);
  auto x = torch::randn({1, 9, o.d_model});
  auto tables = rope_tables(o.mla.qk_rope_head_dim, 9, o.rope_theta, {}, o.max_seq_len);
  torch::NoGradGuard no_grad;
  auto got = m->forward(x, tables.cos, tables.sin_signed, nullptr, 0);
  expect_close(got, reference_mla(*m, x, o.n_heads, o.rope_theta));
}

INSTANTIATE_TEST_SUITE_P(QueryLatent, MlaModule, ::testing::Values(0, 10),
                         [](const auto& info) { return info.param == 0 ? "NoQueryLora" : "QueryLora"; });

class MlaCache : public ::testing::TestWithParam<int64_t> {
 protected:
  void SetUp() override {
    options_ = mla_options(GetParam());
    torch::manual_seed(21);
    model_ = Transformer(options_);
    randomize(*model_, 22);
    model_->eval();
    torch::manual_seed(23);
    tokens_ = torch::randint(0, options_.vocab_size, {2, 12}, torch::kLong);
    torch::NoGradGuard no_grad;
    full_ = model_->forward(tokens_);  // the naive (expanded) form
  }

  // The absorbed form, tokens_ fed in chunks through one cache.
  torch::Tensor incremental(const std::vector<int64_t>& chunks) {
    torch::NoGradGuard no_grad;
    auto cache = model_->make_cache(2, tokens_.size(1));
    std::vector<torch::Tensor> parts;
    int64_t pos = 0;
    for (int64_t n : chunks) {
      parts.push_back(model_->forward(tokens_.narrow(1, pos, n), &cache));
      pos += n;
      EXPECT_EQ(cache.length, pos);
    }
    return torch::cat(parts, 1);
  }

  TransformerOptions options_;
  Transformer model_{nullptr};
  torch::Tensor tokens_, full_;
};

TEST_P(MlaCache, AbsorbedDecodeMatchesTheNaiveForward) {
  expect_close(incremental({4, 1, 1, 1, 1, 1, 1, 1, 1}), full_);
  expect_close(incremental(std::vector<int64_t>(12, 1)), full_);
  expect_close(incremental({3, 5, 4}), full_);
}

TEST_P(MlaCache, CacheKeepsOnlyTheLatentAndTheRopeKey) {
  auto cache = model_->make_cache(3, 7);
  ASSERT_EQ(cache.keys.size(), static_cast<size_t>(options_.n_layers));
  EXPECT_TRUE(cache.values.empty());
  const int64_t width = options_.mla.kv_lora_rank + options_.mla.qk_rope_head_dim;
  EXPECT_EQ(cache.keys[0].sizes(), (std::vector<int64_t>{3, 1, 7, width}));
  EXPECT_EQ(cache.values_per_position(), width);
  // Multi-head attention with the same per-head key and value sizes would cache
  // heads * (qk_head_dim + v_head_dim) values per position.
  EXPECT_LT(width, options_.n_heads * (options_.mla.qk_head_dim() + options_.mla.v_head_dim));
  torch::NoGradGuard no_grad;
  auto rows = tokens_.narrow(0, 0, 1).expand({3, tokens_.size(1)}).contiguous();
  model_->forward(rows.narrow(1, 0, 1), &cache);
  EXPECT_BRIGADE_ERROR(model_->forward(rows.narrow(1, 1, 7), &cache), "KV cache full");
}

TEST_P(MlaCache, BatchedLeftPaddedGenerationMatchesSingleRuns) {
  const std::vector<std::vector<int64_t>> prompts = {{1, 2, 3, 4, 5, 6, 7}, {8, 9}, {10, 11, 12, 13}};
  SamplingOptions o;
  o.max_new_tokens = 6;
  auto batch = generate_batch(model_, prompts, o, {0, 0, 0});
  ASSERT_EQ(batch.size(), prompts.size());
  std::vector<int64_t> all;
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(batch[i].tokens, generate(model_, prompts[i], o).tokens) << "prompt " << i;
    all.insert(all.end(), batch[i].tokens.begin(), batch[i].tokens.end());
  }
  // The uncached argmax of the first step, so the cached path is checked against the naive one.
  torch::NoGradGuard no_grad;
  auto logits = model_->forward(torch::tensor(prompts[1], torch::kLong).unsqueeze(0));
  EXPECT_EQ(batch[1].tokens.at(0), logits[0][-1].argmax().item<int64_t>());
  std::sort(all.begin(), all.end());
  EXPECT_GT(std::unique(all.begin(), all.end()) - all.begin(), 2) << "degenerate model";
}

INSTANTIATE_TEST_SUITE_P(QueryLatent, MlaCache, ::testing::Values(0, 10),
                         [](const auto& info) { return info.param == 0 ? "NoQueryLora" : "QueryLora"; });

TEST(MlaModel, ParameterNamesAreHuggingFaces) {
  torch::manual_seed(1);
  Transformer model(mla_options(10));
  std::vector<std::string> names;
  for (const auto& item : model->named_parameters()) {
    if (item.key().rfind("layers.0.self_attn.", 0) == 0) names.push_back(item.key().substr(19));
  }
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"kv_a_layernorm.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight",
                                             "o_proj.weight", "q_a_layernorm.weight", "q_a_proj.weight",
                                             "q_b_proj.weight"}));
  auto w = model->named_parameters().find("layers.1.self_attn.kv_a_proj_with_mqa.weight");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->sizes(), (std::vector<int64_t>{12 + 4, 32}));
}

TEST(MlaModel, Fp8TrainingStepRunsAndStaysNearFp32) {
  auto o = mla_options(10);
  torch::manual_seed(5);
  Transformer ref(o), fp8(o);
  randomize(*ref, 6);
  {
    torch::NoGradGuard no_grad;
    auto src = ref->named_parameters();
    for (auto& item : fp8->named_parameters()) item.value().copy_(src[item.key()]);
  }
  precision::Fp8Options f;
  f.recipe = precision::Fp8Recipe::kCurrent;
  fp8->enable_fp8(f);
  auto tokens = torch::randint(0, o.vocab_size, {2, 10}, torch::kLong);
  auto want = ref->forward(tokens);
  auto got = fp8->forward(tokens);
  const double rel = ((got - want).norm() / want.norm()).item<double>();
  EXPECT_GT(rel, 0.0) << "FP8 changed nothing: the projections did not run in FP8";
  EXPECT_LT(rel, 0.15);
  auto loss = torch::nn::functional::cross_entropy(got.reshape({-1, o.vocab_size}), tokens.reshape(-1));
  loss.backward();
  for (const auto& item : fp8->named_parameters()) {
    ASSERT_TRUE(item.value().grad().defined()) << item.key();
    EXPECT_TRUE(torch::isfinite(item.value().grad()).all().item<bool>()) << item.key();
  }
  EXPECT_GT(fp8->named_parameters()["layers.0.self_attn.kv_b_proj.weight"].grad().abs().sum().item<double>(), 0.0);
}

TEST(MlaModel, OptionsValidateNamingTheKey) {
  auto o = mla_options(0);
  o.qkv_bias = true;
  EXPECT_BRIGADE_ERROR(o.validate(), "model.qkv_bias");
  o = mla_options(0);
  o.n_kv_heads = 2;
  EXPECT_BRIGADE_ERROR(o.validate(), "model.n_kv_heads");
  o = mla_options(0);
  o.mla.qk_rope_head_dim = 5;
  EXPECT_BRIGADE_ERROR(o.validate(), "model.mla.qk_rope_head_dim");
  o = mla_options(0);
  o.mla.kv_lora_rank = 0;
  EXPECT_BRIGADE_ERROR(o.validate(), "model.mla.kv_lora_rank");
  o = mla_options(0);
  o.mla.q_lora_rank = -1;
  EXPECT_BRIGADE_ERROR(o.validate(), "model.mla.q_lora_rank");
  EXPECT_NO_THROW(mla_options(10).validate());
}

// ---------------------------------------------------------------------------------
// RoPE scaling tables (their agreement with transformers is in hf_test.cpp)

TEST(RopeTables, PlainRopeIsTheTextbookFormula) {
  auto t = rope_tables(8, 20, 500.0, {}, 20);
  auto pos = torch::arange(20, torch::kDouble).unsqueeze(1);
  auto inv = torch::pow(500.0, -torch::arange(0, 8, 2, torch::kDouble) / 8.0);
  auto ang = torch::cat({pos * inv, pos * inv}, 1);
  expect_close(t.cos, ang.cos(), 1e-6);
  auto s = ang.sin();
  expect_close(t.sin_signed, torch::cat({-s.narrow(1, 0, 4), s.narrow(1, 4, 4)}, 1), 1e-6);
}

TEST(RopeTables, LinearScalingDividesThePositions) {
  RopeScaling linear;
  linear.type = RopeScalingType::kLinear;
  linear.factor = 4.0;
  auto scaled = rope_tables(8, 16, 100.0, linear, 16);
  auto plain = rope_tables(8, 4, 100.0, {}, 16);
  // Position 4p under factor 4 is position p unscaled.
  auto every4 = torch::arange(0, 16, 4, torch::kLong);
  expect_close(scaled.cos.index_select(0, every4), plain.cos, 1e-6);
  expect_close(scaled.sin_signed.index_select(0, every4), plain.sin_signed, 1e-6);
  EXPECT_GT((scaled.cos.narrow(0, 0, 4) - plain.cos).abs().max().item<double>(), 1e-2);
}

TEST(RopeTables, YarnKeepsHighFrequenciesAndStretchesLowOnes) {
  RopeScaling yarn;
  yarn.type = RopeScalingType::kYarn;
  yarn.factor = 8.0;
  yarn.original_max_seq_len = 64;
  yarn.attention_factor = 1.0;  // isolate the frequencies
  const int64_t dim = 32;
  auto scaled = rope_tables(dim, 2, 10000.0, yarn, 512);
  auto plain = rope_tables(dim, 2, 10000.0, {}, 512);
  // Row 1 holds sin(inv_freq): the first (fastest, > beta_fast rotations in 64
  // positions) frequencies are unchanged, the last (slowest) are divided by 8.
  auto angle = [&](const RopeTables& t, int64_t i) { return std::asin(t.sin_signed[1][dim / 2 + i].item<double>()); };
  EXPECT_NEAR(angle(scaled, 0), angle(plain, 0), 1e-6);
  EXPECT_NEAR(angle(scaled, dim / 2 - 1) * 8.0, angle(plain, dim / 2 - 1), 1e-8);
  // attention_factor multiplies the tables; 0 derives 0.1 ln(8) + 1.
  yarn.attention_factor = 0.0;
  auto derived = rope_tables(dim, 2, 10000.0, yarn, 512);
  EXPECT_NEAR(derived.cos[0][0].item<double>(), 0.1 * std::log(8.0) + 1.0, 1e-6);
  EXPECT_DOUBLE_EQ(yarn.softmax_scale_factor(), 1.0);  // no mscale_all_dim: MLA's scale unchanged
}

TEST(RopeTables, ScalingOptionsValidateNamingTheKey) {
  RopeScaling s;
  s.type = RopeScalingType::kYarn;
  s.factor = 0.5;
  EXPECT_BRIGADE_ERROR(s.validate(), "model.rope_scaling.factor");
  EXPECT_BRIGADE_ERROR(parse_rope_scaling_type("dynamic_ntk"), "dynamic_ntk");
  EXPECT_EQ(parse_rope_scaling_type(to_string(RopeScalingType::kLlama3)), RopeScalingType::kLlama3);
}

}  // namespace
}  // namespace brigade::model
