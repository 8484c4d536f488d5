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
//
// Sharded (ZeRO-1): each bucket's buffer is padded to a multiple of the group size
// and split into equal shards; rank r owns shard r of every bucket. The bucket's
// reduce-scatter (instead of an all-reduce) leaves rank r only the summed gradient
// of its shard, the optimizer updates only the parameter elements it owns
// (shard_segments()), and gather_parameters() all-gathers the updated shards so
// every rank holds every parameter again.
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

// Elements [begin, begin + length) of parameter `param` (flattened) that a rank
// owns under sharding; their summed gradient sits at [offset, offset + length) of
// its shard of bucket `bucket`.
struct ShardSegment {
  size_t param = 0;
  int64_t begin = 0;
  int64_t length = 0;
  size_t bucket = 0;
  int64_t offset = 0;
};

class GradientReducer {
 public:
  // params: float32 leaf tensors that require gradients, with their names; group:
  // the data-parallel communicator (must outlive the reducer). `sharded`: ZeRO-1.
  GradientReducer(std::vector<std::pair<std::string, torch::Tensor>> params, Communicator& group,
                  int64_t bucket_bytes, bool sharded = false);
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  // Before a micro-batch's backward: whether its gradients are the step's last
  // (reduced) or are only accumulated locally (gradient accumulation).
  void begin_backward(bool reduce);
  // After the last backward of a step: every parameter's gradient is the sum over
  // the group's ranks. Sharded: the parameters' own gradients stay this rank's,
  // and shard_gradient() holds the sums of the elements this rank owns.
  ReduceStats finish();

  int64_t bucket_count() const;
  bool sharded() const;
  const std::vector<std::pair<std::string, torch::Tensor>>& params() const;

  // Sharded only. The pieces of parameters that `rank` owns (this rank's by default),
  // in bucket order; the layout depends only on the parameters' sizes, the bucket
  // size and the group size, so every rank can compute every rank's pieces.
  std::vector<ShardSegment> shard_segments(int rank = -1) const;
  // This rank's shard of bucket `bucket` after finish(): [shard numel] float32.
  const torch::Tensor& shard_gradient(size_t bucket) const;
  // All-gathers every bucket's owned elements (as the parameters hold them now) so
  // every rank's parameters equal the owners' values.
  void gather_parameters();

  struct State;  // shared with the gradient hooks

 private:
  std::shared_ptr<State> state_;
};

}  // namespace brigade::parallel
