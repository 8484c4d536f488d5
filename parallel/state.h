// The parallel state of a training run, in one object: the data-parallel group,
// the expert-parallel groups made from it, the gradient reducers, the ZeRO shards
// (optimizer state, gradients, parameters) and what checkpoints need to gather
// expert slices and lay out optimizer shards. The trainer holds one and asks it, at fixed
// points of a step, to do the parallel part:
//
//   begin_micro_batch(last)  ... forward + backward ...  end_micro_batch(last)
//   finish_gradients()       gradients are sums over the ranks (ZeRO: owned shards)
//   grad_square_norm()       on the device, the same bits for any number of ranks
//   optimizer_gradients()    what AdamW applies, piece by piece
//   after_update()           ZeRO-1/2: every rank's parameters from their owners
//
// ZeRO stages (parallel.zero_stage): 1 shards the optimizer state; 2 also the
// gradients (every micro-batch reduce-scattered during backward, nothing whole
// kept: GradientReducer's "released" mode); 3 also the transformer blocks'
// parameters (parallel/zero3.h): each unit (a block; the embedding table; the
// untied head; the final norm with the MTP modules' projections) is gathered just
// before its forward use and again where its backward needs it, the next block
// prefetched, and freed after use.
//
// Chunks. A chunked pipeline schedule (interleaved_1f1b, dualpipev) runs a rank's
// model chunks' backwards apart, each reaching one chunk's parameters; at ZeRO 2 and
// 3, which reduce every backward as it runs, each chunk then has a reducer of its
// own (its own buckets, and at stage 3 its own units), and each backward finishes
// its chunk's reducer only (begin_chunk_backward / end_chunk_backward).
//
// Layout. Ranks 0..N-1 of the data-parallel group train on slices of the batch.
// With expert parallelism P, runs of P consecutive ranks form an EP group whose
// ranks hold disjoint slices of the routed experts (dim 0 of each expert tensor);
// the ranks at the same place in every EP group hold the same experts and sum
// their gradients over an "expert-replica" group. Dense parameters are reduced
// over the whole data-parallel group. Alone (no group or a group of 1) nothing is
// communicated, and the gradient norm is still summed over the buckets a reducer
// would use, so it has the bits of any data-parallel run.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <c10/core/Device.h>
#include <torch/types.h>

#include "parallel/communicator.h"
#include "parallel/ordered_sum.h"
#include "parallel/reducer.h"
#include "parallel/zero3.h"

namespace brigade::parallel {

using NamedParams = std::vector<std::pair<std::string, torch::Tensor>>;

// ZeRO-3's units by BlockHooks number (model/transformer.h: the blocks, then the
// embedding, head and the rest): each unit's parameters (indices into the attached
// parameters; empty: none here), and the numbers in the order backward completes
// the units' gradients, which is their buckets' order (a reducer starts its buckets
// in order and frees a unit when its bucket's gradients are copied out).
struct UnitLayout {
  std::vector<std::vector<size_t>> members;
  std::vector<size_t> backward_order;  // empty: the last number first
  // backward_order, or every number last first.
  std::vector<size_t> order() const;
};

// The groups a rank's dense gradients are reduced in, each by a reducer of its own:
// every parameter in one group, or (ZeRO-2/3 with several chunks) one group per
// chunk. `chunks` and `units` index the dense parameters (0..params-1; `chunks`
// empty: one chunk). Each group lists its parameters in index order and, at
// ZeRO-3, its buckets: each of its units (a unit lies in one chunk) in backward
// order, then one bucket of its parameters in no unit (if any).
struct ReduceGroup {
  std::vector<size_t> params;
  std::vector<std::vector<size_t>> units;  // ZeRO-3 only: the buckets (make_unit_layout), in the group's indices
  std::vector<size_t> unit_numbers;        // ZeRO-3 only: units[b]'s BlockHooks number (the rest has none)
  // Gradient buckets: units when given, else buckets of bucket_bytes.
  BucketLayout layout(const std::vector<int64_t>& group_numels, int64_t bucket_bytes, int ranks) const;
};
std::vector<ReduceGroup> reduce_groups(size_t params, const std::vector<std::vector<size_t>>& chunks,
                                       const UnitLayout& units, int64_t zero_stage);

struct ParallelStateOptions {
  // The data-parallel group (not owned; must outlive the state). Null or size 1:
  // this process alone.
  Communicator* data_parallel = nullptr;
  c10::Device device{c10::kCPU};  // where parameters, gradients and control tensors live
  int64_t bucket_bytes = 25 << 20;
  int64_t zero_stage = 0;        // 0-3: what is sharded over the data-parallel group (above)
  int64_t expert_parallel = 1;   // ranks per EP group (1: off)
  int64_t num_experts = 0;       // routed experts per MoE layer (0: the model has none)
};

// The elements of one parameter a rank's optimizer owns: [begin, end) of it flattened.
using ShardRanges = std::map<std::string, std::pair<int64_t, int64_t>>;

class ParallelState {
 public:
  // Validates the layout against the group and the model (each failure names the
  // recipe key) and makes the EP groups; attach() completes it.
  explicit ParallelState(ParallelStateOptions options);
  ~ParallelState();
  ParallelState(const ParallelState&) = delete;
  ParallelState& operator=(const ParallelState&) = delete;

  // The EP group the model's MoE layers dispatch over (null when off).
  Communicator* expert_group() const { return ep_group_.get(); }
  // Every rank's `tensors` become rank 0's (weights and buffers at start-up).
  void broadcast_from_main(const std::vector<torch::Tensor>& tensors) const;
  // The trainable parameters, after the model's experts were sliced for this rank;
  // `expert_slices`: the names of those sliced on dim 0 over the EP group. `units`:
  // ZeRO-3's units (indices into `params`). `chunks`: with a chunked pipeline
  // schedule, the indices of each of this rank's chunks' parameters.
  void attach(NamedParams params, const std::vector<std::string>& expert_slices, const UnitLayout& units = {},
              const std::vector<std::vector<size_t>>& chunks = {});

  int size() const { return options_.data_parallel ? options_.data_parallel->size() : 1; }
  int rank() const { return options_.data_parallel ? options_.data_parallel->rank() : 0; }
  bool sharded() const { return !reducers_.empty() && reducers_.front()->sharded(); }
  // ZeRO-3 on several ranks: the blocks' sharded parameters of reduce group `group`
  // (one per chunk with a chunked pipeline schedule, else one); null otherwise.
  ShardedParameters* sharded_parameters(size_t group = 0) const {
    return group < zero3_.size() ? zero3_[group].get() : nullptr;
  }
  size_t reduce_group_count() const { return reducers_.size(); }
  // The ZeRO-3 unit of BlockHooks number j: its group's sharded parameters and the
  // unit there (the numbers with parameters here, counted in order); {null, -1} when
  // it has none here (another pipeline stage's) or ZeRO-3 is off.
  struct BlockUnit {
    ShardedParameters* units = nullptr;
    int64_t unit = -1;
  };
  BlockUnit unit_of_block(int64_t block) const;
  // ZeRO-3: every parameter whole (collective), for checkpoints, loading weights and
  // callers of the model after training; release_weights() frees the blocks again,
  // after taking the owned elements from the parameters when they were `changed`.
  // No-ops at other stages.
  void gather_weights();
  void release_weights(bool changed);
  Communicator* data_parallel() const { return options_.data_parallel; }

  // `t` (on the device) summed over the data-parallel group, in place; alone: unchanged.
  void sum_over_ranks(torch::Tensor& t) const;

  // Around each micro-batch's backward. `last`: the step's last, whose gradients
  // are reduced during backward; the others are only accumulated (in the canonical
  // order of parallel/ordered_sum.h).
  void begin_micro_batch(bool last);
  void end_micro_batch(bool last);
  // The same for a backward that reached only the parameters of attach's
  // chunks[chunk]. `last`: the rank's last backward of the step; `chunk_last`: the
  // chunk's last (a chunk's micro-batches run in order). Just the chunk's gradients
  // are set aside or reduced, so each parameter's sum keeps one term per micro-batch.
  // `deferred`: parameters whose gradients a split backward left for a W step (ZeRO
  // 0 and 1 only); end_deferred() sets theirs aside once the W step made them.
  void begin_chunk_backward(size_t chunk, bool last);
  void end_chunk_backward(size_t chunk, bool last, bool chunk_last, const std::vector<size_t>& deferred = {});
  void end_deferred(const std::vector<size_t>& params);
  // After the last backward: gradients summed over the ranks.
  ReduceStats finish_gradients();
  // The squared L2 norm of the summed gradients, float64 [1] on the device; a
  // collective with ZeRO-1 or expert parallelism. No host read.
  torch::Tensor grad_square_norm() const;

  // What the optimizer updates: whole parameters, or (ZeRO-1) flat views of the
  // elements this rank owns. begins[i]: where pieces[i] starts in its flattened
  // parameter (an EP slice starts at its rank's place in the whole tensor);
  // param[i]: its index in the attached parameters.
  struct OptimizerPieces {
    NamedParams pieces;
    std::vector<int64_t> begins;
    std::vector<size_t> param;
  };
  OptimizerPieces optimizer_pieces() const;
  // The gradients of those pieces, in the same order (undefined: no gradient).
  std::vector<torch::Tensor> optimizer_gradients() const;
  // After the optimizer step. ZeRO-1: all-gathers the owned elements so every rank
  // holds every parameter again.
  void after_update();

  // Checkpoints hold whole tensors: a tensor's shape there, and an expert slice
  // joined over the EP group (collective).
  bool is_expert_slice(const std::string& name) const { return expert_slices_.contains(name); }
  std::vector<int64_t> full_shape(const std::string& name, const torch::Tensor& tensor) const;
  torch::Tensor gather_experts(const torch::Tensor& slice) const;
  // This rank's slice of a whole expert tensor.
  torch::Tensor expert_slice(const torch::Tensor& whole) const;
  // ZeRO-1: the elements every rank's optimizer owns, by rank.
  std::vector<ShardRanges> shard_ranges() const;
  void barrier() const;

 private:
  int ep_rank() const { return ep_group_ ? ep_group_->rank() : 0; }

  ParallelStateOptions options_;
  std::unique_ptr<Communicator> ep_group_, expert_replicas_;  // null when EP is off
  NamedParams params_;
  std::set<std::string> expert_slices_;
  std::unique_ptr<MicroBatchGradients> micro_grads_;
  void add_micro_stats(const ReduceStats& stats);
  // Whether this step's last backward began (its reducers reducing during it): not
  // when W steps end the step, and finish_gradients() then reduces everything.
  bool last_begun_ = false;
  // The reducer of chunk `chunk`'s dense parameters (ZeRO-2/3 with chunks), else the one.
  GradientReducer* chunk_reducer(size_t chunk) const;

  // Data parallel: the dense parameters (all but the expert slices), one reducer per
  // reduce group; group g's parameter k is params_[group_index_[g][k]].
  std::vector<std::unique_ptr<GradientReducer>> reducers_;
  std::vector<std::vector<size_t>> group_index_;
  std::unique_ptr<GradientReducer> expert_reducer_;  // expert slices over the expert replicas
  std::vector<torch::Tensor> shard_grads_;           // ZeRO: the owned pieces' summed gradients
  std::vector<std::unique_ptr<ShardedParameters>> zero3_;  // ZeRO-3 on several ranks: per reduce group
  std::vector<std::pair<int64_t, int64_t>> block_unit_;    // block -> (group, unit); (-1, -1): none here
  std::vector<size_t> dense_index_, expert_index_;   // the attached parameters by kind
  std::vector<std::vector<size_t>> chunks_;          // attach's chunks (empty: one)
  ReduceStats micro_stats_;                          // ZeRO-2/3: summed over the step's micro-batches
  BucketLayout layout_;                              // alone: the buckets a reducer would use
};

}  // namespace brigade::parallel
