#include "data/sampler.h"

#include <vector>

#include <torch/torch.h>

#include "core/error.h"
#include "core/hash.h"

namespace brigade::data {

BatchSampler::BatchSampler(TokenCorpus corpus, SamplerOptions options)
    : corpus_(std::move(corpus)), options_(options) {
  BRIGADE_CHECK(options_.seq_len >= 1, "sampler: seq_len must be >= 1, got ", options_.seq_len);
  BRIGADE_CHECK(options_.micro_batch_size >= 1, "sampler: micro_batch_size must be >= 1, got ",
                options_.micro_batch_size);
  BRIGADE_CHECK(options_.micro_batches >= 1, "sampler: micro_batches must be >= 1, got ", options_.micro_batches);
  BRIGADE_CHECK(options_.world_size >= 1, "sampler: world_size must be >= 1, got ",
                options_.world_size);
  BRIGADE_CHECK(options_.rank >= 0 && options_.rank < options_.world_size, "sampler: rank ",
                options_.rank, " is outside [0, ", options_.world_size, ")");
  BRIGADE_CHECK(corpus_.size() >= options_.seq_len + 1, "sampler: the corpus has ", corpus_.size(),
                " tokens, but seq_len ", options_.seq_len, " needs at least ", options_.seq_len + 1);
  BRIGADE_CHECK((options_.document_start < 0 && options_.document_end < 0) || corpus_.size() % (options_.seq_len + 1) == 0,
                "sampler: packed rows need a corpus of whole rows of seq_len + 1 = ", options_.seq_len + 1,
                " tokens, but it has ", corpus_.size(), " tokens (built for another data.seq_len?)");
}

Batch BatchSampler::batch(int64_t step, int64_t micro) const {
  BRIGADE_ASSERT(micro >= 0 && micro < options_.micro_batches, "micro-batch ", micro, " of ", options_.micro_batches);
  const int64_t rows = options_.micro_batch_size;
  const int64_t T = options_.seq_len;
  // Windows of T+1 tokens start at 0 .. size-T-1 (packed: at whole rows).
  const bool packed = options_.document_start >= 0 || options_.document_end >= 0;
  const auto starts = static_cast<uint64_t>(packed ? corpus_.size() / (T + 1) : corpus_.size() - T);

  Batch batch;
  batch.inputs = torch::empty({rows, T}, torch::kInt64);   // [micro_batch, seq_len]
  batch.targets = torch::empty({rows, T}, torch::kInt64);  // [micro_batch, seq_len]
  int64_t* inputs = batch.inputs.data_ptr<int64_t>();
  int64_t* targets = batch.targets.data_ptr<int64_t>();
  batch.offsets = torch::empty({rows}, torch::kInt64);  // [micro_batch]
  int64_t* offsets = batch.offsets.data_ptr<int64_t>();
  int64_t* segments = nullptr;
  if (packed) {
    batch.segments = torch::empty({rows, T}, torch::kInt64);
    segments = batch.segments.data_ptr<int64_t>();
  }

  std::vector<int64_t> window(static_cast<size_t>(T + 1));
  std::vector<uint8_t> mask(static_cast<size_t>(T + 1));
  for (int64_t row = 0; row < rows; ++row) {
    uint64_t h = options_.seed;
    h = hash_combine(h, static_cast<uint64_t>(step));
    // Rows are numbered across the step (rank r's micro-batch m holds rows
    // (r * micro_batches + m) * b ..), so N ranks x b rows, 1 rank x N*b rows and
    // 1 rank x N micro-batches of b see the same rows. (The two zeros keep the
    // stream of single-rank runs without accumulation unchanged from before.)
    h = hash_combine(h, 0);
    h = hash_combine(h, 0);
    h = hash_combine(h, static_cast<uint64_t>((options_.rank * options_.micro_batches + micro) * rows + row));
    const auto offset = static_cast<int64_t>(h % starts) * (packed ? T + 1 : 1);
    offsets[row] = offset;
    corpus_.read(offset, T + 1, window.data(), mask.data());
    int64_t* in = inputs + row * T;
    int64_t* tg = targets + row * T;
    for (int64_t t = 0; t < T; ++t) {
      in[t] = window[t];
      // The mask belongs to the token being predicted.
      if (mask[t + 1]) {
        tg[t] = window[t + 1];
        ++batch.trained_tokens;
      } else {
        tg[t] = kIgnoreIndex;
      }
    }
    if (packed) {
      int64_t document = -1;
      for (int64_t t = 0; t < T; ++t) {
        if (t == 0 || window[t] == options_.document_start ||
            (options_.document_end >= 0 && window[t - 1] == options_.document_end))
          ++document;
        segments[row * T + t] = document;
      }
    }
  }
  return batch;
}

}  // namespace brigade::data
