#include "parallel/state.h"

#include <algorithm>
#include <iterator>
#include <numeric>
#include <utility>

#include <torch/torch.h>

#include "core/error.h"

namespace brigade::parallel {

std::vector<size_t> UnitLayout::order() const {
  if (!backward_order.empty()) return backward_order;
  std::vector<size_t> out(members.size());
  std::iota(out.rbegin(), out.rend(), size_t{0});
  return out;
}

BucketLayout ReduceGroup::layout(const std::vector<int64_t>& group_numels, int64_t bucket_bytes, int ranks) const {
  return units.empty() ? make_bucket_layout(group_numels, bucket_bytes, ranks) : make_unit_layout(group_numels, units, ranks);
}

std::vector<ReduceGroup> reduce_groups(size_t params, const std::vector<std::vector<size_t>>& chunks,
                                       const UnitLayout& units, int64_t zero_stage) {
  // ZeRO-0/1 reduce once per step, when every chunk's backwards are done: one group.
  std::vector<std::vector<size_t>> members;
  if (zero_stage >= 2 && chunks.size() > 1) {
    members = chunks;
    for (auto& m : members) std::sort(m.begin(), m.end());
  } else {
    members.emplace_back(params);
    std::iota(members.back().begin(), members.back().end(), size_t{0});
  }
  std::vector<int64_t> group_of(params, -1), position(params, -1);
  for (size_t g = 0; g < members.size(); ++g) {
    for (size_t k = 0; k < members[g].size(); ++k) {
      BRIGADE_ASSERT(group_of.at(members[g][k]) < 0, "parameter ", members[g][k], " in two chunks");
      group_of[members[g][k]] = static_cast<int64_t>(g);
      position[members[g][k]] = static_cast<int64_t>(k);
    }
  }
  std::vector<ReduceGroup> groups(members.size());
  for (size_t g = 0; g < members.size(); ++g) {
    BRIGADE_ASSERT(!members[g].empty(), "reduce group ", g, " has no parameters");
    groups[g].params = members[g];
  }
  if (zero_stage != 3) return groups;
  std::vector<bool> in_unit(params, false);
  for (size_t j : units.order()) {
    if (units.members.at(j).empty()) continue;  // another pipeline stage's unit, or a frozen one
    auto& group = groups[static_cast<size_t>(group_of.at(units.members[j].front()))];
    auto& bucket = group.units.emplace_back();
    for (size_t i : units.members[j]) {
      in_unit.at(i) = true;
      bucket.push_back(static_cast<size_t>(position[i]));
    }
    group.unit_numbers.push_back(j);
  }
  for (auto& group : groups) {
    std::vector<size_t> rest;
    for (size_t k = 0; k < group.params.size(); ++k) {
      if (!in_unit[group.params[k]]) rest.push_back(k);
    }
    if (!rest.empty()) group.units.push_back(std::move(rest));
  }
  return groups;
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

void ParallelState::attach(NamedParams params, const std::vector<std::string>& expert_slices, const UnitLayout& units,
                           const std::vector<std::vector<size_t>>& chunks) {
  BRIGADE_ASSERT(params_.empty(), "ParallelState::attach called twice");
  params_ = std::move(params);
  expert_slices_ = {expert_slices.begin(), expert_slices.end()};
  chunks_ = chunks;
  NamedParams experts;
  std::vector<torch::Tensor> all;
  std::vector<int64_t> dense_pos(params_.size(), -1);
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& [name, p] = params_[i];
    const bool expert = expert_slices_.contains(name);
    if (expert) {
      experts.emplace_back(name, p);
      expert_index_.push_back(i);
    } else {
      dense_pos[i] = static_cast<int64_t>(dense_index_.size());
      dense_index_.push_back(i);
    }
    all.push_back(p);
  }
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
  // The reduce groups, in the dense parameters' index space: expert slices are not
  // replicas over the data-parallel group, so they stay whole on their EP rank (as
  // at stage 2) and only dense parameters are ZeRO-3's units. Alone, the same
  // layout gives the same gradient norm.
  const int64_t stage = options_.zero_stage;
  auto to_dense = [&](const std::vector<std::vector<size_t>>& lists) {
    std::vector<std::vector<size_t>> out(lists.size());
    for (size_t j = 0; j < lists.size(); ++j) {
      for (size_t i : lists[j]) {
        if (dense_pos.at(i) >= 0) out[j].push_back(static_cast<size_t>(dense_pos[i]));
      }
    }
    return out;
  };
  const UnitLayout dense_units{to_dense(units.members), units.backward_order};
  const auto groups = reduce_groups(dense_index_.size(), to_dense(chunks), dense_units, stage);
  const auto& members = dense_units.members;
  BRIGADE_CHECK(stage != 3 || std::any_of(members.begin(), members.end(), [](const auto& m) { return !m.empty(); }),
                "parallel.zero_stage=3 needs units (transformer blocks) with trainable parameters");
  // Number j -> (group, unit): a group's units numbered in BlockHooks order; bucket
  // b of the group is its b-th unit in backward order.
  block_unit_.assign(members.size(), {-1, -1});
  std::vector<std::vector<size_t>> unit_buckets(groups.size());  // by group: unit -> bucket
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& numbers = groups[g].unit_numbers;
    std::vector<size_t> buckets(numbers.size());
    std::iota(buckets.begin(), buckets.end(), size_t{0});
    std::sort(buckets.begin(), buckets.end(), [&](size_t a, size_t b) { return numbers[a] < numbers[b]; });
    for (size_t b : buckets) {
      block_unit_[numbers[b]] = {static_cast<int64_t>(g), static_cast<int64_t>(unit_buckets[g].size())};
      unit_buckets[g].push_back(b);
    }
  }
  std::vector<int64_t> numels;
  for (const auto& [name, p] : params_) numels.push_back(p.numel());
  if (size() == 1) {
    // For the same gradient norm as a data-parallel run (alone, chunks reduce nothing:
    // one group of every parameter).
    layout_ = reduce_groups(dense_index_.size(), {}, dense_units, stage).front().layout(numels, options_.bucket_bytes, 1);
  }
  for (size_t g = 0; g < groups.size() && size() > 1; ++g) {
    auto& index = group_index_.emplace_back();
    NamedParams group_params;
    for (size_t k : groups[g].params) {
      index.push_back(dense_index_[k]);
      group_params.push_back(params_[dense_index_[k]]);
    }
    auto options = reducer_options(index, stage >= 1);
    if (stage >= 2) {
      options.before_reduce = nullptr;  // every micro-batch is reduced: nothing stashed
      options.release = true;
      options.units = groups[g].units;
      options.after_copy = [this, g](size_t bucket) {
        if (g >= zero3_.size() || !zero3_[g]) return;
        if (const int64_t u = zero3_[g]->unit_of_bucket(bucket); u >= 0) zero3_[g]->release(u);
      };
    }
    reducers_.push_back(std::make_unique<GradientReducer>(group_params, *options_.data_parallel, std::move(options)));
  }
  if (stage == 3 && size() > 1) {
    auto& world = *options_.data_parallel;
    // One gather communicator for every group: a rank's chunks run one at a time.
    std::shared_ptr<Communicator> gathers = world.split(0, world.rank(), "zero3");
    for (size_t g = 0; g < groups.size(); ++g) {
      if (unit_buckets[g].empty()) {
        zero3_.emplace_back();
        continue;
      }
      zero3_.push_back(std::make_unique<ShardedParameters>(reducers_[g]->params(), reducers_[g]->layout(),
                                                           std::move(unit_buckets[g]), gathers));
    }
  }
  if (!experts.empty() && expert_replicas_ && expert_replicas_->size() > 1) {
    expert_reducer_ = std::make_unique<GradientReducer>(experts, *expert_replicas_, reducer_options(expert_index_, false));
  }
  if (!sharded()) return;
  for (const auto& reducer : reducers_) {
    for (const auto& seg : reducer->shard_segments()) {
      shard_grads_.push_back(reducer->shard_gradient(seg.bucket).narrow(0, seg.offset, seg.length));
    }
  }
}

ParallelState::BlockUnit ParallelState::unit_of_block(int64_t block) const {
  if (block < 0 || block >= static_cast<int64_t>(block_unit_.size())) return {};
  const auto [group, unit] = block_unit_[static_cast<size_t>(block)];
  if (group < 0 || static_cast<size_t>(group) >= zero3_.size() || !zero3_[static_cast<size_t>(group)]) return {};
  return {zero3_[static_cast<size_t>(group)].get(), unit};
}

void ParallelState::sum_over_ranks(torch::Tensor& t) const {
  if (size() > 1) options_.data_parallel->all_reduce(t, ReduceOp::kSum).wait();
}

void ParallelState::begin_micro_batch(bool last) {
  last_begun_ = last_begun_ || last;
  const bool every = options_.zero_stage >= 2;  // ZeRO-2/3 reduce every micro-batch
  for (auto& reducer : reducers_) reducer->begin_backward(/*reduce=*/last || every);
  if (expert_reducer_) expert_reducer_->begin_backward(/*reduce=*/last);
}

void ParallelState::add_micro_stats(const ReduceStats& stats) {
  micro_stats_.buckets += stats.buckets;
  micro_stats_.started_in_backward += stats.started_in_backward;
  micro_stats_.wait_seconds += stats.wait_seconds;
}

void ParallelState::end_micro_batch(bool last) {
  if (!reducers_.empty() && options_.zero_stage >= 2) {
    for (auto& reducer : reducers_) add_micro_stats(reducer->finish(last));
    // Expert slices are reduced once per step over their replicas, their
    // micro-batches added in the canonical order first.
    if (!last) micro_grads_->stash(expert_index_);
    return;
  }
  // Micro-batch gradients are added in the canonical order (parallel/ordered_sum.h).
  if (!last) micro_grads_->stash();
}

GradientReducer* ParallelState::chunk_reducer(size_t chunk) const {
  if (reducers_.empty()) return nullptr;
  return reducers_.size() == 1 ? reducers_.front().get() : reducers_.at(chunk).get();
}

void ParallelState::begin_chunk_backward(size_t chunk, bool last) {
  BRIGADE_ASSERT(chunk < chunks_.size(), "no chunk ", chunk, " attached");
  last_begun_ = last_begun_ || last;
  if (options_.zero_stage >= 2) {
    if (auto* reducer = chunk_reducer(chunk)) reducer->begin_backward(/*reduce=*/true);
  } else {
    // One reducer of every chunk, reducing during the rank's last backward (the
    // other chunks' buckets start when it finishes).
    if (auto* reducer = chunk_reducer(chunk)) reducer->begin_backward(/*reduce=*/last);
  }
  if (expert_reducer_) expert_reducer_->begin_backward(/*reduce=*/last);
}

void ParallelState::end_chunk_backward(size_t chunk, bool last, bool chunk_last, const std::vector<size_t>& deferred) {
  BRIGADE_ASSERT(chunk < chunks_.size(), "no chunk ", chunk, " attached");
  auto own = chunks_[chunk];
  if (!deferred.empty()) {
    BRIGADE_ASSERT(options_.zero_stage <= 1 && !last, "a split backward at ZeRO stage ", options_.zero_stage,
                   last ? " as the step's last" : "");
    std::vector<size_t> sorted = deferred, rest;
    std::sort(sorted.begin(), sorted.end());
    std::set_difference(own.begin(), own.end(), sorted.begin(), sorted.end(), std::back_inserter(rest));
    own = std::move(rest);
  }
  if (options_.zero_stage >= 2 && !reducers_.empty()) {
    add_micro_stats(chunk_reducer(chunk)->finish(chunk_last));
    if (last) return;
    std::vector<size_t> experts;  // the chunk's, stashed as in end_micro_batch
    std::set_intersection(own.begin(), own.end(), expert_index_.begin(), expert_index_.end(),
                          std::back_inserter(experts));
    micro_grads_->stash(experts);
    return;
  }
  if (!last) micro_grads_->stash(own);
}

void ParallelState::end_deferred(const std::vector<size_t>& params) {
  BRIGADE_ASSERT(options_.zero_stage <= 1, "a W step at ZeRO stage ", options_.zero_stage);
  micro_grads_->stash(params);
}

ReduceStats ParallelState::finish_gradients() {
  micro_grads_->finish_all();  // what no reducer folded in
  const bool begun = std::exchange(last_begun_, false);
  if (!begun && options_.zero_stage <= 1) {
    // The step ended with W steps: every bucket is reduced now.
    for (auto& reducer : reducers_) reducer->begin_backward(/*reduce=*/true);
    if (expert_reducer_) expert_reducer_->begin_backward(/*reduce=*/true);
  }
  if (reducers_.empty()) return {};
  ReduceStats stats;
  if (options_.zero_stage >= 2) {
    for (auto& units : zero3_) {
      if (units) units->release_all();  // units whose backward did not run
    }
    stats = std::exchange(micro_stats_, ReduceStats{});
  } else {
    stats = reducers_.front()->finish();
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
  if (reducers_.empty()) {
    std::vector<torch::Tensor> own;
    for (const auto& [name, p] : params_) own.push_back(p.grad());
    return square_norm(layout_, own).to(options_.device);
  }
  auto total = reducers_.front()->square_norm();
  for (size_t g = 1; g < reducers_.size(); ++g) total = total + reducers_[g]->square_norm();  // chunks: in order
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
  // views into the reducers' shards (the reducers hold the dense parameters).
  // ZeRO-3's blocks: views into the units' kept shards instead.
  for (size_t g = 0; g < reducers_.size(); ++g) {
    const auto* units = g < zero3_.size() ? zero3_[g].get() : nullptr;
    for (const auto& seg : reducers_[g]->shard_segments()) {
      const auto& [name, p] = reducers_[g]->params()[seg.param];
      const int64_t unit = units ? units->unit_of_bucket(seg.bucket) : -1;
      if (unit >= 0) out.pieces.emplace_back(name, units->shard(unit).narrow(0, seg.offset, seg.length));
      else out.pieces.emplace_back(name, p.detach().view({-1}).narrow(0, seg.begin, seg.length));
      out.begins.push_back(seg.begin);
      out.param.push_back(group_index_[g][seg.param]);
    }
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
  for (size_t g = 0; g < reducers_.size(); ++g) {
    const auto* units = g < zero3_.size() ? zero3_[g].get() : nullptr;
    if (!units) {
      reducers_[g]->gather_parameters();
      continue;
    }
    // ZeRO-3's units are gathered when they run; only the whole bucket here.
    reducers_[g]->gather_parameters([units](size_t bucket) { return units->unit_of_bucket(bucket) < 0; });
  }
}

void ParallelState::gather_weights() {
  for (auto& units : zero3_) {
    if (units) units->gather_all();
  }
}

void ParallelState::release_weights(bool changed) {
  for (auto& units : zero3_) {
    if (!units || !units->whole()) continue;
    if (changed) units->refresh_shards();  // the parameters were overwritten while gathered
    units->release_all();
  }
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
    for (const auto& reducer : reducers_) {
      for (const auto& seg : reducer->shard_segments(r)) {
        ranges[reducer->params()[seg.param].first] = {seg.begin, seg.begin + seg.length};
      }
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
