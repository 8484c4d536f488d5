// Token permutation. Each token sends top_k copies to experts; the copies are
// sorted by expert into one contiguous buffer so expert e owns rows
// [offsets[e], offsets[e] + counts[e]) and runs as one GEMM per weight (no per-token
// loops). Each row carries its routing weight (row_weights()); the experts apply it
// (see experts.h), and unpermute() sums each token's weighted rows back into place.
// Gradients flow to the tokens, the expert outputs and the weights.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/types.h>

#include "moe/options.h"

namespace brigade::moe {

struct DispatchPlan {
  torch::Tensor copy;    // [rows] int64: flat index (token * top_k + slot) of each sorted row
  torch::Tensor token;   // [rows] int64: source token of each sorted row
  std::vector<int64_t> counts;   // [experts] rows per expert after any drops (host: GEMM sizes)
  std::vector<int64_t> offsets;  // [experts + 1] exclusive prefix sum of counts
  torch::Tensor routed;  // [experts] int64: copies routed to each expert before drops (load)
  int64_t tokens = 0;
  int64_t dropped = 0;   // copies over capacity, not computed
  int64_t rows() const { return offsets.empty() ? 0 : offsets.back(); }
};

// Per-expert capacity when dropping: ceil(capacity_factor * tokens * top_k / experts).
int64_t expert_capacity(const MoEOptions& options, int64_t tokens);

// indices/weights: [tokens, top_k]. capacity < 0: dropless. The weights decide
// which copies survive under DropPolicy::kProbs.
DispatchPlan plan_dispatch(const torch::Tensor& indices, const torch::Tensor& weights, int64_t num_experts,
                           int64_t capacity, DropPolicy policy);

// x: [tokens, d] -> [rows, d] sorted by expert.
torch::Tensor permute(const torch::Tensor& x, const DispatchPlan& plan);
// weights: [tokens, top_k] -> [rows], the routing weight of each sorted row.
torch::Tensor row_weights(const torch::Tensor& weights, const DispatchPlan& plan);
// y: [rows, d] (already weighted) -> [tokens, d], each token the sum of its kept rows.
torch::Tensor unpermute(const torch::Tensor& y, const DispatchPlan& plan);

}  // namespace brigade::moe
