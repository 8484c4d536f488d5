// Expert parallelism: an MoE layer whose experts are spread over an EP group gives
// the outputs, input gradients and parameter gradients of the same layer with every
// expert on one rank (EP = 1) over the same tokens: the group of the whole world
// (2 or 4 ranks) and groups of 2 split from it; uneven token counts, a rank with no
// tokens, ranks that send nothing to some rank, a rank that receives nothing, an
// expert nobody routes to, capacity drops, and the FP8 dispatch.
// Runs under mpirun (CTest: 2 and 4 ranks); skips when started alone.
#include <gtest/gtest.h>

#include <chrono>
#include <string>

#include <torch/torch.h>

#include "model/transformer.h"
#include "moe/moe.h"
#include "parallel/communicator.h"
#include "precision/fp8_recipe.h"
#include "precision/quantize.h"
#include "tests/mpi/mpi_world.h"
#include "tests/testing.h"

namespace brigade {
namespace {

using testing::mpi_world;

// Ranks {0, 1}, {2, 3}: EP = 2 inside a larger world (the whole world at 2 ranks).
// Made on first use, which every rank reaches in the same test.
parallel::Communicator* pairs() {
  auto& w = *mpi_world();
  static std::unique_ptr<parallel::Communicator> p = w.split(w.rank() / 2, w.rank(), "ep");
  return p.get();
}

#define REQUIRE_MPI_WORLD(var)                  \
  parallel::Communicator* var = mpi_world();        \
  if (var == nullptr) GTEST_SKIP() << "multi-rank test: run under mpirun"

constexpr int64_t kModel = 16, kFf = 6;

moe::MoEOptions options(int64_t experts) {
  moe::MoEOptions o;
  o.num_experts = experts;
  o.top_k = 3;
  o.num_shared_experts = 1;
  o.expert_d_ff = kFf;
  return o;
}

// One setting of the equivalence check. The selection biases steer routing per rank.
struct Case {
  int64_t experts = 8;
  bool dropless = true;
  bool fp8_dispatch = false;
  bool last_rank_has_no_tokens = false;
  bool rank0_skips_last_ep_rank = false;  // rank 0 sends nothing to the last EP rank
  bool nobody_feeds_last_ep_rank = false; // the last EP rank receives nothing
  bool expert1_idle = false;              // no rank routes to expert 1
  bool fp8_experts = false;               // blockwise FP8 expert GEMMs on both sides
};

// ||a - b|| / ||b|| (0 for two empty tensors); an undefined gradient counts as zeros.
double relative(torch::Tensor a, torch::Tensor b) {
  if (!a.defined()) a = torch::zeros_like(b);
  if (!b.defined()) b = torch::zeros_like(a);
  EXPECT_EQ(a.sizes(), b.sizes());
  if (a.sizes() != b.sizes()) return 1.0;
  const double diff = (a.to(torch::kDouble) - b.to(torch::kDouble)).norm().item<double>();
  const double norm = b.to(torch::kDouble).norm().item<double>();
  return norm == 0.0 ? diff : diff / norm;
}

torch::Tensor grad_of(const torch::Tensor& t) { return t.grad().defined() ? t.grad() : torch::zeros_like(t); }

moe::GroupedExpertsImpl& experts_of(moe::MoELayer& layer) { return *layer->experts->as<moe::GroupedExpertsImpl>(); }

// The reference's y for the FP8 dispatch: the experts see the rows as the dispatch
// delivers them (1x128 E4M3 tiles of each token, dequantized), the router and the
// shared experts the raw ones; the input's gradient passes the quantizer straight.
torch::Tensor fp8_dispatch_reference(moe::MoELayer& layer, const torch::Tensor& x) {
  auto flat = x.reshape({-1, x.size(2)});
  precision::QuantizeOptions qo;
  qo.mode = precision::ScalingMode::kTile1x128;
  auto xq = flat + (precision::fake_quantize(flat.detach(), qo) - flat).detach();
  auto routing = layer->gate(flat);
  auto plan = moe::plan_dispatch(routing.indices, routing.weights, layer->options().num_experts, -1,
                                 layer->options().drop_policy);
  auto rows = layer->experts->forward(moe::permute(xq, plan), moe::row_weights(routing.weights, plan), plan.counts);
  return (moe::unpermute(rows, plan) + layer->shared_experts(flat)).view(x.sizes());
}

// Runs the layer with every expert here and with the experts spread over `ep` on
// this rank's tokens, and compares outputs and gradients. Collective over the
// world: no ASSERT may leave a rank behind.
void check_matches_one_rank(parallel::Communicator& ep, const Case& c) {
  parallel::Communicator& w = *mpi_world();
  at::set_num_threads(1);
  auto o = options(c.experts);
  o.dropless = c.dropless;
  o.capacity_factor = 1.0;
  torch::manual_seed(11);  // the same weights on every rank
  moe::MoELayer reference(kModel, kFf, o);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : reference->parameters()) p.normal_(0.0, 0.3);
    auto bias = reference->gate->e_score_correction_bias;
    bias.normal_(0.0, 0.05);
    const int64_t local = c.experts / ep.size(), last = (ep.size() - 1) * local;
    if (c.expert1_idle) bias[1] = -100.0;
    if (c.nobody_feeds_last_ep_rank || (c.rank0_skips_last_ep_rank && w.rank() == 0)) {
      bias.narrow(0, last, local).fill_(-100.0);
    }
  }
  moe::MoELayer parallel(kModel, kFf, o);
  {
    torch::NoGradGuard no_grad;
    auto from = reference->named_parameters();
    for (auto& p : parallel->named_parameters()) p.value().copy_(from[p.key()]);
    parallel->gate->e_score_correction_bias.copy_(reference->gate->e_score_correction_bias);
  }
  if (c.fp8_experts) {
    precision::Fp8Options fp8;
    fp8.recipe = precision::Fp8Recipe::kBlockwise;
    reference->experts->enable_fp8(fp8, "experts");
    parallel->experts->enable_fp8(fp8, "experts");
  }
  parallel->set_expert_parallel(&ep, c.fp8_dispatch);

  // Uneven token counts: 5, 12, 19, ... (none on the last rank when asked).
  torch::manual_seed(100 + w.rank());
  const bool empty = c.last_rank_has_no_tokens && w.rank() == w.size() - 1;
  const int64_t tokens = empty ? 0 : 5 + 7 * w.rank();
  auto x = torch::randn({1, tokens, kModel});
  auto probe = torch::randn({1, tokens, kModel});
  auto x_ref = x.clone().requires_grad_(true);
  auto x_ep = x.clone().requires_grad_(true);

  auto y_ref = c.fp8_dispatch ? fp8_dispatch_reference(reference, x_ref) : reference(x_ref);
  (y_ref * probe).sum().backward();
  auto y_ep = parallel(x_ep);
  (y_ep * probe).sum().backward();

  const std::string where = "rank " + std::to_string(w.rank()) + " of ep " + std::to_string(ep.size());
  const double tol = 1e-6;
  EXPECT_LE(relative(y_ep, y_ref), tol) << "output, " << where;
  EXPECT_LE(relative(grad_of(x_ep), grad_of(x_ref)), tol) << "input gradient, " << where;
  // Router and shared experts see this rank's tokens only, as without EP.
  EXPECT_LE(relative(grad_of(parallel->gate->weight), grad_of(reference->gate->weight)), tol) << "router, " << where;
  auto shared = reference->shared_experts->named_parameters();
  for (auto& p : parallel->shared_experts->named_parameters()) {
    EXPECT_LE(relative(grad_of(p.value()), grad_of(shared[p.key()])), tol) << p.key() << ", " << where;
  }
  // An expert's gradient on its owner: the sum over the group of every rank's
  // gradient of that expert without EP.
  const int64_t local = c.experts / ep.size();
  auto& ex_ref = experts_of(reference);
  auto& ex_ep = experts_of(parallel);
  EXPECT_EQ(ex_ep.gate_up_proj.size(0), local) << where;
  for (auto [mine, full, name] : {std::tuple{ex_ep.gate_up_proj, ex_ref.gate_up_proj, "gate_up_proj"},
                                  std::tuple{ex_ep.down_proj, ex_ref.down_proj, "down_proj"}}) {
    EXPECT_TRUE(torch::equal(mine, full.narrow(0, ep.rank() * local, local))) << name << " values, " << where;
    auto summed = grad_of(full).clone();
    ep.all_reduce(summed, parallel::ReduceOp::kSum).wait();
    // Blockwise FP8 quantizes the weight-gradient GEMM's rows in 128x1 tiles per
    // expert, which now span every source's rows: other scales, close values.
    const double weight_tol = c.fp8_experts ? 5e-2 : tol;
    EXPECT_LE(relative(grad_of(mine), summed.narrow(0, ep.rank() * local, local)), weight_tol)
        << name << ", " << where;
  }
  // The load statistics stay those of the local router (global expert indices);
  // the FP8 reference is assembled from the layer's parts and records none.
  if (c.fp8_dispatch) return;
  auto stats_ref = reference->end_step(false, &w);
  auto stats_ep = parallel->end_step(false, &w);
  EXPECT_DOUBLE_EQ(stats_ep.max_load_ratio, stats_ref.max_load_ratio) << where;
  EXPECT_DOUBLE_EQ(stats_ep.dropped_fraction, stats_ref.dropped_fraction) << where;
}

TEST(MpiExpertParallel, WholeWorldMatchesOneRank) {
  REQUIRE_MPI_WORLD(w);
  check_matches_one_rank(*w, {});
}

TEST(MpiExpertParallel, PairsInsideTheWorldMatchOneRank) {
  REQUIRE_MPI_WORLD(w);
  check_matches_one_rank(*pairs(), {});
}

TEST(MpiExpertParallel, RankWithoutTokensAndRankSendingNothingToAnother) {
  REQUIRE_MPI_WORLD(w);
  Case c;
  c.last_rank_has_no_tokens = true;
  c.rank0_skips_last_ep_rank = true;
  c.expert1_idle = true;
  check_matches_one_rank(*w, c);
  check_matches_one_rank(*pairs(), c);
}

TEST(MpiExpertParallel, RankReceivingNothing) {
  REQUIRE_MPI_WORLD(w);
  Case c;
  c.nobody_feeds_last_ep_rank = true;
  check_matches_one_rank(*w, c);
  check_matches_one_rank(*pairs(), c);
}

TEST(MpiExpertParallel, CapacityDropsMatchOneRank) {
  REQUIRE_MPI_WORLD(w);
  Case c;
  c.dropless = false;
  c.experts = 16;
  check_matches_one_rank(*w, c);
}

TEST(MpiExpertParallel, Fp8DispatchMatchesOneRankOnQuantizedRows) {
  REQUIRE_MPI_WORLD(w);
  Case c;
  c.fp8_dispatch = true;
  check_matches_one_rank(*w, c);
  c.last_rank_has_no_tokens = true;
  c.rank0_skips_last_ep_rank = true;
  check_matches_one_rank(*pairs(), c);
}

// FP8 expert GEMMs on the local counts: forward operands are quantized per row
// (1x128) and per expert (128x128), so outputs and input gradients match.
TEST(MpiExpertParallel, Fp8ExpertsMatchOneRank) {
  REQUIRE_MPI_WORLD(w);
  Case c;
  c.fp8_experts = true;
  check_matches_one_rank(*w, c);
  c.fp8_dispatch = true;
  check_matches_one_rank(*pairs(), c);
}

TEST(MpiExpertParallel, ExpertsMustSplitEvenly) {
  REQUIRE_MPI_WORLD(w);
  const int64_t experts = 2 * w->size() + 1;
  moe::MoELayer layer(kModel, kFf, options(experts));
  EXPECT_BRIGADE_ERROR(layer->set_expert_parallel(w, false),
                       "model.moe.num_experts (" + std::to_string(experts) +
                           ") must be divisible by parallel.expert_parallel (" + std::to_string(w->size()) + ")");
  EXPECT_EQ(experts_of(layer).gate_up_proj.size(0), experts);  // untouched
  // Once sharded, a second call is an error, not a second slicing.
  moe::MoELayer sharded(kModel, kFf, options(4 * w->size()));
  sharded->set_expert_parallel(w, false);
  EXPECT_BRIGADE_ERROR(sharded->set_expert_parallel(w, false), "already set");
}

// The whole model: same logits and loss gradient as one rank, the sharded names.
TEST(MpiExpertParallel, TransformerMatchesOneRank) {
  REQUIRE_MPI_WORLD(w);
  at::set_num_threads(1);
  model::TransformerOptions o;
  o.vocab_size = 64;
  o.d_model = 32;
  o.n_layers = 3;
  o.n_heads = 4;
  o.d_ff = 64;
  o.max_seq_len = 32;
  o.moe = options(4 * w->size());
  o.moe.first_k_dense = 1;
  torch::manual_seed(5);
  model::Transformer reference(o);
  torch::manual_seed(5);
  model::Transformer parallel(o);
  EXPECT_TRUE(parallel->expert_parallel_parameters().empty());
  const auto count = parallel->parameter_count();
  parallel->set_expert_parallel(w, false);
  EXPECT_EQ(parallel->parameter_count().total, count.total);
  EXPECT_EQ(parallel->parameter_count().activated, count.activated);
  const std::vector<std::string> names = {"layers.1.mlp.experts.gate_up_proj", "layers.1.mlp.experts.down_proj",
                                          "layers.2.mlp.experts.gate_up_proj", "layers.2.mlp.experts.down_proj"};
  auto sharded = parallel->expert_parallel_parameters();
  std::sort(sharded.begin(), sharded.end());
  auto expected = names;
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(sharded, expected);
  for (const auto& [name, t] : parallel->state_dict()) {
    if (std::find(names.begin(), names.end(), name) != names.end()) EXPECT_EQ(t.size(0), 4) << name;
  }

  torch::manual_seed(200 + w->rank());
  auto tokens = torch::randint(o.vocab_size, {2, 3 + 4 * w->rank()}, torch::kLong);
  auto loss = [&](model::Transformer& m) {
    auto logits = m(tokens);
    return torch::nn::functional::cross_entropy(logits.view({-1, o.vocab_size}), tokens.view({-1}));
  };
  auto l_ref = loss(reference);
  l_ref.backward();
  auto l_ep = loss(parallel);
  l_ep.backward();
  EXPECT_NEAR(l_ep.item<double>(), l_ref.item<double>(), 1e-6 * std::abs(l_ref.item<double>()));
  EXPECT_LE(relative(grad_of(parallel->embed_tokens->weight), grad_of(reference->embed_tokens->weight)), 1e-5)
      << "rank " << w->rank();
}

}  // namespace
}  // namespace brigade
