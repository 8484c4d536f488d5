#include "parallel/reducer.h"

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
    torch::Tensor flat;            // [numel] float32
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
    b.handle = group->all_reduce(b.flat, ReduceOp::kSum);
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
                                 int64_t bucket_bytes)
    : state_(std::make_shared<State>()) {
  BRIGADE_CHECK(bucket_bytes > 0, "gradient bucket size must be positive, got ", bucket_bytes, " bytes");
  auto& s = *state_;
  s.params = std::move(params);
  s.group = &group;
  s.bucket_of.resize(s.params.size());
  s.ready.assign(s.params.size(), false);
  // Reverse registration order: the output side of the model finishes backward first.
  for (size_t i = s.params.size(); i-- > 0;) {
    const auto& [name, p] = s.params[i];
    BRIGADE_CHECK(p.scalar_type() == torch::kFloat && p.requires_grad() && p.is_leaf(), "data-parallel parameter ",
                  name, " must be a float32 leaf that requires grad");
    const int64_t bytes = p.numel() * 4;
    if (s.buckets.empty() || (s.buckets.back().flat.numel() * 4 + bytes > bucket_bytes && !s.buckets.back().params.empty())) {
      s.buckets.emplace_back();
      s.buckets.back().flat = torch::empty({0});
    }
    auto& b = s.buckets.back();
    b.params.push_back(i);
    b.offsets.push_back(b.flat.numel());
    b.flat = torch::empty({b.flat.numel() + p.numel()});  // sized here, filled per step
    s.bucket_of[i] = s.buckets.size() - 1;
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
