// ZeRO-3 (parallel.zero_stage: 3): between uses, the parameters of each unit (a
// transformer block, the embedding table, ...: model::BlockHooks) exist on a rank only as its shard, the elements of the unit's
// gradient bucket it owns (GradientReducer::shard_segments), which is also what its
// optimizer updates. A unit's parameters are views into one flat buffer laid out as
// its bucket; gather() all-gathers the owners' shards into it just before the block
// runs, and release() frees the buffer's memory again (the storage keeps its
// identity, so the views autograd saved in forward see the data again when the unit
// is gathered for backward). Gathers go over a communicator of their own, so their
// order never interleaves with the gradient buckets'.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "parallel/communicator.h"
#include "parallel/reducer.h"

namespace brigade::parallel {

class ShardedParameters {
 public:
  // params / layout: the reducer's; unit_buckets[u]: the bucket of unit u (units in
  // the model's block order). The parameters must hold the same values on every rank;
  // afterwards they are views into the units' buffers, released.
  ShardedParameters(const std::vector<std::pair<std::string, torch::Tensor>>& params, const BucketLayout& layout,
                    std::vector<size_t> unit_buckets, std::shared_ptr<Communicator> group);
  ~ShardedParameters();
  ShardedParameters(const ShardedParameters&) = delete;
  ShardedParameters& operator=(const ShardedParameters&) = delete;

  size_t units() const { return units_.size(); }
  // Starts unit u's gather unless it is gathered or on its way (u out of range: nothing).
  void prefetch(int64_t u);
  // Unit u's parameters hold the whole values (waits for its gather).
  void gather(int64_t u);
  void release(int64_t u);
  // Every unit, for checkpoints, loading weights and callers of the model after
  // training: until release_all(), prefetch/gather/release do nothing, so a forward
  // on one rank alone (generation after training) needs no other rank.
  void gather_all();
  void release_all();
  bool whole() const { return whole_; }
  // The unit whose bucket is b (-1: not a unit's).
  int64_t unit_of_bucket(size_t b) const;
  // This rank's shard of unit u: [shard] float32, the master copy the optimizer
  // updates in place (padding and other ranks' elements excluded by the segments).
  const torch::Tensor& shard(size_t u) const { return units_[u].shard; }
  // After the parameters were overwritten while gathered (loading a checkpoint):
  // the shards take this rank's elements from them.
  void refresh_shards();

  // Bytes of gathered unit buffers now, and the most at once since reset_peak().
  int64_t gathered_bytes() const { return gathered_bytes_; }
  int64_t peak_gathered_bytes() const { return peak_gathered_bytes_; }
  void reset_peak() { peak_gathered_bytes_ = gathered_bytes_; }
  // Bytes of unit u's whole buffer, and of the largest unit's.
  int64_t unit_bytes(size_t u) const;
  int64_t largest_unit_bytes() const;

 private:
  struct Unit {
    size_t bucket = 0;
    torch::Tensor flat;   // [ranks * shard]; its storage is empty while released
    torch::Tensor shard;  // [shard]: this rank's elements, kept
    enum class State { kReleased, kInFlight, kGathered } state = State::kReleased;
    Handle handle;
  };
  void allocate(Unit& unit);
  std::vector<std::pair<std::string, torch::Tensor>> params_;
  BucketLayout layout_;
  std::vector<Unit> units_;
  std::vector<int64_t> unit_of_bucket_;  // -1: not a unit's bucket
  std::shared_ptr<Communicator> group_;  // the gathers' own (shared by a rank's chunks)
  int64_t gathered_bytes_ = 0, peak_gathered_bytes_ = 0;
  bool whole_ = false;
};

}  // namespace brigade::parallel
