// Cross-entropy summed over the trained targets, without a float32 copy of the
// whole logits tensor.
//
// The plain form, cross_entropy(logits.float(), targets), holds two [tokens, vocab]
// float32 tensors through backward (the widened logits and the log-softmax saved for
// the gradient): with a 128K vocabulary and 16K tokens per micro-batch that is 16 GiB
// beside the bfloat16 logits' 4 GiB. Here the rows are taken a chunk at a time: the
// forward keeps only each row's log-sum-exp ([tokens] float32), and the backward
// recomputes each chunk's softmax from the logits the graph already holds, writing
// the gradient straight into the logits' dtype. The largest float32 temporary is one
// chunk (`chunk_bytes`), and each row's value and gradient do not depend on the
// chunking (the reductions run along a row).
#pragma once

#include <cstdint>

#include <torch/types.h>

namespace brigade::trainer {

// logits: [tokens, vocab] (float32, bfloat16 or float16; computed in at least
// float32); targets: [tokens] int64, `ignore_index` where nothing is trained. Returns
// the float32 scalar sum over trained rows of logsumexp(row) - row[target]; the
// gradient flows to `logits`.
torch::Tensor chunked_cross_entropy_sum(const torch::Tensor& logits, const torch::Tensor& targets,
                                        int64_t ignore_index, int64_t chunk_bytes = 64 << 20);

}  // namespace brigade::trainer
