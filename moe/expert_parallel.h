// Expert parallelism (DeepSeek-V3 / Megatron-Core EP): the routed experts of a layer
// are spread over the ranks of an expert-parallel group of size P, rank j owning
// the E/P global experts [j*E/P, (j+1)*E/P). Every rank routes its own tokens;
// dispatch() sends each token copy to the rank owning its expert and combine()
// brings the expert outputs back.
//
//   source rank s: rows sorted by global expert (permute()), so the rows for rank j
//                  are one contiguous run: those of experts [j*E/P, (j+1)*E/P)
//   dispatch:      counts all_to_all ([P, E/P] int64), then rows and routing weights
//                  all_to_all; rank j receives [source][local expert] blocks and
//                  reorders them to [local expert][source] for the grouped GEMM
//   combine:       the inverse: [local expert][source] -> [source][local expert],
//                  all_to_all back; rank s gets its rows in its own sorted order
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
  int64_t local_experts = 0;          // E / P
  std::vector<int64_t> send_rows;     // [P] rows this rank sends to each rank
  std::vector<int64_t> recv_rows;     // [P] rows this rank receives from each rank
  std::vector<int64_t> local_counts;  // [E / P] rows of each local expert, over all sources (GEMM sizes)
  torch::Tensor recv_counts;          // [P, E / P] int64 (CPU): rows from source s for local expert e
  // Gathers of the received rows: to_expert_major[i] is the source-major row that
  // becomes expert-major row i, to_source_major its inverse. Both undefined when the
  // two orders coincide (P = 1, E / P = 1, or no expert fed by two sources).
  torch::Tensor to_expert_major;      // [received] int64
  torch::Tensor to_source_major;      // [received] int64
  int64_t sent() const;
  int64_t received() const;
};

// The layout from this rank's rows per global expert (counts [E]) and what every
// source sends here (recv_counts [P, E / P]): exchange_counts() without the
// exchange, so it is testable on one process.
ExpertParallelLayout make_layout(const std::vector<int64_t>& counts, const torch::Tensor& recv_counts);

// Collective: exchanges the counts over `ep` and returns the layout. counts: [E]
// rows per global expert on this rank; E must be a multiple of ep.size().
ExpertParallelLayout exchange_counts(parallel::Communicator& ep, const std::vector<int64_t>& counts);

struct Dispatched {
  torch::Tensor rows;     // [received, d]: rows for this rank's experts, grouped by local expert
  torch::Tensor weights;  // [received]: their routing weights
  ExpertParallelLayout layout;
};

// rows: [sent, d] sorted by global expert with `counts` ([E]) rows per expert;
// weights: [sent] routing weight of each row. Differentiable in rows and weights.
// fp8: the rows travel as E4M3 codes + 1x128 scales (rows: float32 or bfloat16, CPU).
Dispatched dispatch(parallel::Communicator& ep, const torch::Tensor& rows, const torch::Tensor& weights,
                    const std::vector<int64_t>& counts, bool fp8);

// rows: [received, d] expert outputs in dispatch order -> [sent, d] in the source's
// sorted order. Differentiable.
torch::Tensor combine(parallel::Communicator& ep, const torch::Tensor& rows, const ExpertParallelLayout& layout);

}  // namespace brigade::moe
