// Expert parallelism (DeepSeek-V3 / Megatron-Core EP): the routed experts of a layer
// are spread over the ranks of an expert-parallel group of size P, rank j owning
// the L = E/P global experts [j*L, (j+1)*L) (local expert e of rank j is global
// expert j*L + e). Every rank routes its own tokens; dispatch() sends each token
// copy to the rank owning its expert and combine() brings the expert outputs back.
//
//   counts:   one all_to_all of int64 [P, L] counts: what each rank gets from whom
//   dispatch: rows and routing weights, in L rounds: round e is an all_to_all of
//             the rows of every rank's local expert e; rank j receives them from
//             sources 0..P-1 in order, right after those of its expert e-1, so its
//             rows arrive grouped by local expert (expert-major, then by source),
//             ready for the grouped GEMM
//   combine:  the same rounds backwards; each source gets its rows back in the
//             order it sent them
//
// The rows a source sends must be in expert-parallel order: by local expert index,
// then by owning rank (sort key e*P + j for global expert j*L + e;
// expert_parallel_keys()), so that round e's rows for every rank are one
// contiguous run. Then every message goes straight from the sender's tensor into
// the receiver's (no reorder copy on either side). plan_dispatch() over those keys
// gives that order and the per-key counts.
//
// Both are autograd functions: the backward of dispatch is a combine of the
// gradients and the backward of combine a dispatch. With fp8 the forward dispatch
// sends E4M3 codes with one float32 scale per row and 128 columns (the 1x128 tiles
// of precision/quantize.h) instead of the activations, dequantized on receipt; the
// gradients and combine stay in the activation dtype (DeepSeek-V3: FP8 dispatch,
// BF16 combine), so the input's gradient is the straight-through one.
//
// These are collectives over the group: every rank calls them in the same order,
// also with no rows to send. The communicator must outlive the autograd graph.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/types.h>

#include "parallel/communicator.h"

namespace brigade::moe {

// Who sends how many rows to whom in one dispatch; combine() reverses it.
struct ExpertParallelLayout {
  int64_t local_experts = 0;          // L = E / P
  torch::Tensor send_counts;          // [L, P] int64 (CPU): rows this rank sends for local expert e to rank j
  torch::Tensor recv_counts;          // [L, P] int64 (CPU): rows it receives for its expert e from rank s
  std::vector<int64_t> send_rows;     // [P] rows this rank sends to each rank
  std::vector<int64_t> recv_rows;     // [P] rows it receives from each rank
  std::vector<int64_t> local_counts;  // [L] rows of each local expert, over all sources (GEMM sizes)
  int64_t sent() const;
  int64_t received() const;
};

// Sort keys of the expert-parallel order: global expert j*L + e -> e*P + j.
// experts: int64 global expert indices (any shape); num_experts a multiple of ranks.
torch::Tensor expert_parallel_keys(const torch::Tensor& experts, int64_t num_experts, int64_t ranks);
// A per-key vector ([E], e.g. loads counted over keys) back in global expert order.
torch::Tensor global_expert_order(const torch::Tensor& per_key, int64_t ranks);

// The layout from this rank's rows per key (counts [E] in expert-parallel order)
// and what every source sends here (recv_counts [L, P]): exchange_counts() without
// the exchange, so it is testable on one process.
ExpertParallelLayout make_layout(const std::vector<int64_t>& counts, const torch::Tensor& recv_counts);

// Collective: exchanges the counts over `ep` and returns the layout. counts: [E]
// rows per key on this rank; E must be a multiple of ep.size().
ExpertParallelLayout exchange_counts(parallel::Communicator& ep, const std::vector<int64_t>& counts);

struct Dispatched {
  torch::Tensor rows;     // [received, d]: rows for this rank's experts, grouped by local expert
  torch::Tensor weights;  // [received]: their routing weights
  ExpertParallelLayout layout;
};

// rows: [sent, d] in expert-parallel order with `counts` ([E]) rows per key;
// weights: [sent] routing weight of each row. Differentiable in rows and weights.
// fp8: the rows travel as E4M3 codes + 1x128 scales (rows: float32 or bfloat16, CPU).
Dispatched dispatch(parallel::Communicator& ep, const torch::Tensor& rows, const torch::Tensor& weights,
                    const std::vector<int64_t>& counts, bool fp8);

// rows: [received, d] expert outputs in dispatch order -> [sent, d] in the source's
// sorted order. Differentiable.
torch::Tensor combine(parallel::Communicator& ep, const torch::Tensor& rows, const ExpertParallelLayout& layout);

}  // namespace brigade::moe
