#include "moe/layer.h"

#include "core/error.h"
#include "core/recompute.h"
#include "moe/expert_parallel.h"
#include "precision/precision.h"

namespace brigade::moe {
namespace {

// f_i * P_i summed over experts, the DeepSeek-V3 balance loss before its coefficient:
// counts [groups, experts] of routed copies over `tokens` tokens per group, probs
// [groups, experts] mean normalised scores. Averaged over groups.
torch::Tensor balance_loss(const torch::Tensor& counts, const torch::Tensor& probs, int64_t tokens, int64_t top_k) {
  const double experts = static_cast<double>(counts.size(-1));
  auto f = counts.to(probs.scalar_type()) * (experts / static_cast<double>(top_k * tokens));
  return (f * probs).sum(-1).mean();
}

}  // namespace

MoELayerImpl::MoELayerImpl(int64_t d_model, int64_t dense_d_ff, MoEOptions options) : options_(options) {
  BRIGADE_ASSERT(options_.enabled(), "an MoE layer needs num_experts > 0");
  gate = register_module("gate", Router(d_model, options_));
  experts = register_module<ExpertsImpl>(
      "experts", std::make_shared<GroupedExpertsImpl>(options_.num_experts, d_model, options_.expert_size(dense_d_ff)));
  if (options_.num_shared_experts > 0) {
    shared_experts = register_module("shared_experts", SwiGLU(d_model, options_.shared_size(dense_d_ff)));
  }
}

void MoELayerImpl::set_expert_parallel(parallel::Communicator* ep, bool fp8_dispatch) {
  const int64_t experts_here = experts->num_experts();
  BRIGADE_CHECK(ep_ == nullptr && experts_here == options_.num_experts,
                "expert parallelism is already set on this MoE layer (it holds ", experts_here, " of ",
                options_.num_experts, " experts)");
  if (ep == nullptr || ep->size() == 1) return;
  const int64_t ranks = ep->size();
  BRIGADE_CHECK(options_.num_experts % ranks == 0, "model.moe.num_experts (", options_.num_experts,
                ") must be divisible by parallel.expert_parallel (", ranks, ")");
  const int64_t local = options_.num_experts / ranks;
  experts->keep_experts(ep->rank() * local, local);
  ep_ = ep;
  fp8_dispatch_ = fp8_dispatch;
}

torch::Tensor MoELayerImpl::forward(const torch::Tensor& x) {
  BRIGADE_ASSERT(x.dim() == 3, "MoE input must be [batch, seq, d_model], got ", x.sizes());
  const int64_t batch = x.size(0), seq = x.size(1), d = x.size(2);
  auto flat = x.reshape({batch * seq, d});
  Routing routing = gate(flat);
  const int64_t capacity = options_.dropless ? -1 : expert_capacity(options_, batch * seq);
  // Under expert parallelism the copies are sorted in the order dispatch() sends
  // them (moe/expert_parallel.h); the kept copies are the same, only the order of
  // the experts' runs differs. Loads go back to global expert order.
  const auto keys = ep_ ? expert_parallel_keys(routing.indices, options_.num_experts, ep_->size()) : routing.indices;
  DispatchPlan plan = plan_dispatch(keys, routing.weights, options_.num_experts, capacity, options_.drop_policy);
  if (ep_) plan.routed = global_expert_order(plan.routed, ep_->size());
  auto sorted = permute(flat, plan);                   // [rows, d] by global expert
  auto weights = row_weights(routing.weights, plan);  // [rows]
  torch::Tensor rows;
  if (ep_ == nullptr) {
    rows = experts->forward(sorted, weights, plan.counts);
  } else {
    // The experts cast their input to the compute dtype first: casting before the
    // all_to_all is the same value in half the bytes under BF16 autocast. FP8 experts
    // and FP8 dispatch quantize the FP32 values, so they get those.
    if (!fp8_dispatch_ && experts->fp8() == nullptr) sorted = sorted.to(precision::autocast_dtype_for(sorted));
    auto local = dispatch(*ep_, sorted, weights, plan.counts, fp8_dispatch_);
    rows = combine(*ep_, experts->forward(local.rows, local.weights, local.layout.local_counts), local.layout);
  }
  auto y = unpermute(rows, plan);
  if (shared_experts) y = y + shared_experts(flat);
  aux_loss_ = torch::Tensor();
  // Recorded once per forward: not again when activation checkpointing recomputes it.
  if (is_training() && !recomputing()) record(routing, plan, batch, seq);
  return y.view({batch, seq, d});
}

void MoELayerImpl::record(const Routing& r, const DispatchPlan& plan, int64_t batch, int64_t seq) {
  const auto& o = options_;
  const int64_t tokens = batch * seq;
  auto terms = torch::zeros({3}, r.scores.options());
  auto add = [&](int64_t slot, const torch::Tensor& loss) {
    aux_loss_ = aux_loss_.defined() ? aux_loss_ + loss : loss;
    terms[slot] = loss.detach();
  };
  if (o.seq_aux_loss > 0 || o.batch_aux_loss > 0) {
    // Scores normalised over all experts (sigmoid scores do not sum to one).
    auto probs = o.score_function == ScoreFunction::kSigmoid ? r.scores / r.scores.sum(-1, true) : r.scores;
    if (o.seq_aux_loss > 0) {
      auto counts = torch::zeros({batch, o.num_experts}, r.indices.options())
                        .scatter_add_(1, r.indices.view({batch, -1}), torch::ones_like(r.indices).view({batch, -1}));
      add(0, o.seq_aux_loss * balance_loss(counts, probs.view({batch, seq, -1}).mean(1), seq, o.top_k));
    }
    if (o.batch_aux_loss > 0) {
      add(1, o.batch_aux_loss * balance_loss(plan.routed.unsqueeze(0), probs.mean(0, true), tokens, o.top_k));
    }
  }
  if (o.z_loss > 0) add(2, o.z_loss * r.logits.logsumexp(-1).square().mean());

  load_ = load_.defined() ? load_ + plan.routed : plan.routed.clone();
  aux_sums_ = aux_sums_.defined() ? aux_sums_ + terms : terms;
  micro_batches_ += 1;
  copies_ += tokens * o.top_k;
  dropped_ += plan.dropped;
}

LayerStepStats MoELayerImpl::end_step(bool update_bias, parallel::Communicator* group) {
  const auto stats = step_stats(group);
  finish_step(update_bias);
  return stats_from(stats.cpu());
}

LayerStepStats MoELayerImpl::stats_from(const torch::Tensor& row) {
  const auto v = row.to(torch::kDouble).contiguous();
  const double* x = v.data_ptr<double>();
  return {x[0], x[1], x[2], x[3], x[4]};
}

torch::Tensor MoELayerImpl::step_stats(parallel::Communicator* group) {
  torch::NoGradGuard no_grad;
  const auto device = gate->e_score_correction_bias.device();
  if (micro_batches_ == 0) return torch::zeros({5}, torch::TensorOptions().dtype(torch::kDouble).device(device));
  // [experts] loads, then copies and drops (all int64), and the aux terms summed.
  // (Filled on the device: copying host values to a GPU would make the host wait.)
  const auto longs = torch::TensorOptions().dtype(torch::kLong).device(device);
  auto counts = torch::cat({load_, torch::full({1}, copies_, longs), torch::full({1}, dropped_, longs)});
  auto aux = aux_sums_.to(torch::kDouble);
  if (group != nullptr && group->size() > 1) {
    // Combined over the group's ranks, on its device (NCCL takes GPU tensors only),
    // so every rank sees the global statistics and keeps identical biases.
    const auto on = group->device();
    auto shared_counts = counts.to(on).contiguous();
    auto shared_aux = aux.to(on).contiguous();
    auto h1 = group->all_reduce(shared_counts, parallel::ReduceOp::kSum);
    auto h2 = group->all_reduce(shared_aux, parallel::ReduceOp::kSum);
    h1.wait();
    h2.wait();
    counts = shared_counts.to(device);
    aux = shared_aux.to(device) / static_cast<double>(group->size());
  }
  const int64_t experts = load_.size(0);
  step_load_ = counts.narrow(0, 0, experts).to(torch::kFloat);
  const auto totals = counts.narrow(0, experts, 2).to(torch::kDouble);
  const auto mean = step_load_.mean();
  return torch::cat({(step_load_.max() / mean).to(torch::kDouble).reshape({1}), (totals[1] / totals[0]).reshape({1}),
                     aux / static_cast<double>(micro_batches_)});
}

void MoELayerImpl::finish_step(bool update_bias) {
  torch::NoGradGuard no_grad;
  if (update_bias && options_.bias_update_rate > 0 && step_load_.defined()) {
    gate->e_score_correction_bias.add_(torch::sign(step_load_.mean() - step_load_), options_.bias_update_rate);
  }
  load_ = step_load_ = torch::Tensor();
  aux_sums_ = torch::Tensor();
  aux_loss_ = torch::Tensor();
  micro_batches_ = copies_ = dropped_ = 0;
}

}  // namespace brigade::moe
