// Data-parallel gradient reduction in buckets, overlapped with backward (the
// strategy DDP made standard). Parameters are grouped, in reverse registration
// order (roughly the order backward produces their gradients), into buckets of
// about `bucket_bytes`. A hook on each parameter's gradient accumulator marks it
// ready; when a bucket's parameters are all ready its gradients are copied into
// one flat buffer and its reduction starts, while backward goes on with earlier
// layers. Buckets start strictly in index order, so every rank issues the same
// collectives in the same order whatever its own timing. finish() starts what is
// left (a parameter that got no gradient this step contributes zeros), waits,
// and writes the sums back as the gradients.
//
// The reduction is reproducible across rank counts (parallel/ordered_sum.h): a
// bucket's buffer is padded to ranks x shard elements (the shard a multiple of
// kNormBlock) and exchanged by all-to-all, so rank r receives every rank's piece r;
// it adds them in rank order with PairwiseSum, and an all-gather brings the sums
// to every rank. The traffic is a ring all-reduce's (reduce-scatter plus
// all-gather volume); the cost is one more bucket-sized receive buffer.
//
// Sharded (ZeRO-1): rank r owns shard r of every bucket. The all-gather of sums
// is skipped: rank r keeps only the summed gradient of its shard, the optimizer
// updates only the parameter elements it owns (shard_segments()), and
// gather_parameters() all-gathers the updated shards so every rank holds every
// parameter again.
//
// Released (ZeRO-2 and 3): every micro-batch's backward is reduced, not only the
// step's last; finish(last) after each adds the micro-batch's shard sums to the
// step's (a PairwiseSum over micro-batches). A parameter's .grad is dropped as soon
// as it is copied into its bucket, and a bucket's send and receive buffers exist
// only while it is in flight, so gradient memory is the shards plus the buckets in
// flight. With one micro-batch per step the bits are ZeRO-1's; with several, the
// order of the additions is micro-batch major (docs/distributed.md).
#pragma once

#include <cstdint>
#include <functional>
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

// Which parameter elements go into which bucket; depends only on the parameters'
// sizes, the bucket size and the number of ranks, so a process alone can lay out
// the buckets a data-parallel run would (for the same gradient norm).
struct BucketLayout {
  struct Bucket {
    std::vector<size_t> params;    // indices into the parameter list
    std::vector<int64_t> offsets;  // each parameter's place in the bucket
    int64_t numel = 0;             // parameters' elements; padded past them to ranks * shard
    int64_t shard = 0;             // elements per rank, a multiple of kNormBlock
  };
  std::vector<Bucket> buckets;
  std::vector<size_t> bucket_of;  // parameter -> bucket
  int ranks = 1;                  // a bucket's buffer is ranks * shard elements
};
BucketLayout make_bucket_layout(const std::vector<int64_t>& numels, int64_t bucket_bytes, int ranks);
// One bucket per unit (parameter indices, in each unit the order of the list), the
// units in the order given (the order backward finishes them): ZeRO-3's layers.
// Every parameter must be in exactly one unit.
BucketLayout make_unit_layout(const std::vector<int64_t>& numels, const std::vector<std::vector<size_t>>& units,
                              int ranks);

// The pieces of the parameters (of `numels` elements) that `rank` owns under
// sharding with `layout`, in bucket order (GradientReducer::shard_segments).
std::vector<ShardSegment> shard_segments(const BucketLayout& layout, const std::vector<int64_t>& numels, int rank);

// The squared L2 norm of `grads` (undefined: zeros), laid out as `layout` says,
// summed in the order of parallel/ordered_sum.h: the same bits as a data-parallel
// reducer's square_norm() with the same parameters and bucket size. Float64 [1] on
// the gradients' device; no host read.
torch::Tensor square_norm(const BucketLayout& layout, const std::vector<torch::Tensor>& grads);

struct ReducerOptions {
  int64_t bucket_bytes = 25 << 20;
  bool sharded = false;  // ZeRO-1
  // Called for each parameter (its index in the reducer's list) just before its
  // gradient is copied into a bucket, on the thread that runs backward: the
  // trainer folds the earlier micro-batches' gradients in there.
  std::function<void(size_t)> before_reduce;
  // ZeRO-2 and 3 (sharded only): reduce every backward, accumulate the shard sums
  // over micro-batches, release gradients and buffers once sent (see above).
  bool release = false;
  // Explicit buckets (make_unit_layout) instead of buckets of bucket_bytes.
  std::vector<std::vector<size_t>> units;
  // Called with a bucket's index once its gradients are copied out, on the thread
  // that runs backward (ZeRO-3 frees the unit's gathered parameters there).
  std::function<void(size_t)> after_copy;
};

class GradientReducer {
 public:
  // params: float32 leaf tensors that require gradients, with their names; group:
  // the data-parallel communicator (must outlive the reducer).
  GradientReducer(std::vector<std::pair<std::string, torch::Tensor>> params, Communicator& group,
                  ReducerOptions options);
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  // Before a micro-batch's backward: whether its gradients are the step's last
  // (reduced) or are only accumulated locally (gradient accumulation).
  void begin_backward(bool reduce);
  // After the last backward of a step: every parameter's gradient is the sum over
  // the group's ranks. Sharded: the parameters' own gradients stay this rank's,
  // and shard_gradient() holds the sums of the elements this rank owns.
  // Released: after every backward; `last` says whether it was the step's last
  // (shard_gradient() then holds the step's sums).
  ReduceStats finish(bool last = true);

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
  // every rank's parameters equal the owners' values. `include`: only the buckets
  // it accepts (ZeRO-3 gathers its units' parameters itself).
  void gather_parameters(const std::function<bool(size_t)>& include = {});
  // After finish(): the squared L2 norm of the summed gradients (sharded: of every
  // rank's shards; collective then), the same bits on every rank and for any
  // number of ranks (square_norm() with this reducer's layout, for one process).
  // Float64 [1] on the group's device; no host read.
  torch::Tensor square_norm() const;
  const BucketLayout& layout() const;

  struct State;  // shared with the gradient hooks

 private:
  std::shared_ptr<State> state_;
};

}  // namespace brigade::parallel
