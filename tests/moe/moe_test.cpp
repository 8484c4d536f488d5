#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include <torch/torch.h>

#include "core/device.h"
#include "model/safetensors.h"
#include "moe/moe.h"
#include "precision/precision.h"
#include "tests/testing.h"

namespace brigade {
namespace {

// A float64 MoE layer with random weights (and a random selection bias).
struct Fixture {
  moe::MoEOptions options;
  moe::MoELayer layer{nullptr};
  int64_t d = 16, ff = 12;

  explicit Fixture(moe::MoEOptions o, uint64_t seed = 7) : options(o) {
    torch::manual_seed(seed);
    layer = moe::MoELayer(d, ff, options);
    layer->to(torch::kDouble);
    torch::NoGradGuard no_grad;
    for (auto& p : layer->parameters()) p.normal_(0.0, 0.3);
    layer->gate->e_score_correction_bias.normal_(0.0, 0.05);
  }
  moe::GroupedExpertsImpl& experts() { return *layer->experts->as<moe::GroupedExpertsImpl>(); }

  // The same weights as fresh leaves, for the reference's own autograd graph.
  moe::ReferenceWeights reference_weights() {
    moe::ReferenceWeights w;
    auto leaf = [](const torch::Tensor& t) { return t.detach().clone().requires_grad_(true); };
    w.router = leaf(layer->gate->weight);
    w.bias = layer->gate->e_score_correction_bias.detach().clone();
    w.gate_up = leaf(experts().gate_up_proj);
    w.down = leaf(experts().down_proj);
    if (layer->shared_experts) {
      w.shared_gate = leaf(layer->shared_experts->gate_proj->weight);
      w.shared_up = leaf(layer->shared_experts->up_proj->weight);
      w.shared_down = leaf(layer->shared_experts->down_proj->weight);
    }
    return w;
  }
};

moe::MoEOptions base_options() {
  moe::MoEOptions o;
  o.num_experts = 8;
  o.top_k = 3;
  o.num_shared_experts = 1;
  o.expert_d_ff = 6;
  return o;
}

void expect_close(const torch::Tensor& a, const torch::Tensor& b, double tol, const std::string& what) {
  ASSERT_TRUE(a.defined()) << what;
  ASSERT_TRUE(b.defined()) << what;
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  const double diff = (a - b).abs().max().item<double>();
  EXPECT_LE(diff, tol) << what << ": max abs diff " << diff;
}

// Forward output, routing and every gradient (input, router, experts, shared
// experts) of MoELayer against the per-token reference, all in float64.
void check_against_reference(Fixture& f, const torch::Tensor& x_in) {
  auto x = x_in.detach().clone().requires_grad_(true);
  f.layer->train();
  auto y = f.layer->forward(x.unsqueeze(0)).squeeze(0);
  auto w = f.reference_weights();
  auto xr = x_in.detach().clone().requires_grad_(true);
  auto ref = moe::reference_moe(xr, w, f.options);
  expect_close(y, ref.y, 1e-12, "forward");

  // A fixed random projection of the output, so every output element matters.
  auto probe = torch::randn_like(ref.y);
  (y * probe).sum().backward();
  (ref.y * probe).sum().backward();
  expect_close(x.grad(), xr.grad(), 1e-12, "d/dx");
  expect_close(f.layer->gate->weight.grad(), w.router.grad(), 1e-12, "d/d router weight");
  expect_close(f.experts().gate_up_proj.grad(), w.gate_up.grad(), 1e-12, "d/d gate_up_proj");
  expect_close(f.experts().down_proj.grad(), w.down.grad(), 1e-12, "d/d down_proj");
  if (f.layer->shared_experts) {
    expect_close(f.layer->shared_experts->gate_proj->weight.grad(), w.shared_gate.grad(), 1e-12, "d/d shared gate");
    expect_close(f.layer->shared_experts->down_proj->weight.grad(), w.shared_down.grad(), 1e-12, "d/d shared down");
  }
}

TEST(MoERouterTest, SelectionMatchesReferenceWithGroupLimitedRouting) {
  auto o = base_options();
  o.num_groups = 4;
  o.topk_group = 2;
  Fixture f(o);
  auto x = torch::randn({40, f.d}, torch::kDouble);
  auto routing = f.layer->gate->forward(x);
  auto ref = moe::reference_moe(x, f.reference_weights(), o);
  const int64_t per_group = o.num_experts / o.num_groups;
  for (int64_t t = 0; t < x.size(0); ++t) {
    std::vector<int64_t> got(o.top_k);
    std::set<int64_t> groups;
    for (int64_t k = 0; k < o.top_k; ++k) {
      got[k] = routing.indices[t][k].item<int64_t>();
      groups.insert(got[k] / per_group);
    }
    EXPECT_EQ(got, ref.selected[t]) << "token " << t;
    EXPECT_LE(static_cast<int64_t>(groups.size()), o.topk_group) << "token " << t;
  }
  // Group limiting must actually bind on this data, or the test proves little.
  auto ungrouped = o;
  ungrouped.num_groups = ungrouped.topk_group = 1;
  auto free_choice = moe::select_experts(routing.scores + f.layer->gate->e_score_correction_bias, ungrouped);
  EXPECT_FALSE(torch::equal(free_choice, routing.indices));
}

TEST(MoELayerTest, ForwardBackwardMatchReferenceAcrossOptions) {
  struct Case {
    std::string name;
    std::function<void(moe::MoEOptions&)> set;
  };
  const std::vector<Case> cases = {
      {"sigmoid, normalised, scaled", [](auto& o) { o.routed_scaling = 2.5; }},
      {"softmax, not normalised", [](auto& o) { o.score_function = moe::ScoreFunction::kSoftmax; o.normalize_topk = false; }},
      {"group-limited", [](auto& o) { o.num_groups = 4; o.topk_group = 2; o.routed_scaling = 1.5; }},
      {"no shared experts, top-1", [](auto& o) { o.num_shared_experts = 0; o.top_k = 1; }},
      {"two shared experts", [](auto& o) { o.num_shared_experts = 2; }},
      {"capacity, probs policy", [](auto& o) { o.dropless = false; o.capacity_factor = 0.6; }},
      {"capacity, position policy", [](auto& o) { o.dropless = false; o.capacity_factor = 0.6; o.drop_policy = moe::DropPolicy::kPosition; }},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto o = base_options();
    c.set(o);
    Fixture f(o);
    check_against_reference(f, torch::randn({30, f.d}, torch::kDouble));
  }
}

TEST(MoELayerTest, ExpertsWithNoTokensWorkAndGetZeroGradients) {
  auto o = base_options();
  Fixture f(o);
  {
    torch::NoGradGuard no_grad;
    // Experts 1, 4 and 6 can never win a top-3 slot.
    for (int64_t e : {1, 4, 6}) f.layer->gate->e_score_correction_bias[e] = -10.0;
  }
  check_against_reference(f, torch::randn({25, f.d}, torch::kDouble));
  for (int64_t e : {1, 4, 6}) {
    EXPECT_EQ(f.experts().gate_up_proj.grad()[e].abs().max().item<double>(), 0.0) << "expert " << e;
    EXPECT_EQ(f.experts().down_proj.grad()[e].abs().max().item<double>(), 0.0) << "expert " << e;
  }
  EXPECT_GT(f.experts().down_proj.grad()[0].abs().max().item<double>(), 0.0);
}

TEST(MoELayerTest, AllTokensOnOneExpert) {
  auto o = base_options();
  o.top_k = 1;
  Fixture f(o);
  {
    torch::NoGradGuard no_grad;
    f.layer->gate->e_score_correction_bias.fill_(0.0);
    f.layer->gate->e_score_correction_bias[5] = 10.0;
  }
  auto x = torch::randn({20, f.d}, torch::kDouble);
  auto routing = f.layer->gate->forward(x);
  EXPECT_TRUE(torch::all(routing.indices == 5).item<bool>());
  check_against_reference(f, x);
  auto stats = f.layer->end_step(false);
  EXPECT_DOUBLE_EQ(stats.max_load_ratio, static_cast<double>(o.num_experts));
}

// The grouped GEMMs (at::_grouped_mm, taken for 16-byte-aligned float32 rows) give
// exactly the per-expert products a loop of at::mm gives, forward and backward,
// with an idle expert's weight gradients zero.
TEST(MoEGroupedGemmTest, EqualsPerExpertProductsBitwise) {
  torch::manual_seed(3);
  const int64_t d = 16, ff = 8;
  const std::vector<int64_t> counts = {5, 0, 9, 2};
  const int64_t rows = 16, experts = 4;
  auto x = torch::randn({rows, d}, torch::requires_grad());
  auto rw = torch::rand({rows}, torch::requires_grad());
  auto w1 = torch::randn({experts, 2 * ff, d}, torch::requires_grad());
  auto w2 = torch::randn({experts, d, ff}, torch::requires_grad());
  auto y = moe::grouped_swiglu(x, rw, w1, w2, counts);
  auto g = torch::randn_like(y);
  y.backward(g);

  std::vector<torch::Tensor> ys;
  torch::Tensor dw1_idle, dw2_idle;
  int64_t start = 0;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t n = counts[static_cast<size_t>(e)];
    auto xe = x.detach().narrow(0, start, n);
    auto h = torch::mm(xe, w1.detach()[e].t());
    auto act = torch::silu(h.narrow(1, 0, ff)).mul_(h.narrow(1, ff, ff)).mul_(rw.detach().narrow(0, start, n).unsqueeze(1));
    auto ye = torch::mm(act, w2.detach()[e].t());
    ys.push_back(ye);
    // Wgrad of the down projection: g_e^T act_e.
    EXPECT_TRUE(torch::equal(w2.grad()[e], torch::mm(g.narrow(0, start, n).t(), act))) << "expert " << e;
    start += n;
  }
  EXPECT_TRUE(torch::equal(y.detach(), torch::cat(ys)));
  EXPECT_TRUE(w1.grad()[1].eq(0).all().item<bool>());
  EXPECT_TRUE(w2.grad()[1].eq(0).all().item<bool>());
  EXPECT_GT(w1.grad()[2].abs().sum().item<float>(), 0.0f);
  EXPECT_GT(x.grad().abs().sum().item<float>(), 0.0f);
}

// On a GPU in BF16 (CUTLASS grouped GEMMs on Hopper): close to the CPU's float32
// result, forward and every gradient.
TEST(MoEGroupedGemmTest, Bfloat16OnTheGpuTracksTheCpu_CUDA) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device (or brigade built without CUDA)";
  torch::manual_seed(4);
  const int64_t d = 256, ff = 128, experts = 8;
  const std::vector<int64_t> counts = {300, 0, 17, 129, 64, 1, 250, 263};
  const int64_t rows = 1024;
  auto make = [](std::vector<int64_t> shape, double scale) { return (torch::randn(shape) * scale).requires_grad_(true); };
  auto x = make({rows, d}, 1.0), rw = torch::rand({rows}).requires_grad_(true);
  auto w1 = make({experts, 2 * ff, d}, 0.06), w2 = make({experts, d, ff}, 0.08);
  auto g = torch::randn({rows, d});
  moe::grouped_swiglu(x, rw, w1, w2, counts).backward(g);
  auto on = [](const torch::Tensor& t) { return t.detach().to(torch::kCUDA, torch::kBFloat16).requires_grad_(true); };
  auto xg = on(x), rwg = on(rw), w1g = on(w1), w2g = on(w2);
  auto y = moe::grouped_swiglu(xg, rwg, w1g, w2g, counts);
  y.backward(g.to(torch::kCUDA, torch::kBFloat16));
  auto y_cpu = moe::grouped_swiglu(x.detach(), rw.detach(), w1.detach(), w2.detach(), counts);
  auto close = [](const torch::Tensor& gpu, const torch::Tensor& cpu, const char* what) {
    const double err = (gpu.to(torch::kCPU, torch::kFloat) - cpu).abs().max().item<double>();
    const double scale = cpu.abs().max().item<double>();
    EXPECT_LT(err, 0.03 * scale) << what;
  };
  close(y.detach(), y_cpu, "output");
  close(xg.grad(), x.grad(), "d input");
  close(rwg.grad(), rw.grad(), "d routing weight");
  close(w1g.grad(), w1.grad(), "d gate_up");
  close(w2g.grad(), w2.grad(), "d down");
  EXPECT_TRUE(w1g.grad()[1].eq(0).all().item<bool>());
}

TEST(MoEPermuteTest, PermuteThenUnpermuteIsTheIdentity) {
  torch::manual_seed(3);
  const int64_t tokens = 50, top_k = 4, experts = 6;
  auto indices = torch::stack({torch::randperm(experts).narrow(0, 0, top_k), torch::randperm(experts).narrow(0, 0, top_k)});
  indices = torch::randint(0, experts, {tokens, top_k});  // repeats allowed: the plan must not care
  auto weights = torch::full({tokens, top_k}, 1.0 / top_k, torch::kDouble);
  auto plan = moe::plan_dispatch(indices, weights, experts, -1, moe::DropPolicy::kProbs);
  auto x = torch::randn({tokens, 5}, torch::kDouble);
  auto sorted = moe::permute(x, plan);
  ASSERT_EQ(sorted.size(0), tokens * top_k);
  // Rows are grouped by expert, with the advertised counts and offsets.
  auto expected_counts = torch::bincount(indices.reshape({-1}), {}, experts);
  auto flat = indices.reshape({-1});
  for (int64_t e = 0; e < experts; ++e) {
    EXPECT_EQ(plan.counts[e], expected_counts[e].item<int64_t>());
    for (int64_t r = plan.offsets[e]; r < plan.offsets[e + 1]; ++r) {
      EXPECT_EQ(flat[plan.copy[r].item<int64_t>()].item<int64_t>(), e) << "row " << r;
    }
  }
  auto weighted = sorted * moe::row_weights(weights, plan).unsqueeze(1);
  expect_close(moe::unpermute(weighted, plan), x, 1e-15, "unpermute(permute(x))");
  EXPECT_EQ(plan.dropped, 0);
}

TEST(MoEPermuteTest, GradientsFlowToTokensOutputsAndWeights) {
  torch::manual_seed(4);
  const int64_t tokens = 12, top_k = 2, experts = 3;
  auto indices = torch::randint(0, experts, {tokens, top_k});
  auto weights = torch::rand({tokens, top_k}, torch::kDouble).requires_grad_(true);
  auto x = torch::randn({tokens, 4}, torch::kDouble).requires_grad_(true);
  auto plan = moe::plan_dispatch(indices, weights, experts, -1, moe::DropPolicy::kProbs);
  auto y = moe::permute(x, plan) * 3.0;  // a stand-in expert
  moe::unpermute(y * moe::row_weights(weights, plan).unsqueeze(1), plan).sum().backward();
  // d/dw[t,k] = sum of the copy's expert output = 3 * sum(x[t]); d/dx[t] = 3 * sum_k w[t,k].
  expect_close(weights.grad(), (3.0 * x.detach().sum(1, true)).expand({tokens, top_k}), 1e-12, "d/dweights");
  expect_close(x.grad(), (3.0 * weights.detach().sum(1, true)).expand({tokens, 4}), 1e-12, "d/dx");
}

TEST(MoEPermuteTest, CapacityKeepsTheHighestWeightsOrTheEarliestTokens) {
  // Four tokens all on expert 0 (top-1), capacity ceil(0.5 * 4 * 1 / 2) = 1.
  auto indices = torch::zeros({4, 1}, torch::kLong);
  auto weights = torch::tensor({0.2, 0.9, 0.5, 0.7}, torch::kDouble).view({4, 1});
  moe::MoEOptions o;
  o.num_experts = 2;
  o.top_k = 1;
  o.capacity_factor = 0.5;
  const int64_t capacity = moe::expert_capacity(o, 4);
  ASSERT_EQ(capacity, 1);
  auto by_probs = moe::plan_dispatch(indices, weights, 2, capacity, moe::DropPolicy::kProbs);
  auto by_position = moe::plan_dispatch(indices, weights, 2, capacity, moe::DropPolicy::kPosition);
  EXPECT_EQ(by_probs.dropped, 3);
  EXPECT_EQ(by_probs.token.item<int64_t>(), 1);
  EXPECT_EQ(by_position.token.item<int64_t>(), 0);
  EXPECT_EQ(by_probs.counts, (std::vector<int64_t>{1, 0}));
  EXPECT_EQ(by_probs.routed[0].item<int64_t>(), 4);  // load counts copies before drops
}

TEST(MoELayerTest, AuxiliaryLossesMatchTheirDefinitions) {
  auto o = base_options();
  o.seq_aux_loss = 0.01;
  o.batch_aux_loss = 0.02;
  o.z_loss = 0.001;
  Fixture f(o);
  const int64_t batch = 3, seq = 10;
  auto x = torch::randn({batch, seq, f.d}, torch::kDouble);
  f.layer->train();
  f.layer->forward(x);
  auto aux = f.layer->aux_loss();
  ASSERT_TRUE(aux.defined());

  // By hand, token by token.
  auto routing = f.layer->gate->forward(x.view({batch * seq, f.d}));
  const double E = static_cast<double>(o.num_experts), K = static_cast<double>(o.top_k);
  auto probs = routing.scores / routing.scores.sum(-1, true);
  double seq_loss = 0.0, z = 0.0;
  std::vector<double> batch_count(o.num_experts, 0.0), batch_prob(o.num_experts, 0.0);
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<double> count(o.num_experts, 0.0), prob(o.num_experts, 0.0);
    for (int64_t s = 0; s < seq; ++s) {
      const int64_t t = b * seq + s;
      for (int64_t k = 0; k < o.top_k; ++k) count[routing.indices[t][k].item<int64_t>()] += 1;
      for (int64_t e = 0; e < o.num_experts; ++e) prob[e] += probs[t][e].item<double>() / seq;
      z += std::pow(routing.logits[t].logsumexp(0).item<double>(), 2) / (batch * seq);
    }
    double term = 0.0;
    for (int64_t e = 0; e < o.num_experts; ++e) {
      term += (E / (K * seq)) * count[e] * prob[e];
      batch_count[e] += count[e];
      batch_prob[e] += prob[e] / batch;
    }
    seq_loss += term / batch;
  }
  double batch_loss = 0.0;
  for (int64_t e = 0; e < o.num_experts; ++e) batch_loss += (E / (K * batch * seq)) * batch_count[e] * batch_prob[e];
  const double expected = 0.01 * seq_loss + 0.02 * batch_loss + 0.001 * z;
  EXPECT_NEAR(aux.item<double>(), expected, 1e-12);

  auto stats = f.layer->end_step(false);
  EXPECT_NEAR(stats.seq_aux_loss, 0.01 * seq_loss, 1e-12);
  EXPECT_NEAR(stats.batch_aux_loss, 0.02 * batch_loss, 1e-12);
  EXPECT_NEAR(stats.z_loss, 0.001 * z, 1e-12);
  // The aux loss has a gradient path into the router.
  f.layer->zero_grad();
  f.layer->forward(x);
  f.layer->aux_loss().backward();
  EXPECT_GT(f.layer->gate->weight.grad().abs().max().item<double>(), 0.0);
}

TEST(MoELayerTest, BiasUpdateFollowsTheSignOfTheLoadGapAndNeverTouchesWeights) {
  auto o = base_options();
  o.bias_update_rate = 0.01;
  Fixture f(o);
  auto x = torch::randn({2, 24, f.d}, torch::kDouble);
  f.layer->train();
  auto bias_before = f.layer->gate->e_score_correction_bias.clone();
  f.layer->forward(x);
  auto routing = f.layer->gate->forward(x.view({-1, f.d}));
  auto load = torch::bincount(routing.indices.reshape({-1}), {}, o.num_experts).to(torch::kDouble);
  f.layer->forward(x);  // a second micro-batch of the same step: loads add up
  auto stats = f.layer->end_step(true);
  EXPECT_NEAR(stats.max_load_ratio, (load.max() / load.mean()).item<double>(), 1e-12);
  auto expected = bias_before + 0.01 * torch::sign(load.mean() - load);
  expect_close(f.layer->gate->e_score_correction_bias, expected, 1e-15, "bias after one step");

  // The bias changes the choice, never the weight of a chosen expert.
  {
    torch::NoGradGuard no_grad;
    f.layer->gate->e_score_correction_bias.fill_(0.0);
    f.layer->gate->e_score_correction_bias[2] = 5.0;
  }
  auto r = f.layer->gate->forward(x.view({-1, f.d}));
  auto chosen = r.scores.gather(1, r.indices);
  expect_close(r.weights, chosen / chosen.sum(-1, true), 1e-12, "weights ignore the bias");

  // Without the update flag (a skipped step) or with rate 0, the bias stays.
  auto held = f.layer->gate->e_score_correction_bias.clone();
  f.layer->forward(x);
  f.layer->end_step(false);
  EXPECT_TRUE(torch::equal(held, f.layer->gate->e_score_correction_bias));
}

TEST(MoELayerTest, Bfloat16AutocastStaysCloseToFloat32) {
  auto o = base_options();
  torch::manual_seed(11);
  moe::MoELayer layer(32, 24, o);
  for (auto& p : layer->parameters()) {
    torch::NoGradGuard no_grad;
    p.normal_(0.0, 0.2);
  }
  auto x = torch::randn({2, 16, 32});
  auto reference = layer->forward(x);
  torch::Tensor y;
  {
    precision::AutocastGuard autocast(precision::ComputeDtype::kBFloat16);
    y = layer->forward(x);
  }
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  const double rel = ((y.to(torch::kFloat) - reference).norm() / reference.norm()).item<double>();
  EXPECT_LT(rel, 0.03);
  y.to(torch::kFloat).sum().backward();
  EXPECT_EQ(layer->experts->as<moe::GroupedExpertsImpl>()->gate_up_proj.grad().scalar_type(), torch::kFloat);
}

// The same weights in Hugging Face transformers' DeepSeek-V3 MoE block (built from a
// config in Python, no download) must give the same output in float32.
TEST(MoEParityTest, MatchesTransformersDeepseekV3MoEBlock) {
  testing::TempDir dir;
  moe::MoEOptions o;
  o.num_experts = 16;
  o.top_k = 4;
  o.num_shared_experts = 2;
  o.expert_d_ff = 24;
  o.num_groups = 4;
  o.topk_group = 2;
  o.routed_scaling = 2.5;
  const int64_t d = 32;
  torch::manual_seed(21);
  moe::MoELayer layer(d, 96, o);
  model::NamedTensors tensors;
  {
    torch::NoGradGuard no_grad;
    for (auto& item : layer->named_parameters()) {
      item.value().normal_(0.0, 0.2);
      tensors.emplace_back(item.key(), item.value());
    }
    layer->gate->e_score_correction_bias.uniform_(0.0, 0.05);
    tensors.emplace_back("gate.e_score_correction_bias", layer->gate->e_score_correction_bias);
  }
  auto x = torch::randn({3, 20, d});
  tensors.emplace_back("x", x);
  model::save_safetensors(dir / "in.safetensors", tensors,
                          {{"hidden_size", std::to_string(d)},
                           {"moe_intermediate_size", std::to_string(o.expert_d_ff)},
                           {"n_routed_experts", std::to_string(o.num_experts)},
                           {"num_experts_per_tok", std::to_string(o.top_k)},
                           {"n_shared_experts", std::to_string(o.num_shared_experts)},
                           {"n_group", std::to_string(o.num_groups)},
                           {"topk_group", std::to_string(o.topk_group)},
                           {"norm_topk_prob", "true"},
                           {"routed_scaling_factor", "2.5"}});
  const std::string script = std::string(BRIGADE_SOURCE_DIR) + "/tests/moe/hf_deepseek_moe.py";
  auto run = testing::run_command(std::string(BRIGADE_VENV_PYTHON) + " " + script + " " +
                                  (dir / "in.safetensors").string() + " " + (dir / "out.safetensors").string());
  if (run.exit_code == 3) GTEST_SKIP() << "transformers not installed in .venv: " << run.output;
  ASSERT_EQ(run.exit_code, 0) << run.output;
  auto hf = model::load_safetensors(dir / "out.safetensors").tensors.at("y");

  layer->eval();
  torch::NoGradGuard no_grad;
  auto y = layer->forward(x);
  ASSERT_EQ(y.sizes(), hf.sizes());
  const double diff = (y - hf).abs().max().item<double>();
  EXPECT_LE(diff, 1e-5) << "max abs diff vs transformers";
  EXPECT_GT(y.abs().max().item<double>(), 0.1);  // a real signal, not two zero tensors
}

}  // namespace
}  // namespace brigade
