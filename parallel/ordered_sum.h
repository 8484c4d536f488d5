// Sums whose bits do not depend on how the terms are spread over ranks and
// micro-batches, so that N ranks, M ranks and one process reach the same weights
// bit for bit (docs/distributed.md: "Reproducible across rank counts").
//
// Float32 addition is not associative: (a + b) + c and a + (b + c) differ in the
// last bits, and AdamW amplifies such differences where gradients are small.
// MPI's and NCCL's all-reduce add the ranks' buffers in an order of their own that
// changes with the number of ranks, and autograd accumulates micro-batches left
// to right. brigade fixes one order instead: the terms of a step are the
// gradients of its G = ranks x accumulation micro-batches, numbered by global
// micro-batch g = rank * accum + micro, and they are added as a binary counter
// counts: each new term is pushed, two partial sums that cover the same number
// of terms are merged (left + right), and what is left at the end is folded from
// the right (B0 + (B1 + (... + Bk))). When accum is a power of two, a rank's
// local sum is exactly one complete block of that counter, and adding the ranks'
// blocks in rank order with the same counter gives the bits of G terms added in
// one process: the decomposition that makes resharded runs bitwise.
//
// The gradient norm is made the same way: squares are summed in float64 over
// fixed blocks of kNormBlock elements of the gradient buckets (ZeRO shards start
// on block boundaries), and the block sums, in bucket order, are added by a fixed
// pairwise tree on the device (tree_sum), so the norm needs no host read.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/types.h>

namespace brigade::parallel {

class PairwiseSum {
 public:
  // Adds the next term. The sum takes the tensor over and adds into it in place,
  // so the caller must not use it afterwards. An undefined tensor is a term of
  // zeros (it changes no bit of the sum).
  void add(torch::Tensor term);
  // The sum of every term added so far, in the canonical order (undefined when
  // every term was); the sum is empty again afterwards.
  torch::Tensor take();
  int64_t terms() const { return terms_; }

 private:
  struct Block {
    int64_t terms = 0;
    torch::Tensor sum;  // undefined: all zeros
  };
  static Block merge(Block left, Block right);
  std::vector<Block> stack_;  // covered terms strictly decreasing from bottom to top
  int64_t terms_ = 0;
};

// Each parameter's gradient summed over a step's micro-batches in the canonical
// order (autograd alone would add them left to right).
class MicroBatchGradients {
 public:
  explicit MicroBatchGradients(std::vector<torch::Tensor> params);
  // After a backward that is not the step's last: every parameter's .grad moves
  // into its sum (the .grad is undefined afterwards, so the next backward writes
  // a fresh one).
  void stash();
  // The same for the parameters at `indices` alone (ZeRO-2's experts: the dense
  // gradients are reduced every micro-batch).
  void stash(const std::vector<size_t>& indices);
  // Parameter i's .grad becomes the sum of its stashed gradients and its current
  // .grad. Does nothing when nothing was stashed (one micro-batch per step, or
  // already finished this step).
  void finish(size_t i);
  void finish_all();

 private:
  std::vector<torch::Tensor> params_;
  std::vector<PairwiseSum> sums_;
};

// Elements per gradient-norm block; ZeRO shards are multiples of it.
inline constexpr int64_t kNormBlock = 4096;

// flat: [k * kNormBlock] float32, contiguous -> [k] float64, the sum of squares of
// each block, always added in the same order within a block (eight float64
// lanes, then a fixed tree), so a block's value depends only on its elements.
torch::Tensor block_squares(const torch::Tensor& flat);

// values: [n] float64 -> [1] float64 on the same device: adjacent pairs added level
// by level (an odd level's last value paired with 0), so the result depends only on
// the values and their order, on any device and for any thread count.
torch::Tensor tree_sum(const torch::Tensor& values);

}  // namespace brigade::parallel
