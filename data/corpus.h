// A token corpus: one logical token stream (with an optional loss mask) made of
// shards and/or in-memory segments, read by windows that may cross segment
// boundaries.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <vector>

#include "data/shard.h"

namespace brigade::data {

class TokenCorpus {
 public:
  TokenCorpus() = default;
  // Opens and validates every shard (an Error names the first bad one).
  static TokenCorpus from_shards(const std::vector<std::filesystem::path>& paths);
  // mask: empty (every token trains) or one 0/1 per token.
  static TokenCorpus from_tokens(std::vector<int64_t> tokens, std::vector<uint8_t> mask = {});

  int64_t size() const { return total_; }
  // Highest token id + 1 the corpus may contain (the shards' vocab_size; for
  // in-memory tokens, max id + 1).
  int64_t vocab_bound() const { return vocab_bound_; }
  // Copies tokens [start, start+len) into out_tokens and the loss mask (1 = train on
  // it) into out_mask. Requires 0 <= start and start+len <= size().
  void read(int64_t start, int64_t len, int64_t* out_tokens, uint8_t* out_mask) const;
  // The tokens [begin, end) as a corpus sharing this one's storage (for train/eval splits).
  TokenCorpus slice(int64_t begin, int64_t end) const;

 private:
  struct Segment {
    std::shared_ptr<const Shard> shard;                 // either a shard ...
    std::shared_ptr<const std::vector<int64_t>> tokens;  // ... or memory
    std::shared_ptr<const std::vector<uint8_t>> mask;   // memory mask (may be empty)
    int64_t offset = 0;  // first token of this segment within its storage
    int64_t length = 0;
  };
  std::vector<Segment> segments_;
  std::vector<int64_t> starts_;  // starts_[i] = corpus position of segments_[i]
  int64_t total_ = 0;
  int64_t vocab_bound_ = 0;
};

}  // namespace brigade::data
