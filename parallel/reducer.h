// Data-parallel gradient reduction in buckets, overlapped with backward (the
// strategy DDP made standard). Parameters are grouped, in reverse registration
// order (roughly the order backward produces their gradients), into buckets of
// about `bucket_bytes`. A hook on each parameter's gradient accumulator marks it
// ready; when a bucket's parameters are all ready its gradients are copied into
// one flat buffer and an asynchronous all-reduce (sum) starts, while backward goes
// on with earlier layers. Buckets start strictly in index order, so every rank
// issues the same collectives in the same order whatever its own timing.
// finish() starts what is left (a parameter that got no gradient this step
// contributes zeros), waits, and writes the sums back as the gradients.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "parallel/communicator.h"

namespace brigade::parallel {

struct ReduceStats {
  int64_t buckets = 0;
  int64_t started_in_backward = 0;  // buckets whose all-reduce began before finish()
  double wait_seconds = 0.0;        // time finish() spent waiting for communication
};

class GradientReducer {
 public:
  // params: float32 leaf tensors that require gradients, with their names; group:
  // the data-parallel communicator (must outlive the reducer).
  GradientReducer(std::vector<std::pair<std::string, torch::Tensor>> params, Communicator& group,
                  int64_t bucket_bytes);
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  // Before a micro-batch's backward: whether its gradients are the step's last
  // (reduced) or are only accumulated locally (gradient accumulation).
  void begin_backward(bool reduce);
  // After the last backward of a step: every parameter's gradient is the sum over
  // the group's ranks.
  ReduceStats finish();

  int64_t bucket_count() const;

  struct State;  // shared with the gradient hooks

 private:
  std::shared_ptr<State> state_;
};

}  // namespace brigade::parallel
