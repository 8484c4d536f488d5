// The deterministic, rank-aware batch sampler. The batch for (step, micro-batch,
// rank) depends only on (seed, step, micro, rank): no hidden cursor, so a resumed
// run sees exactly the batches it would have seen.
#pragma once

#include <cstdint>

#include <torch/types.h>

#include "data/corpus.h"

namespace brigade::data {

inline constexpr int64_t kIgnoreIndex = -100;  // target ids the loss skips

struct SamplerOptions {
  int64_t seq_len = 128;          // tokens per row
  int64_t micro_batch_size = 8;   // rows per micro-batch per rank
  int64_t micro_batches = 1;      // micro-batches per step per rank (gradient accumulation)
  uint64_t seed = 0;
  int rank = 0;                   // this rank's index in the data-parallel group
  int world_size = 1;
  // Packed documents (supervised fine-tuning data from `brigade distill`): the
  // corpus is rows of exactly seq_len + 1 tokens, each holding whole documents
  // that start with `document_start` (BOS) and are padded at the end; batches
  // take whole rows, and each position's document index is in Batch::segments
  // so attention stays inside a document. -1: one continuous stream.
  int64_t document_start = -1;
  // The same for tokenizers without a BOS convention (Qwen): a document ends with
  // `document_end` (EOS) and the next one starts after it. -1: not used.
  int64_t document_end = -1;
};

struct Batch {
  torch::Tensor inputs;   // [micro_batch, seq_len] int64
  torch::Tensor targets;  // [micro_batch, seq_len] int64; kIgnoreIndex where the mask is 0
  int64_t trained_tokens = 0;  // targets that are not kIgnoreIndex
  torch::Tensor segments; // [micro_batch, seq_len] int64 document index within the row (packed rows only)
  // [micro_batch] int64: where each row's window starts in the corpus (inputs[r][t]
  // is corpus token offsets[r] + t), so per-token side data aligned with the corpus
  // (the teacher's top-k for logit distillation) can be gathered for the batch.
  torch::Tensor offsets;
};

class BatchSampler {
 public:
  // The corpus must hold at least seq_len + 1 tokens (an Error says how many it has).
  BatchSampler(TokenCorpus corpus, SamplerOptions options);
  // Rows are windows of seq_len+1 tokens at offsets drawn from hash(seed, step,
  // global row); inputs are the first seq_len tokens, targets the last seq_len.
  // Global row = (rank * micro_batches + micro) * micro_batch_size + row: a step's
  // rows are the same for any split into ranks and micro-batches.
  Batch batch(int64_t step, int64_t micro) const;
  const SamplerOptions& options() const { return options_; }
  const TokenCorpus& corpus() const { return corpus_; }

 private:
  TokenCorpus corpus_;
  SamplerOptions options_;
};

}  // namespace brigade::data
