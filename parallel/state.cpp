#include "parallel/state.h"

#include <utility>

#include <torch/torch.h>

#include "core/error.h"

namespace brigade::parallel {

std::vector<std::vector<size_t>> zero3_units(const std::vector<std::vector<size_t>>& blocks, size_t params) {
  std::vector<std::vector<size_t>> units;
  std::vector<bool> in_block(params, false);
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
    if (it->empty()) continue;  // another pipeline stage's block, or a frozen one
    for (size_t i : *it) in_block.at(i) = true;
    units.push_back(*it);
  }
  auto& rest = units.emplace_back();
  for (size_t i = 0; i < params; ++i) {
    if (!in_block[i]) rest.push_back(i);
  }
  if (rest.empty()) units.pop_back();
  return units;
}

ParallelState::ParallelState(ParallelStateOptions options) : options_(options) {
  const int64_t ep = options_.expert_parallel;
  BRIGADE_CHECK(size() == 1 || options_.data_parallel->device() == options_.device, "the trainer computes on ",
                options_.device.str(), " but its data-parallel group ", options_.data_parallel->describe(),
                " moves ", options_.data_parallel->device().str(), " tensors");
  BRIGADE_CHECK(ep == 1 || options_.num_experts > 0, "parallel.expert_parallel is ", ep,
                " but the model has no MoE layers (model.moe.num_experts is 0)");
  BRIGADE_CHECK(ep >= 1 && size() % ep == 0, "parallel.expert_parallel (", ep, ") must divide the number of ranks (",
                size(), ")");
  BRIGADE_CHECK(ep == 1 || options_.num_experts % ep == 0, "model.moe.num_experts (", options_.num_experts,
                ") must be divisible by parallel.expert_parallel (", ep, ")");
  if (ep > 1) {
    auto& world = *options_.data_parallel;
    ep_group_ = world.split(world.rank() / static_cast<int>(ep), world.rank(), "ep");
    expert_replicas_ = world.split(world.rank() % static_cast<int>(ep), world.rank(), "expert-dp");
  }
}

ParallelState::~ParallelState() = default;

void ParallelState::broadcast_from_main(const std::vector<torch::Tensor>& tensors) const {
  if (size() == 1) return;
  torch::NoGradGuard no_grad;
  for (const auto& t : tensors) {
    auto owned = t.contiguous();
    options_.data_parallel->broadcast(owned, 0).wait();
    if (!owned.is_same(t)) t.copy_(owned);
  }
}

void ParallelState::attach(NamedParams params, const std::vector<std::string>& expert_slices,
                           const std::vector<std::vector<size_t>>& blocks) {
  BRIGADE_ASSERT(params_.empty(), "ParallelState::attach called twice");
  params_ = std::move(params);
  expert_slices_ = {expert_slices.begin(), expert_slices.end()};
  NamedParams dense, experts;
  std::vector<size_t> dense_index, expert_index;
  std::vector<torch::Tensor> all;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& [name, p] = params_[i];
    const bool expert = expert_slices_.contains(name);
    (expert ? experts : dense).emplace_back(name, p);
    (expert ? expert_index : dense_index).push_back(i);
    all.push_back(p);
  }
  dense_index_ = dense_index;
  expert_index_ = expert_index;
  micro_grads_ = std::make_unique<MicroBatchGradients>(all);
  // A reducer folds each parameter's earlier micro-batches in just before the
  // parameter's gradient goes into its bucket.
  auto reducer_options = [&](const std::vector<size_t>& to_state, bool sharded) {
    auto* sums = micro_grads_.get();
    ReducerOptions options;
    options.bucket_bytes = options_.bucket_bytes;
    options.sharded = sharded;
    options.before_reduce = [sums, to_state](size_t i) { sums->finish(to_state[i]); };
    return options;
  };
  // ZeRO-3's buckets are its units: the blocks in the order backward finishes them
  // (last first), then one bucket of everything else. Alone, the same layout gives
  // the same gradient norm.
  std::vector<std::vector<size_t>> units;
  const int64_t stage = options_.zero_stage;
  block_unit_.assign(blocks.size(), -1);
  int64_t present = 0;
  for (size_t j = 0; j < blocks.size(); ++j) {
    if (!blocks[j].empty()) block_unit_[j] = present++;
  }
  if (stage == 3) {
    BRIGADE_CHECK(present > 0, "parallel.zero_stage=3 needs transformer blocks with trainable parameters");
    // In the dense parameters' index space (the reducer's): expert slices are not
    // replicas over the data-parallel group, so they stay whole on their EP rank (as
    // at stage 2) and only the blocks' dense parameters are sharded.
    std::vector<int64_t> dense_pos(params_.size(), -1);
    for (size_t k = 0; k < dense_index.size(); ++k) dense_pos[dense_index[k]] = static_cast<int64_t>(k);
    std::vector<std::vector<size_t>> dense_blocks(blocks.size());
    for (size_t j = 0; j < blocks.size(); ++j) {
      for (size_t i : blocks[j]) {
        if (dense_pos[i] >= 0) dense_blocks[j].push_back(static_cast<size_t>(dense_pos[i]));
      }
    }
    units = zero3_units(dense_blocks, dense_index.size());
  }
  std::vector<int64_t> numels;
  for (const auto& [name, p] : params_) numels.push_back(p.numel());
  if (size() > 1) {
    auto options = reducer_options(dense_index, stage >= 1);
    if (stage >= 2) {
      options.before_reduce = nullptr;  // every micro-batch is reduced: nothing stashed
      options.release = true;
      options.units = units;
      options.after_copy = [this](size_t bucket) {
        if (!zero3_) return;
        if (const int64_t u = zero3_->unit_of_bucket(bucket); u >= 0) zero3_->release(u);
      };
    }
    reducer_ = std::make_unique<GradientReducer>(dense, *options_.data_parallel, std::move(options));
  } else {
    // For the same gradient norm as a data-parallel run.
    layout_ = units.empty() ? make_bucket_layout(numels, options_.bucket_bytes, 1) : make_unit_layout(numels, units, 1);
  }
  if (stage == 3 && size() > 1) {
    std::vector<size_t> unit_buckets;  // unit u's bucket: blocks run backwards
    for (int64_t u = 0; u < present; ++u) unit_buckets.push_back(static_cast<size_t>(present - 1 - u));
    auto& world = *options_.data_parallel;
    zero3_ = std::make_unique<ShardedParameters>(reducer_->params(), reducer_->layout(), std::move(unit_buckets),
                                                 world.split(0, world.rank(), "zero3"));
  }
  if (!experts.empty() && expert_replicas_ && expert_replicas_->size() > 1) {
    expert_reducer_ = std::make_unique<GradientReducer>(experts, *expert_replicas_, reducer_options(expert_index, false));
  }
  if (!sharded()) return;
  for (const auto& seg : reducer_->shard_segments()) {
    shard_grads_.push_back(reducer_->shard_gradient(seg.bucket).narrow(0, seg.offset, seg.length));
  }
}

void ParallelState::sum_over_ranks(torch::Tensor& t) const {
  if (size() > 1) options_.data_parallel->all_reduce(t, ReduceOp::kSum).wait();
}

void ParallelState::begin_micro_batch(bool last) {
  const bool every = options_.zero_stage >= 2;  // ZeRO-2/3 reduce every micro-batch
  if (reducer_) reducer_->begin_backward(/*reduce=*/last || every);
  if (expert_reducer_) expert_reducer_->begin_backward(/*reduce=*/last);
}

void ParallelState::end_micro_batch(bool last) {
  if (reducer_ && options_.zero_stage >= 2) {
    const auto stats = reducer_->finish(last);
    micro_stats_.buckets += stats.buckets;
    micro_stats_.started_in_backward += stats.started_in_backward;
    micro_stats_.wait_seconds += stats.wait_seconds;
    // Expert slices are reduced once per step over their replicas, their
    // micro-batches added in the canonical order first.
    if (!last) micro_grads_->stash(expert_index_);
    return;
  }
  // Micro-batch gradients are added in the canonical order (parallel/ordered_sum.h).
  if (!last) micro_grads_->stash();
}

void ParallelState::end_micro_batch(bool last, const std::vector<size_t>& only) {
  BRIGADE_ASSERT(options_.zero_stage <= 1, "a partial micro-batch backward at ZeRO stage ", options_.zero_stage);
  if (!last) micro_grads_->stash(only);
}

ReduceStats ParallelState::finish_gradients() {
  micro_grads_->finish_all();  // what no reducer folded in
  if (!reducer_) return {};
  ReduceStats stats;
  if (options_.zero_stage >= 2) {
    if (zero3_) zero3_->release_all();  // units whose backward did not run
    stats = std::exchange(micro_stats_, ReduceStats{});
  } else {
    stats = reducer_->finish();
  }
  if (expert_reducer_) {
    const auto experts = expert_reducer_->finish();
    stats.buckets += experts.buckets;
    stats.started_in_backward += experts.started_in_backward;
    stats.wait_seconds += experts.wait_seconds;
  }
  return stats;
}

torch::Tensor ParallelState::grad_square_norm() const {
  torch::NoGradGuard no_grad;
  // The norm is summed in a fixed order over fixed blocks (parallel/ordered_sum.h):
  // the same bits for one process, any number of data-parallel ranks, and ZeRO-1.
  if (!reducer_) {
    std::vector<torch::Tensor> own;
    for (const auto& [name, p] : params_) own.push_back(p.grad());
    return square_norm(layout_, own).to(options_.device);
  }
  auto total = reducer_->square_norm();
  if (!ep_group_) return total;
  // Every rank holds the same summed dense gradients and its own experts'.
  auto experts = torch::zeros({1}, total.options());
  for (const auto& [name, p] : params_) {
    if (p.grad().defined() && expert_slices_.contains(name)) experts += p.grad().to(torch::kDouble).square().sum();
  }
  ep_group_->all_reduce(experts, ReduceOp::kSum).wait();
  return total + experts;
}

ParallelState::OptimizerPieces ParallelState::optimizer_pieces() const {
  OptimizerPieces out;
  if (!sharded()) {
    // An expert-parallel slice is a run of elements of the whole parameter.
    for (size_t i = 0; i < params_.size(); ++i) {
      const auto& [name, p] = params_[i];
      out.pieces.emplace_back(name, p);
      out.begins.push_back(expert_slices_.contains(name) ? ep_rank() * p.numel() : 0);
      out.param.push_back(i);
    }
    return out;
  }
  // ZeRO: flat views of the elements this rank owns; their summed gradients are
  // views into the reducer's shards (the reducer holds the dense parameters).
  // ZeRO-3's blocks: views into the units' kept shards instead.
  for (const auto& seg : reducer_->shard_segments()) {
    const auto& [name, p] = reducer_->params()[seg.param];
    const int64_t unit = zero3_ ? zero3_->unit_of_bucket(seg.bucket) : -1;
    if (unit >= 0) out.pieces.emplace_back(name, zero3_->shard(unit).narrow(0, seg.offset, seg.length));
    else out.pieces.emplace_back(name, p.detach().view({-1}).narrow(0, seg.begin, seg.length));
    out.begins.push_back(seg.begin);
    out.param.push_back(dense_index_[seg.param]);
  }
  // Expert-parallel slices stay whole on their rank (ZeRO-1 shards the dense state).
  for (size_t i : expert_index_) {
    const auto& [name, p] = params_[i];
    out.pieces.emplace_back(name, p);
    out.begins.push_back(ep_rank() * p.numel());
    out.param.push_back(i);
  }
  return out;
}

std::vector<torch::Tensor> ParallelState::optimizer_gradients() const {
  if (sharded()) {
    auto grads = shard_grads_;
    for (size_t i : expert_index_) grads.push_back(params_[i].second.grad());
    return grads;
  }
  std::vector<torch::Tensor> grads;
  for (const auto& [name, p] : params_) grads.push_back(p.grad());
  return grads;
}

void ParallelState::after_update() {
  if (!sharded()) return;
  if (!zero3_) return reducer_->gather_parameters();
  reducer_->gather_parameters([this](size_t bucket) { return zero3_->unit_of_bucket(bucket) < 0; });
}

void ParallelState::gather_weights() {
  if (zero3_) zero3_->gather_all();
}

void ParallelState::release_weights(bool changed) {
  if (!zero3_ || !zero3_->whole()) return;
  if (changed) zero3_->refresh_shards();  // the parameters were overwritten while gathered
  zero3_->release_all();
}

std::vector<int64_t> ParallelState::full_shape(const std::string& name, const torch::Tensor& tensor) const {
  auto shape = tensor.sizes().vec();
  if (expert_slices_.contains(name)) shape[0] *= ep_group_->size();
  return shape;
}

torch::Tensor ParallelState::gather_experts(const torch::Tensor& slice) const {
  auto shape = slice.sizes().vec();
  shape[0] *= ep_group_->size();
  auto full = torch::empty(shape, slice.options());
  ep_group_->all_gather(slice.contiguous(), full).wait();
  return full;
}

torch::Tensor ParallelState::expert_slice(const torch::Tensor& whole) const {
  const int64_t rows = whole.size(0) / ep_group_->size();
  return whole.narrow(0, ep_rank() * rows, rows);
}

std::vector<ShardRanges> ParallelState::shard_ranges() const {
  BRIGADE_ASSERT(sharded(), "shard_ranges() without ZeRO");
  std::vector<ShardRanges> out;
  for (int r = 0; r < size(); ++r) {
    ShardRanges ranges;
    for (const auto& seg : reducer_->shard_segments(r)) {
      ranges[reducer_->params()[seg.param].first] = {seg.begin, seg.begin + seg.length};
    }
    // Expert slices: every EP group holds the same experts; the first one's files
    // list them (rank r < EP holds slice r of each expert tensor).
    const int ep = ep_group_ ? ep_group_->size() : 1;
    if (r < ep) {
      for (size_t i : expert_index_) {
        const auto& [name, p] = params_[i];
        ranges[name] = {r * p.numel(), (r + 1) * p.numel()};
      }
    }
    out.push_back(std::move(ranges));
  }
  return out;
}

void ParallelState::barrier() const {
  if (size() > 1) options_.data_parallel->barrier().wait();
}

}  // namespace brigade::parallel
