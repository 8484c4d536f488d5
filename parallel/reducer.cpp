#include "parallel/reducer.h"

#include <algorithm>
#include <chrono>
#include <mutex>

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include "core/error.h"

namespace brigade::parallel {

struct GradientReducer::State {
  struct Bucket {
    std::vector<size_t> params;   // indices into State::params
    std::vector<int64_t> offsets;  // each parameter's place in `flat`
    int64_t numel = 0;             // parameters' elements (flat is padded past them when sharded)
    torch::Tensor flat;            // [numel, or padded to a multiple of the group size] float32
    torch::Tensor shard;           // sharded: [flat numel / group size], this rank's part
    int64_t waiting = 0;           // parameters not ready yet in this backward
    Handle handle;
  };
  std::vector<std::pair<std::string, torch::Tensor>> params;
  std::vector<size_t> bucket_of;  // parameter -> bucket
  std::vector<bool> ready;
  std::vector<Bucket> buckets;
  Communicator* group = nullptr;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;  // keep the hooked nodes alive
  std::mutex mutex;
  bool sharded = false;
  bool reducing = false;  // this backward's gradients are reduced
  bool alive = true;      // false once the reducer is gone (hooks then do nothing)
  size_t next = 0;        // next bucket to start
  int64_t started_in_backward = 0;

  void start(Bucket& b) {
    for (size_t k = 0; k < b.params.size(); ++k) {
      const auto& p = params[b.params[k]].second;
      auto slot = b.flat.narrow(0, b.offsets[k], p.numel());
      if (p.grad().defined()) slot.copy_(p.grad().reshape({-1}));
      else slot.zero_();
    }
    if (!sharded) {
      b.handle = group->all_reduce(b.flat, ReduceOp::kSum);
      return;
    }
    b.flat.narrow(0, b.numel, b.flat.numel() - b.numel).zero_();  // padding
    b.handle = group->reduce_scatter(b.flat, b.shard, ReduceOp::kSum);
  }

  // Starts every bucket from `next` on that is complete, in order.
  void start_ready() {
    while (next < buckets.size() && buckets[next].waiting == 0) start(buckets[next++]);
  }

  void on_ready(size_t index) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!alive || !reducing || ready[index]) return;
    ready[index] = true;
    buckets[bucket_of[index]].waiting -= 1;
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
                                 int64_t bucket_bytes, bool sharded)
    : state_(std::make_shared<State>()) {
  BRIGADE_CHECK(bucket_bytes > 0, "gradient bucket size must be positive, got ", bucket_bytes, " bytes");
  auto& s = *state_;
  s.params = std::move(params);
  s.group = &group;
  s.sharded = sharded;
  s.bucket_of.resize(s.params.size());
  s.ready.assign(s.params.size(), false);
  // Reverse registration order: the output side of the model finishes backward first.
  for (size_t i = s.params.size(); i-- > 0;) {
    const auto& [name, p] = s.params[i];
    BRIGADE_CHECK(p.scalar_type() == torch::kFloat && p.requires_grad() && p.is_leaf(), "data-parallel parameter ",
                  name, " must be a float32 leaf that requires grad");
    const int64_t bytes = p.numel() * 4;
    if (s.buckets.empty() || (s.buckets.back().numel * 4 + bytes > bucket_bytes && !s.buckets.back().params.empty())) {
      s.buckets.emplace_back();
    }
    auto& b = s.buckets.back();
    b.params.push_back(i);
    b.offsets.push_back(b.numel);
    b.numel += p.numel();
    s.bucket_of[i] = s.buckets.size() - 1;
  }
  const int64_t ranks = group.size();
  for (auto& b : s.buckets) {
    const int64_t shard = (b.numel + ranks - 1) / ranks;
    b.flat = torch::empty({sharded ? shard * ranks : b.numel});  // filled per step
    if (sharded) b.shard = torch::empty({shard});
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
bool GradientReducer::sharded() const { return state_->sharded; }
const std::vector<std::pair<std::string, torch::Tensor>>& GradientReducer::params() const { return state_->params; }

std::vector<ShardSegment> GradientReducer::shard_segments(int rank) const {
  const auto& s = *state_;
  BRIGADE_ASSERT(s.sharded, "shard_segments() of an unsharded reducer");
  if (rank < 0) rank = s.group->rank();
  std::vector<ShardSegment> out;
  for (size_t bi = 0; bi < s.buckets.size(); ++bi) {
    const auto& b = s.buckets[bi];
    const int64_t shard = b.shard.numel();
    const int64_t lo = rank * shard, hi = lo + shard;  // owned range of the bucket
    for (size_t k = 0; k < b.params.size(); ++k) {
      const int64_t start = b.offsets[k], end = start + s.params[b.params[k]].second.numel();
      const int64_t a = std::max(start, lo), z = std::min(end, hi);
      if (a < z) out.push_back({b.params[k], a - start, z - a, bi, a - lo});
    }
  }
  return out;
}

const torch::Tensor& GradientReducer::shard_gradient(size_t bucket) const {
  BRIGADE_ASSERT(state_->sharded && bucket < state_->buckets.size(), "no shard ", bucket);
  return state_->buckets[bucket].shard;
}

void GradientReducer::gather_parameters() {
  auto& s = *state_;
  BRIGADE_ASSERT(s.sharded, "gather_parameters() of an unsharded reducer");
  torch::NoGradGuard no_grad;
  const auto mine = shard_segments();
  for (auto& b : s.buckets) b.shard.zero_();  // padding and pieces of no parameter
  for (const auto& seg : mine) {
    s.buckets[seg.bucket].shard.narrow(0, seg.offset, seg.length)
        .copy_(s.params[seg.param].second.view({-1}).narrow(0, seg.begin, seg.length));
  }
  // Every bucket in flight at once, then copied out in order.
  for (auto& b : s.buckets) b.handle = s.group->all_gather(b.shard, b.flat);
  for (auto& b : s.buckets) {
    b.handle.wait();
    for (size_t k = 0; k < b.params.size(); ++k) {
      auto& p = s.params[b.params[k]].second;
      p.view({-1}).copy_(b.flat.narrow(0, b.offsets[k], p.numel()));
    }
  }
}

void GradientReducer::begin_backward(bool reduce) {
  auto& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  BRIGADE_ASSERT(s.next == 0 || s.next == s.buckets.size(), "begin_backward while buckets are in flight");
  s.reducing = reduce;
  s.next = 0;
  s.started_in_backward = 0;
  std::fill(s.ready.begin(), s.ready.end(), false);
  for (auto& b : s.buckets) b.waiting = static_cast<int64_t>(b.params.size());
}

ReduceStats GradientReducer::finish() {
  auto& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  BRIGADE_ASSERT(s.reducing, "finish() without begin_backward(true)");
  ReduceStats stats;
  stats.buckets = static_cast<int64_t>(s.buckets.size());
  stats.started_in_backward = s.started_in_backward;
  // Parameters that got no gradient (unused this step) leave their bucket waiting.
  while (s.next < s.buckets.size()) s.start(s.buckets[s.next++]);
  const auto start = std::chrono::steady_clock::now();
  torch::NoGradGuard no_grad;
  for (auto& b : s.buckets) {
    b.handle.wait();
    if (s.sharded) continue;  // the sums stay in the shards
    for (size_t k = 0; k < b.params.size(); ++k) {
      auto& p = s.params[b.params[k]].second;
      auto sum = b.flat.narrow(0, b.offsets[k], p.numel()).view(p.sizes());
      if (p.grad().defined()) p.mutable_grad().copy_(sum);
      else p.mutable_grad() = sum.clone();
    }
  }
  stats.wait_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  s.reducing = false;
  return stats;
}

}  // namespace brigade::parallel
