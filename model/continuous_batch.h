// Continuous batching: sequences join and leave one running decode batch between
// steps, as llama.cpp's server and vLLM schedule requests. A sequence that joins is
// prefilled alone (its first token comes from its own prompt's logits), left-padded
// like generate_batch's rows so that its prompt ends at the batch's position, and
// its KV cache row is added to the batch's; each step decodes one token for every
// running sequence. Every sequence keeps its own sampling options and random
// stream, so its tokens are those generate() gives it alone (up to the rounding of
// a batched matrix product).
//
// Positions are shared by the batch (RoPE makes attention depend on relative
// positions only, and cached keys keep the positions they were rotated at), so the
// batch's position grows by one per step while any sequence runs. A sequence joins
// when its prompt is no longer than that position and the batch still fits
// model.max_seq_len for every sequence's remaining budget; otherwise it waits (a
// longer prompt for a few steps; a budget past the context until enough of the
// batch has finished, at worst until the batch is empty and the positions start
// again at 0). The queue is first come, first served. Not thread-safe: one thread
// drives it.
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include <torch/torch.h>

#include "model/generate.h"
#include "model/kv_cache.h"
#include "model/transformer.h"

namespace brigade::model {

// What one step gave one sequence.
struct DecodedToken {
  int64_t sequence = 0;         // the id add() returned
  int64_t token = 0;
  bool finished = false;        // the sequence's last token: a stop id (stopped) or its budget or the context
  bool stopped = false;         // finished on one of its stop ids
  torch::Tensor topk_ids;       // [logprobs] int32 when the sequence asked for log-probabilities
  torch::Tensor topk_logprobs;  // [logprobs] float32, descending
};

class ContinuousBatch {
 public:
  // max_rows: sequences decoded together at most; more wait in the queue.
  ContinuousBatch(Transformer model, int64_t max_rows);

  // Queues a sequence and returns its id. The prompt must be non-empty, inside the
  // vocabulary, and leave room in model.max_seq_len for options.max_new_tokens
  // (checked here: an Error names the numbers).
  int64_t add(std::vector<int64_t> prompt, const SamplingOptions& options, uint64_t seed);
  // Drops a sequence, queued or running (a client that went away).
  void cancel(int64_t sequence);
  // Admits what fits from the queue (each prefilled alone), then decodes one token
  // for every sequence that was already running. Every running sequence gets
  // exactly one token per step; a finished one leaves the batch.
  std::vector<DecodedToken> step();

  bool idle() const { return running_.empty() && queue_.empty(); }
  int64_t running() const { return static_cast<int64_t>(running_.size()); }
  int64_t queued() const { return static_cast<int64_t>(queue_.size()); }
  // The batch cache's positions (0 when nothing runs).
  int64_t length() const { return cache_.length; }

 private:
  struct Sequence {
    int64_t id = 0;
    std::vector<int64_t> prompt;
    SamplingOptions options;
    torch::Generator generator;
    int64_t produced = 0;   // tokens sampled so far
    int64_t pending = 0;    // the last sampled token, fed at the next step
  };

  // The room a running sequence still needs in the cache: one position per token it
  // may still sample.
  static int64_t remaining(const Sequence& s) { return s.options.max_new_tokens - s.produced; }
  bool fits(const Sequence& s) const;
  DecodedToken sample(Sequence& s, const torch::Tensor& logits);
  void join(Sequence s, KVCache row);
  void keep_rows(const std::vector<int64_t>& rows);

  Transformer model_;
  int64_t max_rows_;
  int64_t max_seq_len_;
  torch::Device device_;
  int64_t next_id_ = 0;
  std::deque<Sequence> queue_;
  std::vector<Sequence> running_;  // batch row order
  KVCache cache_;                  // rows = running_; valid defined once rows are padded
};

}  // namespace brigade::model
