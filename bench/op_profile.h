// OpProfile: per-operator CPU time of everything LibTorch dispatches while it is
// alive (aten ops and autograd backward nodes), from RecordFunction callbacks.
// bench_train_step --profile uses it so that bench/train_step.py --profile can set
// brigade's per-op times beside torch.profiler's for the eager model.
//
// Self time is an op's time minus the time of ops it dispatched (on the same
// thread), so the self times of a step add up to the time spent inside LibTorch.
// The callbacks cost about a microsecond per op; profile runs are not timing runs.
#pragma once

#include <ATen/record_function.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace brigade::bench {

struct OpStats {
  std::string name;
  int64_t calls = 0;
  double total_seconds = 0.0;  // including the ops it dispatched
  double self_seconds = 0.0;
};

class OpProfile {
 public:
  OpProfile() {
    {
      std::lock_guard<std::mutex> lock(mutex());
      table().clear();
    }
    handle_ = at::addGlobalCallback(at::RecordFunctionCallback(&enter, &leave).scopes(
        {at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}));
  }
  ~OpProfile() { at::removeCallback(handle_); }
  OpProfile(const OpProfile&) = delete;
  OpProfile& operator=(const OpProfile&) = delete;

  // Every op seen so far, most self time first.
  std::vector<OpStats> ops() const {
    std::lock_guard<std::mutex> lock(mutex());
    std::vector<OpStats> out;
    for (const auto& [name, s] : table()) out.push_back(s);
    std::sort(out.begin(), out.end(), [](const OpStats& a, const OpStats& b) { return a.self_seconds > b.self_seconds; });
    return out;
  }

 private:
  using Clock = std::chrono::steady_clock;

  struct Frame : at::ObserverContext {
    Clock::time_point start;
    double children_seconds = 0.0;
    Frame* parent = nullptr;
  };

  // The innermost open op on this thread: the parent of the next one.
  static Frame*& current() {
    thread_local Frame* frame = nullptr;
    return frame;
  }
  // Static because RecordFunction takes plain function pointers; one OpProfile at a time.
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::map<std::string, OpStats>& table() {
    static std::map<std::string, OpStats> t;
    return t;
  }

  static std::unique_ptr<at::ObserverContext> enter(const at::RecordFunction&) {
    auto frame = std::make_unique<Frame>();
    frame->parent = current();
    current() = frame.get();
    frame->start = Clock::now();
    return frame;
  }

  static void leave(const at::RecordFunction& fn, at::ObserverContext* context) {
    auto* frame = static_cast<Frame*>(context);
    const double seconds = std::chrono::duration<double>(Clock::now() - frame->start).count();
    current() = frame->parent;
    if (frame->parent != nullptr) frame->parent->children_seconds += seconds;
    std::lock_guard<std::mutex> lock(mutex());
    OpStats& s = table()[fn.name()];
    s.name = fn.name();
    s.calls += 1;
    s.total_seconds += seconds;
    s.self_seconds += seconds - frame->children_seconds;
  }

  at::CallbackHandle handle_;
};

}  // namespace brigade::bench
