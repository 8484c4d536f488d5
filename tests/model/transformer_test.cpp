// The transformer against a slow reference written from the formulas (RMSNorm, RoPE
// rotate-half, causal softmax per head, GQA by explicit head mapping, SwiGLU), plus
// KV-cache consistency, causality, parameter naming/counting and option validation.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "model/transformer.h"
#include "tests/testing.h"

namespace brigade::model {
namespace {

using Params = std::map<std::string, torch::Tensor>;  // name -> float64 copy

TransformerOptions small_options() {
  TransformerOptions o;
  o.vocab_size = 37;
  o.d_model = 32;
  o.n_layers = 2;
  o.n_heads = 4;
  o.d_ff = 48;
  o.max_seq_len = 32;
  o.rope_theta = 100.0;  // short wavelengths so a few positions already rotate a lot
  o.norm_eps = 1e-5;
  return o;
}

// Re-draws every parameter with O(1) scale so attention is far from uniform, norms are
// not all ones and biases are not zero: the default init would hide many mistakes.
void randomize(Transformer& model, uint64_t seed) {
  torch::manual_seed(seed);
  torch::NoGradGuard no_grad;
  for (auto& item : model->named_parameters()) {
    auto& p = item.value();
    const std::string& name = item.key();
    if (name.find("norm.weight") != std::string::npos || name.find("layernorm") != std::string::npos) {
      p.copy_(1.0 + 0.3 * torch::randn_like(p));
    } else if (p.dim() == 1) {  // biases
      p.copy_(0.5 * torch::randn_like(p));
    } else if (name == "embed_tokens.weight") {
      p.copy_(torch::randn_like(p));
    } else {
      const double fan_in = static_cast<double>(p.size(1));
      p.copy_(torch::randn_like(p) * (1.5 / std::sqrt(fan_in)));
    }
  }
}

Params double_params(Transformer& model) {
  Params out;
  for (const auto& item : model->named_parameters()) out[item.key()] = item.value().detach().to(torch::kDouble);
  return out;
}

const torch::Tensor& param(const Params& p, const std::string& name) {
  auto it = p.find(name);
  if (it == p.end()) throw std::runtime_error("reference: missing parameter " + name);
  return it->second;
}

// x: [T, dim] -> x / sqrt(mean(x^2) + eps) * w, row by row.
torch::Tensor ref_rmsnorm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  auto out = torch::empty_like(x);
  const int64_t rows = x.size(0), dim = x.size(1);
  auto xa = x.accessor<double, 2>();
  auto wa = w.accessor<double, 1>();
  auto oa = out.accessor<double, 2>();
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) ss += xa[r][i] * xa[r][i];
    const double scale = 1.0 / std::sqrt(ss / static_cast<double>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) oa[r][i] = xa[r][i] * scale * wa[i];
  }
  return out;
}

torch::Tensor ref_linear(const torch::Tensor& x, const Params& p, const std::string& prefix) {
  auto y = torch::matmul(x, param(p, prefix + ".weight").t());
  if (p.count(prefix + ".bias")) y = y + param(p, prefix + ".bias");
  return y;
}

// Rotate-half RoPE on one head vector at position `pos`: pairs (i, i + hd/2) rotate by
// pos * theta^(-2i/hd).
std::vector<double> ref_rope(const std::vector<double>& v, int64_t pos, double theta) {
  const size_t hd = v.size(), half = hd / 2;
  std::vector<double> out(hd);
  for (size_t i = 0; i < half; ++i) {
    const double freq = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(hd));
    const double angle = static_cast<double>(pos) * freq;
    const double c = std::cos(angle), s = std::sin(angle);
    out[i] = v[i] * c - v[i + half] * s;
    out[i + half] = v[i + half] * c + v[i] * s;
  }
  return out;
}

// One sequence: tokens [T] -> logits [T, vocab], float64.
torch::Tensor reference_forward(const TransformerOptions& o, const Params& p, const std::vector<int64_t>& tokens) {
  const int64_t T = static_cast<int64_t>(tokens.size());
  const int64_t H = o.n_heads, KV = o.kv_heads(), hd = o.head_size();
  const int64_t group = H / KV;
  auto h = param(p, "embed_tokens.weight").index_select(0, torch::tensor(tokens, torch::kLong)).clone();
  for (int64_t l = 0; l < o.n_layers; ++l) {
    const std::string pre = "layers." + std::to_string(l) + ".";
    auto x = ref_rmsnorm(h, param(p, pre + "input_layernorm.weight"), o.norm_eps);
    auto q = ref_linear(x, p, pre + "self_attn.q_proj");  // [T, H*hd]
    auto k = ref_linear(x, p, pre + "self_attn.k_proj");  // [T, KV*hd]
    auto v = ref_linear(x, p, pre + "self_attn.v_proj");  // [T, KV*hd]
    auto qa = q.accessor<double, 2>();
    auto ka = k.accessor<double, 2>();
    auto va = v.accessor<double, 2>();

    // Per-head vectors after q/k norm and RoPE: qh[head][t], kh[kvhead][t].
    auto head_vec = [&](const auto& acc, int64_t t, int64_t head) {
      std::vector<double> out(static_cast<size_t>(hd));
      for (int64_t i = 0; i < hd; ++i) out[static_cast<size_t>(i)] = acc[t][head * hd + i];
      return out;
    };
    auto head_norm = [&](std::vector<double> vec, const std::string& name) {
      if (!o.qk_norm) return vec;
      auto w = param(p, pre + "self_attn." + name + ".weight");
      double ss = 0;
      for (double e : vec) ss += e * e;
      const double scale = 1.0 / std::sqrt(ss / static_cast<double>(hd) + o.norm_eps);
      for (int64_t i = 0; i < hd; ++i) vec[static_cast<size_t>(i)] *= scale * w[i].item<double>();
      return vec;
    };
    std::vector<std::vector<std::vector<double>>> qh(H), kh(KV), vh(KV);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t hh = 0; hh < H; ++hh) qh[hh].push_back(ref_rope(head_norm(head_vec(qa, t, hh), "q_norm"), t, o.rope_theta));
      for (int64_t g = 0; g < KV; ++g) {
        kh[g].push_back(ref_rope(head_norm(head_vec(ka, t, g), "k_norm"), t, o.rope_theta));
        vh[g].push_back(head_vec(va, t, g));
      }
    }

    auto attn = torch::zeros({T, H * hd}, torch::kDouble);
    auto aa = attn.accessor<double, 2>();
    for (int64_t hh = 0; hh < H; ++hh) {
      const int64_t g = hh / group;  // kv head shared by `group` consecutive query heads
      for (int64_t i = 0; i < T; ++i) {
        std::vector<double> scores;
        double best = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {  // causal: keys up to the query's own position
          double dot = 0;
          for (int64_t d = 0; d < hd; ++d) dot += qh[hh][i][d] * kh[g][j][d];
          scores.push_back(dot / std::sqrt(static_cast<double>(hd)));
          best = std::max(best, scores.back());
        }
        double total = 0;
        for (double& s : scores) total += (s = std::exp(s - best));
        for (int64_t j = 0; j <= i; ++j) {
          const double w = scores[static_cast<size_t>(j)] / total;
          for (int64_t d = 0; d < hd; ++d) aa[i][hh * hd + d] += w * vh[g][j][d];
        }
      }
    }
    h = h + ref_linear(attn, p, pre + "self_attn.o_proj");

    auto x2 = ref_rmsnorm(h, param(p, pre + "post_attention_layernorm.weight"), o.norm_eps);
    auto gate = ref_linear(x2, p, pre + "mlp.gate_proj");
    auto up = ref_linear(x2, p, pre + "mlp.up_proj");
    auto silu = gate / (1.0 + torch::exp(-gate));
    h = h + ref_linear(silu * up, p, pre + "mlp.down_proj");
  }
  auto hn = ref_rmsnorm(h, param(p, "norm.weight"), o.norm_eps);
  const auto& head = o.tie_embeddings ? param(p, "embed_tokens.weight") : param(p, "lm_head.weight");
  return torch::matmul(hn, head.t());
}

struct ReferenceCase {
  std::string name;
  TransformerOptions options;
};

std::vector<ReferenceCase> reference_cases() {
  std::vector<ReferenceCase> cases;
  auto mha = small_options();
  cases.push_back({"MHA", mha});
  auto gqa = small_options();
  gqa.n_heads = 4;
  gqa.n_kv_heads = 2;
  cases.push_back({"GQA", gqa});
  auto mqa = small_options();
  mqa.n_kv_heads = 1;
  cases.push_back({"MQA", mqa});
  auto qwen = small_options();
  qwen.n_kv_heads = 2;
  qwen.qkv_bias = true;
  qwen.qk_norm = true;
  cases.push_back({"QkvBiasQkNorm", qwen});
  auto untied = small_options();
  untied.tie_embeddings = false;
  cases.push_back({"UntiedHead", untied});
  auto explicit_hd = small_options();  // head_dim decoupled from d_model / n_heads
  explicit_hd.d_model = 30;
  explicit_hd.n_heads = 3;
  explicit_hd.head_dim = 12;
  cases.push_back({"ExplicitHeadDim", explicit_hd});
  return cases;
}

void PrintTo(const ReferenceCase& c, std::ostream* os) { *os << c.name; }

class ModelReference : public ::testing::TestWithParam<ReferenceCase> {};

// The model runs in float32 against the float64 reference. A float64 model cannot be
// compared at 1e-10: RMSNorm computes in float32 by design (x.to(kFloat)) and the RoPE
// tables are stored as float32, so the tolerance is float32's.
TEST_P(ModelReference, MatchesSlowFloat64Reference) {
  const auto& o = GetParam().options;
  torch::manual_seed(7);
  Transformer model(o);
  randomize(model, 11);
  model->eval();
  const std::vector<std::vector<int64_t>> seqs = {{1, 5, 9, 2, 36, 0, 17, 17, 4, 30, 11, 8},
                                                  {3, 3, 3, 20, 1, 2, 35, 14, 7, 7, 22, 5}};
  auto tokens = torch::tensor(seqs[0], torch::kLong).unsqueeze(0);
  tokens = torch::cat({tokens, torch::tensor(seqs[1], torch::kLong).unsqueeze(0)}, 0);  // [2, 12]
  torch::Tensor logits;
  {
    torch::NoGradGuard no_grad;
    logits = model->forward(tokens);
  }
  ASSERT_EQ(logits.sizes(), (std::vector<int64_t>{2, 12, o.vocab_size}));
  EXPECT_EQ(logits.scalar_type(), torch::kFloat);

  const auto params = double_params(model);
  for (size_t b = 0; b < seqs.size(); ++b) {
    auto ref = reference_forward(o, params, seqs[b]);
    // The reference must be non-trivial for the comparison to mean anything.
    ASSERT_GT(ref.abs().max().item<double>(), 1.0);
    auto diff = (logits[static_cast<int64_t>(b)].to(torch::kDouble) - ref).abs().max().item<double>();
    EXPECT_LE(diff, 1e-5 * std::max(1.0, ref.abs().max().item<double>())) << "sequence " << b;
  }
}

INSTANTIATE_TEST_SUITE_P(Model, ModelReference, ::testing::ValuesIn(reference_cases()),
                         [](const auto& info) { return info.param.name; });

// A float64 model still follows the reference to float32 accuracy (RMSNorm and the
// RoPE tables are float32 by design), and its logits come back as float64.
TEST(ModelTransformer, Float64ModelMatchesReferenceToFloat32Accuracy) {
  auto o = small_options();
  o.n_kv_heads = 2;
  torch::manual_seed(3);
  Transformer model(o);
  randomize(model, 5);
  model->to(torch::kDouble);
  model->eval();
  const std::vector<int64_t> seq = {4, 8, 15, 16, 23, 36, 1, 0};
  torch::NoGradGuard no_grad;
  auto logits = model->forward(torch::tensor(seq, torch::kLong).unsqueeze(0));
  EXPECT_EQ(logits.scalar_type(), torch::kDouble);
  auto ref = reference_forward(o, double_params(model), seq);
  EXPECT_LE((logits[0] - ref).abs().max().item<double>(), 1e-5 * ref.abs().max().item<double>());
}

// ---------------------------------------------------------------------------------
// KV cache

// float32 agreement: atol 1e-5 at unit logit scale. The randomized weights give logits
// of magnitude ~20, so the bound scales with the largest logit (a wrong position or mask
// in the cache path moves logits by O(1), far beyond it).
void expect_close(const torch::Tensor& got, const torch::Tensor& want) {
  ASSERT_EQ(got.sizes(), want.sizes());
  const double scale = std::max(1.0, want.abs().max().item<double>());
  const double diff = (got - want).abs().max().item<double>();
  EXPECT_LE(diff, 1e-5 * scale) << "logit scale " << scale;
}

class ModelKVCache : public ::testing::Test {
 protected:
  void SetUp() override {
    options_ = small_options();
    options_.n_kv_heads = 2;
    options_.qk_norm = true;
    torch::manual_seed(21);
    model_ = Transformer(options_);
    randomize(model_, 22);
    model_->eval();
    torch::manual_seed(23);
    tokens_ = torch::randint(0, options_.vocab_size, {2, 12}, torch::kLong);
    torch::NoGradGuard no_grad;
    full_ = model_->forward(tokens_);  // [2, 12, vocab]
  }

  // Feeds tokens_ in chunks of the given sizes through one cache; returns all logits.
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
    EXPECT_EQ(pos, tokens_.size(1));
    return torch::cat(parts, 1);
  }

  TransformerOptions options_;
  Transformer model_{nullptr};
  torch::Tensor tokens_, full_;
};

TEST_F(ModelKVCache, PrefillThenOneAtATimeMatchesFullForward) {
  auto got = incremental({4, 1, 1, 1, 1, 1, 1, 1, 1});
  ASSERT_EQ(got.sizes(), full_.sizes());
  expect_close(got, full_);
}

TEST_F(ModelKVCache, OneTokenAtATimeFromTheStartMatchesFullForward) {
  expect_close(incremental(std::vector<int64_t>(12, 1)), full_);
}

TEST_F(ModelKVCache, MultiTokenChunksMatchFullForward) {
  expect_close(incremental({3, 5, 4}), full_);
  expect_close(incremental({1, 6, 1, 4}), full_);
}

TEST_F(ModelKVCache, CacheShapeAndOverflowErrors) {
  auto cache = model_->make_cache(2, 5);
  ASSERT_EQ(cache.keys.size(), static_cast<size_t>(options_.n_layers));
  EXPECT_EQ(cache.keys[0].sizes(), (std::vector<int64_t>{2, 2, 5, 8}));
  EXPECT_EQ(cache.capacity(), 5);
  EXPECT_EQ(cache.length, 0);
  torch::NoGradGuard no_grad;
  model_->forward(tokens_.narrow(1, 0, 4), &cache);
  EXPECT_BRIGADE_ERROR(model_->forward(tokens_.narrow(1, 4, 2), &cache), "KV cache full");
  EXPECT_BRIGADE_ERROR(model_->make_cache(1, options_.max_seq_len + 1), "exceeds model.max_seq_len");
}

// GPU opt-in: the cache must live where the model lives, or cached decoding of a CUDA
// model mixes devices in attention.
TEST_F(ModelKVCache, CudaCacheFollowsTheModelDevice) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  model_->to(torch::kCUDA);
  auto cache = model_->make_cache(2, tokens_.size(1));
  EXPECT_TRUE(cache.keys[0].is_cuda());
  EXPECT_TRUE(cache.values[0].is_cuda());
  torch::NoGradGuard no_grad;
  auto tokens = tokens_.to(torch::kCUDA);
  auto a = model_->forward(tokens.narrow(1, 0, 5), &cache);
  auto b = model_->forward(tokens.narrow(1, 5, 7), &cache);
  expect_close(torch::cat({a, b}, 1).cpu(), full_);
}

TEST(ModelTransformer, SequenceLongerThanMaxSeqLenIsAnError) {
  auto o = small_options();
  o.max_seq_len = 8;
  Transformer model(o);
  torch::NoGradGuard no_grad;
  EXPECT_EQ(model->forward(torch::zeros({1, 8}, torch::kLong)).size(1), 8);
  EXPECT_BRIGADE_ERROR(model->forward(torch::zeros({1, 9}, torch::kLong)), "exceeds model.max_seq_len 8");
  EXPECT_BRIGADE_ERROR(model->forward(torch::zeros({9}, torch::kLong)), "tokens must be [batch, seq]");
}

// ---------------------------------------------------------------------------------
// Causality

TEST(ModelTransformer, ChangingTokenTLeavesEarlierLogitsUnchanged) {
  auto o = small_options();
  o.n_kv_heads = 2;
  torch::manual_seed(5);
  Transformer model(o);
  randomize(model, 6);
  model->eval();
  torch::NoGradGuard no_grad;
  torch::manual_seed(9);
  auto tokens = torch::randint(0, o.vocab_size, {1, 10}, torch::kLong);
  auto base = model->forward(tokens);
  for (int64_t t : {0, 3, 9}) {
    auto changed = tokens.clone();
    changed[0][t] = (changed[0][t].item<int64_t>() + 1) % o.vocab_size;
    auto out = model->forward(changed);
    if (t > 0) {
      EXPECT_TRUE(torch::allclose(out.narrow(1, 0, t), base.narrow(1, 0, t), 0, 1e-6)) << "t=" << t;
    }
    // The changed position (and later ones) must see the change.
    EXPECT_GT((out.narrow(1, t, 10 - t) - base.narrow(1, t, 10 - t)).abs().max().item<double>(), 1e-3)
        << "t=" << t;
  }
}

// Packed documents (segments): the second document of a row reads exactly as it
// does alone (RoPE is relative, the mask hides the first document), and the first
// is untouched by what follows it.
TEST(ModelTransformer, PackedDocumentsDoNotSeeEachOther) {
  auto o = small_options();
  o.n_kv_heads = 2;
  torch::manual_seed(5);
  Transformer model(o);
  randomize(model, 6);
  model->eval();
  torch::NoGradGuard no_grad;
  torch::manual_seed(10);
  auto a = torch::randint(0, o.vocab_size, {1, 6}, torch::kLong);
  auto b = torch::randint(0, o.vocab_size, {1, 9}, torch::kLong);
  auto row = torch::cat({a, b}, 1);
  auto segments = torch::cat({torch::zeros({1, 6}, torch::kLong), torch::ones({1, 9}, torch::kLong)}, 1);
  auto packed = model->forward(row, nullptr, segments);
  EXPECT_TRUE(torch::allclose(packed.narrow(1, 0, 6), model->forward(a), 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(packed.narrow(1, 6, 9), model->forward(b), 1e-4, 1e-4))
      << (packed.narrow(1, 6, 9) - model->forward(b)).abs().max().item<double>();
  // Without segments the second document does see the first.
  EXPECT_GT((model->forward(row).narrow(1, 6, 9) - model->forward(b)).abs().max().item<double>(), 1e-3);
  EXPECT_BRIGADE_ERROR(model->forward(row, nullptr, segments.narrow(1, 0, 5)), "must match tokens");
}

// ---------------------------------------------------------------------------------
// Parameters

std::set<std::string> parameter_names(const Transformer& model) {
  std::set<std::string> names;
  for (const auto& item : model->named_parameters()) names.insert(item.key());
  return names;
}

TEST(ModelTransformer, ParameterNamesFollowHuggingFaceLayout) {
  auto o = small_options();
  Transformer tied(o);
  auto names = parameter_names(tied);
  for (const char* expected :
       {"embed_tokens.weight", "norm.weight", "layers.0.self_attn.q_proj.weight",
        "layers.0.self_attn.k_proj.weight", "layers.0.self_attn.v_proj.weight",
        "layers.0.self_attn.o_proj.weight", "layers.1.mlp.gate_proj.weight", "layers.1.mlp.up_proj.weight",
        "layers.1.mlp.down_proj.weight", "layers.1.input_layernorm.weight",
        "layers.1.post_attention_layernorm.weight"}) {
    EXPECT_TRUE(names.count(expected)) << expected;
  }
  EXPECT_FALSE(names.count("lm_head.weight"));
  EXPECT_FALSE(names.count("layers.0.self_attn.q_proj.bias"));
  EXPECT_FALSE(names.count("layers.0.self_attn.q_norm.weight"));
  EXPECT_FALSE(names.count("layers.2.input_layernorm.weight"));  // only n_layers = 2 blocks
  // 2 layers x (4 attention + 3 mlp + 2 norms) + embedding + final norm.
  EXPECT_EQ(names.size(), 2u * 9u + 2u);
  for (const auto& n : names) EXPECT_EQ(n.find("rope"), std::string::npos) << n << " is a buffer";

  o.tie_embeddings = false;
  o.qkv_bias = true;
  o.qk_norm = true;
  Transformer untied(o);
  auto names2 = parameter_names(untied);
  EXPECT_TRUE(names2.count("lm_head.weight"));
  EXPECT_FALSE(names2.count("lm_head.bias"));
  for (const char* expected : {"layers.0.self_attn.q_proj.bias", "layers.0.self_attn.k_proj.bias",
                               "layers.0.self_attn.v_proj.bias", "layers.0.self_attn.q_norm.weight",
                               "layers.0.self_attn.k_norm.weight"}) {
    EXPECT_TRUE(names2.count(expected)) << expected;
  }
  EXPECT_FALSE(names2.count("layers.0.self_attn.o_proj.bias"));  // Qwen2 has no o_proj bias
}

int64_t numel_sum(const Transformer& model) {
  int64_t n = 0;
  for (const auto& p : model->parameters()) n += p.numel();
  return n;
}

TEST(ModelTransformer, ParameterCountTiedAndUntied) {
  auto o = small_options();
  o.n_kv_heads = 2;
  const int64_t V = o.vocab_size, d = o.d_model, L = o.n_layers, hd = o.head_size();
  const int64_t H = o.n_heads, KV = o.kv_heads(), ff = o.ff_size();
  const int64_t per_layer_matmul = d * H * hd + 2 * d * KV * hd + H * hd * d + 3 * d * ff;

  Transformer tied(o);
  auto c = tied->parameter_count();
  EXPECT_EQ(c.total, numel_sum(tied));
  EXPECT_EQ(c.total, V * d + L * (per_layer_matmul + 2 * d) + d);
  EXPECT_EQ(c.embedding, V * d);
  EXPECT_EQ(c.matmul, L * per_layer_matmul + V * d);  // the tied head still does a matmul

  o.tie_embeddings = false;
  Transformer untied(o);
  auto u = untied->parameter_count();
  EXPECT_EQ(u.total, numel_sum(untied));
  EXPECT_EQ(u.total, c.total + V * d);
  EXPECT_EQ(u.embedding, V * d);
  EXPECT_EQ(u.matmul, c.matmul);  // the head is counted once either way

  o.qkv_bias = true;
  o.qk_norm = true;
  Transformer qwen(o);
  auto q = qwen->parameter_count();
  EXPECT_EQ(q.total, numel_sum(qwen));
  EXPECT_EQ(q.total, u.total + L * ((H + 2 * KV) * hd + 2 * hd));
  EXPECT_EQ(q.matmul, u.matmul);  // biases and norms do no matmul work

  const int64_t seq = 16;
  EXPECT_DOUBLE_EQ(c.train_flops_per_token(o, seq),
                   6.0 * static_cast<double>(c.matmul) + 12.0 * static_cast<double>(L * seq * H * hd));
}

TEST(ModelTransformer, MoELayersAfterFirstKDenseWithTotalAndActivatedCounts) {
  auto o = small_options();
  o.n_layers = 3;
  o.moe.num_experts = 6;
  o.moe.top_k = 2;
  o.moe.num_shared_experts = 1;
  o.moe.expert_d_ff = 8;
  o.moe.first_k_dense = 1;
  Transformer model(o);
  const int64_t V = o.vocab_size, d = o.d_model, hd = o.head_size(), H = o.n_heads, KV = o.kv_heads();
  const int64_t attn = d * H * hd + 2 * d * KV * hd + H * hd * d, ff = o.ff_size(), E = 6, eff = 8;
  const int64_t dense_ffn = 3 * d * ff;
  const int64_t per_expert = 3 * d * eff;
  const int64_t moe_ffn = E * d /* router */ + E * per_expert + 3 * d * eff /* shared */;

  EXPECT_TRUE(model->layers[0]->as<BlockImpl>()->mlp);
  EXPECT_FALSE(model->layers[0]->as<BlockImpl>()->moe);
  for (int64_t i : {1, 2}) EXPECT_TRUE(model->layers[i]->as<BlockImpl>()->moe) << "layer " << i;
  ASSERT_EQ(model->moe_layers().size(), 2u);

  auto c = model->parameter_count();
  EXPECT_EQ(c.total, numel_sum(model));
  EXPECT_EQ(c.total, V * d + 3 * (attn + 2 * d) + dense_ffn + 2 * moe_ffn + d);
  EXPECT_EQ(c.activated, c.total - 2 * (E - 2) * per_expert);
  EXPECT_EQ(c.matmul, 3 * attn + dense_ffn + 2 * (moe_ffn - (E - 2) * per_expert) + V * d);

  // Checkpoints carry the expert biases next to the parameters, under HF names.
  std::set<std::string> names;
  for (const auto& [name, t] : model->state_dict()) names.insert(name);
  EXPECT_TRUE(names.contains("layers.1.mlp.gate.e_score_correction_bias"));
  EXPECT_TRUE(names.contains("layers.2.mlp.experts.gate_up_proj"));
  EXPECT_TRUE(names.contains("layers.2.mlp.shared_experts.down_proj.weight"));
  EXPECT_TRUE(names.contains("layers.0.mlp.down_proj.weight"));
  EXPECT_FALSE(names.contains("rope_cos"));

  // Forward works, and generation with a KV cache matches the full forward.
  auto tokens = torch::randint(0, V, {2, 7});
  model->eval();
  torch::NoGradGuard no_grad;
  auto full = model->forward(tokens);
  auto cache = model->make_cache(2, 7);
  auto first = model->forward(tokens.narrow(1, 0, 4), &cache);
  auto rest = model->forward(tokens.narrow(1, 4, 3), &cache);
  EXPECT_LT((torch::cat({first, rest}, 1) - full).abs().max().item<double>(), 1e-5);
}

TEST(ModelTransformer, DefaultSizesResolve) {
  TransformerOptions o;
  o.d_model = 128;
  o.n_heads = 4;
  EXPECT_EQ(o.kv_heads(), 4);
  EXPECT_EQ(o.head_size(), 32);
  EXPECT_EQ(o.ff_size(), 384);  // 8/3 * 128 = 341.3 -> 384
  o.d_model = 96;
  o.n_heads = 3;
  EXPECT_EQ(o.ff_size(), 256);  // 256 exactly: no rounding up past a multiple of 64
  o.d_ff = 100;
  o.n_kv_heads = 1;
  o.head_dim = 16;
  EXPECT_EQ(o.ff_size(), 100);
  EXPECT_EQ(o.kv_heads(), 1);
  EXPECT_EQ(o.head_size(), 16);
}

// ---------------------------------------------------------------------------------
// Validation

TEST(ModelTransformer, ValidateRejectsInconsistentShapes) {
  auto o = small_options();
  EXPECT_NO_THROW(o.validate());

  auto heads = small_options();
  heads.n_heads = 5;  // 32 % 5 != 0
  EXPECT_BRIGADE_ERROR(heads.validate(), "model.n_heads (5) must divide model.d_model (32)");
  EXPECT_BRIGADE_ERROR(Transformer{heads}, "model.n_heads (5) must divide model.d_model (32)");
  heads.head_dim = 8;  // an explicit head_dim lifts the rule
  EXPECT_NO_THROW(heads.validate());

  auto kv = small_options();
  kv.n_kv_heads = 3;  // 4 % 3 != 0
  EXPECT_BRIGADE_ERROR(kv.validate(), "model.n_kv_heads (3) must divide model.n_heads (4)");
  kv.n_kv_heads = 8;
  EXPECT_BRIGADE_ERROR(kv.validate(), "model.n_kv_heads (8) must divide model.n_heads (4)");

  auto odd = small_options();
  odd.d_model = 12;
  odd.n_heads = 4;  // head dim 3
  EXPECT_BRIGADE_ERROR(odd.validate(), "the head dimension (3) must be even");
  auto odd2 = small_options();
  odd2.head_dim = 7;
  EXPECT_BRIGADE_ERROR(odd2.validate(), "the head dimension (7) must be even");

  auto zero = small_options();
  zero.vocab_size = 0;
  EXPECT_BRIGADE_ERROR(zero.validate(), "model.vocab_size must be positive");
  auto neg_kv = small_options();
  neg_kv.n_kv_heads = -1;
  EXPECT_BRIGADE_ERROR(neg_kv.validate(), "model.n_kv_heads must be >= 0");
  auto eps = small_options();
  eps.norm_eps = 0;
  EXPECT_BRIGADE_ERROR(eps.validate(), "model.norm_eps must be positive");
}

}  // namespace
}  // namespace brigade::model
