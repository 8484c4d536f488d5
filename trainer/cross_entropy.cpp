#include "trainer/cross_entropy.h"

#include <algorithm>

#include <torch/torch.h>

#include "core/error.h"

namespace brigade::trainer {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

c10::ScalarType compute_type(const torch::Tensor& logits) {
  return logits.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
}

int64_t rows_per_chunk(const torch::Tensor& logits, int64_t chunk_bytes) {
  const int64_t row_bytes = logits.size(1) * static_cast<int64_t>(c10::elementSize(compute_type(logits)));
  return std::max<int64_t>(1, chunk_bytes / std::max<int64_t>(1, row_bytes));
}

struct ChunkedCrossEntropy : torch::autograd::Function<ChunkedCrossEntropy> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& logits, const torch::Tensor& targets,
                               int64_t ignore_index, int64_t chunk_bytes) {
    const auto type = compute_type(logits);
    const int64_t rows = logits.size(0), step = rows_per_chunk(logits, chunk_bytes);
    const auto trained = targets.ne(ignore_index);                     // [tokens] bool
    const auto safe = torch::where(trained, targets, torch::zeros_like(targets));  // gather needs a valid index
    auto lse = torch::empty({rows}, logits.options().dtype(type));     // [tokens]
    auto picked = torch::empty({rows}, logits.options().dtype(type));  // [tokens]: row[target]
    for (int64_t begin = 0; begin < rows; begin += step) {
      const int64_t n = std::min(step, rows - begin);
      const auto chunk = logits.narrow(0, begin, n).to(type);  // [n, vocab]
      lse.narrow(0, begin, n).copy_(chunk.logsumexp(-1));
      picked.narrow(0, begin, n).copy_(chunk.gather(1, safe.narrow(0, begin, n).unsqueeze(1)).squeeze(1));
    }
    ctx->save_for_backward({logits, safe, trained, lse});
    ctx->saved_data["chunk_bytes"] = chunk_bytes;
    return torch::where(trained, lse - picked, torch::zeros_like(lse)).sum().to(torch::kFloat);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &logits = saved[0], &safe = saved[1], &trained = saved[2], &lse = saved[3];
    const auto type = compute_type(logits);
    const int64_t rows = logits.size(0), step = rows_per_chunk(logits, ctx->saved_data["chunk_bytes"].toInt());
    // d(sum)/d(logit) = g * (softmax(row) - onehot(target)) on trained rows, 0 elsewhere.
    const auto scale = grads[0].to(type) * trained.to(type);  // [tokens]
    auto out = torch::empty_like(logits);
    for (int64_t begin = 0; begin < rows; begin += step) {
      const int64_t n = std::min(step, rows - begin);
      auto p = (logits.narrow(0, begin, n).to(type) - lse.narrow(0, begin, n).unsqueeze(1)).exp_();  // [n, vocab]
      p.scatter_add_(1, safe.narrow(0, begin, n).unsqueeze(1), -torch::ones({n, 1}, p.options()));
      p.mul_(scale.narrow(0, begin, n).unsqueeze(1));
      out.narrow(0, begin, n).copy_(p);
    }
    return {out, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor chunked_cross_entropy_sum(const torch::Tensor& logits, const torch::Tensor& targets,
                                        int64_t ignore_index, int64_t chunk_bytes) {
  BRIGADE_ASSERT(logits.dim() == 2 && targets.dim() == 1 && targets.size(0) == logits.size(0),
                 "chunked_cross_entropy_sum takes [tokens, vocab] logits and [tokens] targets, got ", logits.sizes(),
                 " and ", targets.sizes());
  BRIGADE_ASSERT(chunk_bytes > 0, "chunk_bytes must be positive");
  return ChunkedCrossEntropy::apply(logits, targets, ignore_index, chunk_bytes);
}

}  // namespace brigade::trainer
