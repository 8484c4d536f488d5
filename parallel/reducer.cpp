#include "parallel/reducer.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include "core/error.h"
#include "parallel/ordered_sum.h"

namespace brigade::parallel {

namespace {

// Shards start on norm-block boundaries, so a block is never split between ranks.
void pad_to_shards(BucketLayout& layout) {
  const int64_t unit = kNormBlock * layout.ranks;
  for (auto& b : layout.buckets) b.shard = std::max<int64_t>(1, (b.numel + unit - 1) / unit) * kNormBlock;
}

}  // namespace

BucketLayout make_bucket_layout(const std::vector<int64_t>& numels, int64_t bucket_bytes, int ranks) {
  BRIGADE_CHECK(bucket_bytes > 0, "gradient bucket size must be positive, got ", bucket_bytes, " bytes");
  BRIGADE_ASSERT(ranks >= 1, "bucket layout for ", ranks, " ranks");
  BucketLayout layout;
  layout.ranks = ranks;
  layout.bucket_of.resize(numels.size());
  // Reverse registration order: the output side of the model finishes backward first.
  for (size_t i = numels.size(); i-- > 0;) {
    const int64_t bytes = numels[i] * 4;
    auto& buckets = layout.buckets;
    if (buckets.empty() || (buckets.back().numel * 4 + bytes > bucket_bytes && !buckets.back().params.empty())) {
      buckets.emplace_back();
    }
    auto& b = buckets.back();
    b.params.push_back(i);
    b.offsets.push_back(b.numel);
    b.numel += numels[i];
    layout.bucket_of[i] = buckets.size() - 1;
  }
  pad_to_shards(layout);
  return layout;
}

BucketLayout make_unit_layout(const std::vector<int64_t>& numels, const std::vector<std::vector<size_t>>& units,
                              int ranks) {
  BRIGADE_ASSERT(ranks >= 1, "bucket layout for ", ranks, " ranks");
  BucketLayout layout;
  layout.ranks = ranks;
  layout.bucket_of.assign(numels.size(), SIZE_MAX);
  for (const auto& unit : units) {
    auto& b = layout.buckets.emplace_back();
    for (size_t i : unit) {
      BRIGADE_ASSERT(i < numels.size() && layout.bucket_of[i] == SIZE_MAX, "parameter ", i, " in two units or none");
      b.params.push_back(i);
      b.offsets.push_back(b.numel);
      b.numel += numels[i];
      layout.bucket_of[i] = layout.buckets.size() - 1;
    }
  }
  for (size_t i = 0; i < numels.size(); ++i) BRIGADE_ASSERT(layout.bucket_of[i] != SIZE_MAX, "parameter ", i, " in no unit");
  pad_to_shards(layout);
  return layout;
}

namespace {

// The blocks of a bucket that hold parameter elements; the rest are padding (zeros),
// and how much padding there is depends on the number of ranks.
int64_t real_blocks(const BucketLayout::Bucket& b) { return (b.numel + kNormBlock - 1) / kNormBlock; }

}  // namespace

torch::Tensor square_norm(const BucketLayout& layout, const std::vector<torch::Tensor>& grads) {
  torch::NoGradGuard no_grad;
  std::optional<torch::Device> device;
  for (const auto& g : grads) {
    if (g.defined()) device = g.device();
  }
  if (!device) return torch::zeros({1}, torch::kDouble);
  const auto doubles = torch::TensorOptions().dtype(torch::kDouble).device(*device);
  torch::Tensor flat;               // one bucket at a time
  std::vector<torch::Tensor> sums;  // per bucket: [real blocks] float64
  for (const auto& b : layout.buckets) {
    bool any = false;
    for (size_t p : b.params) any = any || grads[p].defined();
    if (!any) {  // a reducer would sum zeros there
      sums.push_back(torch::zeros({real_blocks(b)}, doubles));
      continue;
    }
    const int64_t size = real_blocks(b) * kNormBlock;
    if (!flat.defined() || flat.numel() < size) flat = torch::empty({size}, doubles.dtype(torch::kFloat));
    auto bucket = flat.narrow(0, 0, size);
    bucket.zero_();
    for (size_t k = 0; k < b.params.size(); ++k) {
      const auto& g = grads[b.params[k]];
      if (g.defined()) bucket.narrow(0, b.offsets[k], g.numel()).copy_(g.reshape({-1}));
    }
    sums.push_back(block_squares(bucket));
  }
  return sums.empty() ? torch::zeros({1}, doubles) : tree_sum(torch::cat(sums));
}

struct GradientReducer::State {
  enum class Phase { kIdle, kExchange, kGather, kDone };
  struct Bucket {
    torch::Tensor flat;   // [ranks * shard] float32: this rank's gradients, then (unsharded) the sums
    torch::Tensor recv;   // [ranks * shard] float32: piece `rank` of every rank's flat, in rank order
    torch::Tensor shard;  // [shard] float32: this rank's piece of the sums
    PairwiseSum step;     // released: this rank's piece of each micro-batch's sums
    int64_t waiting = 0;  // parameters not ready yet in this backward
    Phase phase = Phase::kIdle;
    Handle handle;
  };
  std::vector<std::pair<std::string, torch::Tensor>> params;
  BucketLayout layout;
  std::vector<bool> ready;
  std::vector<Bucket> buckets;
  Communicator* group = nullptr;
  ReducerOptions options;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;  // keep the hooked nodes alive
  std::mutex mutex;
  bool reducing = false;  // this backward's gradients are reduced
  bool alive = true;      // false once the reducer is gone (hooks then do nothing)
  size_t next = 0;        // next bucket to start
  int64_t started_in_backward = 0;

  void start(size_t index) {
    // Every rank must issue its collectives in the same order: bucket k-1's
    // all-gather goes right before bucket k's exchange, whatever the timing (this
    // waits for k-1's exchange, which had bucket k's backward to finish in).
    if (index > 0 && !options.sharded) advance(index - 1);
    auto& b = buckets[index];
    const auto& spec = layout.buckets[index];
    torch::NoGradGuard no_grad;
    if (options.release) allocate(b, spec);
    for (size_t k = 0; k < spec.params.size(); ++k) {
      if (options.before_reduce) options.before_reduce(spec.params[k]);
      auto& p = params[spec.params[k]].second;
      auto slot = b.flat.narrow(0, spec.offsets[k], p.numel());
      if (p.grad().defined()) slot.copy_(p.grad().reshape({-1}));
      else slot.zero_();
      if (options.release) p.mutable_grad() = torch::Tensor();
    }
    b.flat.narrow(0, spec.numel, b.flat.numel() - spec.numel).zero_();  // padding
    if (options.after_copy) options.after_copy(index);
    const std::vector<int64_t> rows(group->size(), spec.shard);
    b.handle = group->all_to_all(b.flat, rows, b.recv, rows);
    b.phase = Phase::kExchange;
  }

  // Waits for a bucket's communication and moves it on (exchange -> sum -> gather -> done).
  void advance(size_t index) {
    auto& b = buckets[index];
    if (b.phase == Phase::kExchange) {
      b.handle.wait();
      // Every rank's piece of this rank's shard, added in rank order.
      torch::NoGradGuard no_grad;
      PairwiseSum sum;
      const int64_t shard = layout.buckets[index].shard;
      for (int r = 0; r < group->size(); ++r) sum.add(b.recv.narrow(0, r * shard, shard));
      if (options.release) {
        b.step.add(sum.take().clone());  // not a view: the buffers go now
        b.flat = b.recv = torch::Tensor();
      } else {
        b.shard.copy_(sum.take());
      }
      if (options.sharded) {
        b.phase = Phase::kDone;
        return;
      }
      b.handle = group->all_gather(b.shard, b.flat);
      b.phase = Phase::kGather;
    }
    if (b.phase == Phase::kGather) {
      b.handle.wait();
      b.phase = Phase::kDone;
    }
  }

  // Released buckets get their send and receive buffers only while in flight.
  void allocate(Bucket& b, const BucketLayout::Bucket& spec) const {
    const auto on = b.shard.options();
    if (!b.flat.defined()) b.flat = torch::empty({spec.shard * group->size()}, on);
    if (!b.recv.defined()) b.recv = torch::empty({spec.shard * group->size()}, on);
  }

  // Starts every bucket from `next` on that is complete, in order.
  void start_ready() {
    while (next < buckets.size() && buckets[next].waiting == 0) start(next++);
  }

  void on_ready(size_t index) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!alive || !reducing || ready[index]) return;
    ready[index] = true;
    buckets[layout.bucket_of[index]].waiting -= 1;
    const size_t before = next;
    start_ready();
    started_in_backward += static_cast<int64_t>(next - before);
    // MPI advances non-blocking collectives only inside MPI calls: poll the ones in
    // flight so they progress during backward.
    for (size_t b = 0; b < next; ++b) buckets[b].handle.test();
  }
};

namespace {

// Runs after a parameter's AccumulateGrad node: its .grad holds this backward's sum.
class ReadyHook final : public torch::autograd::FunctionPostHook {
 public:
  ReadyHook(std::weak_ptr<GradientReducer::State> state, size_t index) : state_(std::move(state)), index_(index) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list&) override {
    if (auto s = state_.lock()) s->on_ready(index_);
    return outputs;
  }

 private:
  std::weak_ptr<GradientReducer::State> state_;
  size_t index_;
};

}  // namespace

GradientReducer::GradientReducer(std::vector<std::pair<std::string, torch::Tensor>> params, Communicator& group,
                                 ReducerOptions options)
    : state_(std::make_shared<State>()) {
  auto& s = *state_;
  s.params = std::move(params);
  s.group = &group;
  s.options = std::move(options);
  std::vector<int64_t> numels;
  for (const auto& [name, p] : s.params) {
    BRIGADE_CHECK(p.scalar_type() == torch::kFloat && p.requires_grad() && p.is_leaf(), "data-parallel parameter ",
                  name, " must be a float32 leaf that requires grad");
    numels.push_back(p.numel());
  }
  BRIGADE_ASSERT(s.options.sharded || !s.options.release, "released gradients need a sharded reducer");
  s.layout = s.options.units.empty() ? make_bucket_layout(numels, s.options.bucket_bytes, group.size())
                                     : make_unit_layout(numels, s.options.units, group.size());
  s.ready.assign(s.params.size(), false);
  const auto on = s.params.empty() ? torch::TensorOptions() : s.params.front().second.options();
  for (const auto& spec : s.layout.buckets) {
    auto& b = s.buckets.emplace_back();
    b.shard = torch::empty({spec.shard}, on.requires_grad(false));
    if (s.options.release) continue;
    b.flat = torch::empty({spec.shard * group.size()}, on.requires_grad(false));  // filled per step
    b.recv = torch::empty_like(b.flat);
  }
  for (size_t i = 0; i < s.params.size(); ++i) {
    auto accumulator = torch::autograd::impl::grad_accumulator(s.params[i].second);
    BRIGADE_ASSERT(accumulator != nullptr, "no gradient accumulator for ", s.params[i].first);
    accumulator->add_post_hook(std::make_unique<ReadyHook>(state_, i));
    s.accumulators.push_back(std::move(accumulator));
  }
  begin_backward(false);
}

GradientReducer::~GradientReducer() {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->alive = false;
}

int64_t GradientReducer::bucket_count() const { return static_cast<int64_t>(state_->buckets.size()); }
bool GradientReducer::sharded() const { return state_->options.sharded; }
const std::vector<std::pair<std::string, torch::Tensor>>& GradientReducer::params() const { return state_->params; }
const BucketLayout& GradientReducer::layout() const { return state_->layout; }

std::vector<ShardSegment> shard_segments(const BucketLayout& layout, const std::vector<int64_t>& numels, int rank) {
  std::vector<ShardSegment> out;
  for (size_t bi = 0; bi < layout.buckets.size(); ++bi) {
    const auto& b = layout.buckets[bi];
    const int64_t lo = rank * b.shard, hi = lo + b.shard;  // owned range of the bucket
    for (size_t k = 0; k < b.params.size(); ++k) {
      const int64_t start = b.offsets[k], end = start + numels[b.params[k]];
      const int64_t a = std::max(start, lo), z = std::min(end, hi);
      if (a < z) out.push_back({b.params[k], a - start, z - a, bi, a - lo});
    }
  }
  return out;
}

std::vector<ShardSegment> GradientReducer::shard_segments(int rank) const {
  const auto& s = *state_;
  BRIGADE_ASSERT(s.options.sharded, "shard_segments() of an unsharded reducer");
  std::vector<int64_t> numels;
  for (const auto& [name, p] : s.params) numels.push_back(p.numel());
  return parallel::shard_segments(s.layout, numels, rank < 0 ? s.group->rank() : rank);
}

const torch::Tensor& GradientReducer::shard_gradient(size_t bucket) const {
  BRIGADE_ASSERT(state_->options.sharded && bucket < state_->buckets.size(), "no shard ", bucket);
  return state_->buckets[bucket].shard;
}

void GradientReducer::gather_parameters(const std::function<bool(size_t)>& include) {
  auto& s = *state_;
  BRIGADE_ASSERT(s.options.sharded, "gather_parameters() of an unsharded reducer");
  torch::NoGradGuard no_grad;
  auto wanted = [&](size_t bi) { return !include || include(bi); };
  for (size_t bi = 0; bi < s.buckets.size(); ++bi) {
    if (wanted(bi)) s.buckets[bi].shard.zero_();  // padding and pieces of no parameter
  }
  for (const auto& seg : shard_segments()) {
    if (!wanted(seg.bucket)) continue;
    s.buckets[seg.bucket].shard.narrow(0, seg.offset, seg.length)
        .copy_(s.params[seg.param].second.view({-1}).narrow(0, seg.begin, seg.length));
  }
  // Every bucket in flight at once, then copied out in order.
  for (size_t bi = 0; bi < s.buckets.size(); ++bi) {
    if (!wanted(bi)) continue;
    auto& b = s.buckets[bi];
    if (s.options.release) b.flat = torch::empty({s.layout.buckets[bi].shard * s.group->size()}, b.shard.options());
    b.handle = s.group->all_gather(b.shard, b.flat);
  }
  for (size_t bi = 0; bi < s.buckets.size(); ++bi) {
    if (!wanted(bi)) continue;
    auto& b = s.buckets[bi];
    const auto& spec = s.layout.buckets[bi];
    b.handle.wait();
    for (size_t k = 0; k < spec.params.size(); ++k) {
      auto& p = s.params[spec.params[k]].second;
      p.view({-1}).copy_(b.flat.narrow(0, spec.offsets[k], p.numel()));
    }
    if (s.options.release) b.flat = torch::Tensor();
  }
}

torch::Tensor GradientReducer::square_norm() const {
  const auto& s = *state_;
  torch::NoGradGuard no_grad;
  if (!s.options.sharded) {
    // Every rank holds every sum: the blocks of each bucket in order.
    std::vector<torch::Tensor> sums;
    for (size_t bi = 0; bi < s.buckets.size(); ++bi) {
      sums.push_back(block_squares(s.buckets[bi].flat).narrow(0, 0, real_blocks(s.layout.buckets[bi])));
    }
    if (sums.empty()) return torch::zeros({1}, torch::TensorOptions().dtype(torch::kDouble).device(s.group->device()));
    return tree_sum(torch::cat(sums));
  }
  // Each rank has the block sums of its shards; gathered, they are put in the
  // unsharded order (bucket by bucket, rank by rank within a bucket) and the
  // padding blocks dropped.
  std::vector<torch::Tensor> mine;
  for (const auto& b : s.buckets) mine.push_back(block_squares(b.shard));
  auto local = torch::cat(mine);
  const int ranks = s.group->size();
  auto all = torch::empty({ranks * local.numel()}, local.options());
  s.group->all_gather(local, all).wait();
  const auto by_rank = all.view({ranks, local.numel()});
  std::vector<torch::Tensor> ordered;
  int64_t offset = 0;
  for (const auto& spec : s.layout.buckets) {
    const int64_t blocks = spec.shard / kNormBlock;
    ordered.push_back(by_rank.narrow(1, offset, blocks).reshape({-1}).narrow(0, 0, real_blocks(spec)));
    offset += blocks;
  }
  return tree_sum(torch::cat(ordered));
}

void GradientReducer::begin_backward(bool reduce) {
  auto& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  BRIGADE_ASSERT(s.next == 0 || s.next == s.buckets.size(), "begin_backward while buckets are in flight");
  s.reducing = reduce;
  s.next = 0;
  s.started_in_backward = 0;
  std::fill(s.ready.begin(), s.ready.end(), false);
  for (size_t bi = 0; bi < s.buckets.size(); ++bi) {
    s.buckets[bi].waiting = static_cast<int64_t>(s.layout.buckets[bi].params.size());
    s.buckets[bi].phase = State::Phase::kIdle;
  }
}

ReduceStats GradientReducer::finish(bool last) {
  auto& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  BRIGADE_ASSERT(s.reducing, "finish() without begin_backward(true)");
  ReduceStats stats;
  stats.buckets = static_cast<int64_t>(s.buckets.size());
  stats.started_in_backward = s.started_in_backward;
  // Parameters that got no gradient (unused this step) leave their bucket waiting.
  while (s.next < s.buckets.size()) s.start(s.next++);
  const auto start = std::chrono::steady_clock::now();
  torch::NoGradGuard no_grad;
  for (size_t bi = 0; bi < s.buckets.size(); ++bi) {
    s.advance(bi);
    if (s.options.sharded) continue;  // the sums stay in the shards
    const auto& spec = s.layout.buckets[bi];
    const auto& flat = s.buckets[bi].flat;
    for (size_t k = 0; k < spec.params.size(); ++k) {
      auto& p = s.params[spec.params[k]].second;
      auto sum = flat.narrow(0, spec.offsets[k], p.numel()).view(p.sizes());
      if (p.grad().defined()) p.mutable_grad().copy_(sum);
      else p.mutable_grad() = sum.clone();
    }
  }
  if (s.options.release && last) {
    for (auto& b : s.buckets) {
      auto sum = b.step.take();
      if (sum.defined()) b.shard.copy_(sum);
      else b.shard.zero_();
    }
  }
  stats.wait_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  s.reducing = false;
  return stats;
}

}  // namespace brigade::parallel
