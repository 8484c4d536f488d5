#include "data/corpus.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace brigade::data {

TokenCorpus TokenCorpus::from_shards(const std::vector<std::filesystem::path>& paths) {
  BRIGADE_CHECK(!paths.empty(), "token corpus: no shard files given");
  TokenCorpus corpus;
  for (const auto& path : paths) {
    auto shard = std::make_shared<const Shard>(path);
    corpus.vocab_bound_ = std::max<int64_t>(corpus.vocab_bound_, shard->header().vocab_size);
    if (shard->size() == 0) continue;  // a segment of length 0 would only slow the search
    Segment segment;
    segment.length = shard->size();
    segment.shard = std::move(shard);
    corpus.starts_.push_back(corpus.total_);
    corpus.total_ += segment.length;
    corpus.segments_.push_back(std::move(segment));
  }
  return corpus;
}

TokenCorpus TokenCorpus::from_tokens(std::vector<int64_t> tokens, std::vector<uint8_t> mask) {
  BRIGADE_CHECK(mask.empty() || mask.size() == tokens.size(), "token corpus: ", tokens.size(),
                " tokens but ", mask.size(), " mask values");
  TokenCorpus corpus;
  for (size_t i = 0; i < tokens.size(); ++i) {
    BRIGADE_CHECK(tokens[i] >= 0, "token corpus: token ", i, " has negative id ", tokens[i]);
    corpus.vocab_bound_ = std::max(corpus.vocab_bound_, tokens[i] + 1);
  }
  for (size_t i = 0; i < mask.size(); ++i)
    BRIGADE_CHECK(mask[i] <= 1, "token corpus: mask value ", static_cast<int>(mask[i]),
                  " at token ", i, " is not 0 or 1");
  if (tokens.empty()) return corpus;
  Segment segment;
  segment.length = static_cast<int64_t>(tokens.size());
  segment.tokens = std::make_shared<const std::vector<int64_t>>(std::move(tokens));
  segment.mask = std::make_shared<const std::vector<uint8_t>>(std::move(mask));
  corpus.starts_.push_back(0);
  corpus.total_ = segment.length;
  corpus.segments_.push_back(std::move(segment));
  return corpus;
}

void TokenCorpus::read(int64_t start, int64_t len, int64_t* out_tokens, uint8_t* out_mask) const {
  BRIGADE_ASSERT(start >= 0 && len >= 0 && start + len <= total_, "corpus read [", start, ", ",
                 start + len, ") outside [0, ", total_, ")");
  if (len == 0) return;
  // The segment holding `start`: the last one starting at or before it.
  auto it = std::upper_bound(starts_.begin(), starts_.end(), start);
  size_t s = static_cast<size_t>(it - starts_.begin()) - 1;
  int64_t done = 0;
  while (done < len) {
    const Segment& segment = segments_[s];
    int64_t within = start + done - starts_[s];
    int64_t n = std::min(len - done, segment.length - within);
    int64_t from = segment.offset + within;
    uint8_t* mask_out = out_mask ? out_mask + done : nullptr;
    if (segment.shard) {
      segment.shard->read(from, n, out_tokens + done, mask_out);
    } else {
      std::memcpy(out_tokens + done, segment.tokens->data() + from,
                  static_cast<size_t>(n) * sizeof(int64_t));
      if (mask_out) {
        if (segment.mask->empty())
          std::memset(mask_out, 1, static_cast<size_t>(n));
        else
          std::memcpy(mask_out, segment.mask->data() + from, static_cast<size_t>(n));
      }
    }
    done += n;
    ++s;
  }
}

TokenCorpus TokenCorpus::slice(int64_t begin, int64_t end) const {
  BRIGADE_CHECK(0 <= begin && begin <= end && end <= total_, "token corpus: slice [", begin, ", ",
                end, ") is outside [0, ", total_, ")");
  TokenCorpus out;
  out.vocab_bound_ = vocab_bound_;
  for (size_t s = 0; s < segments_.size(); ++s) {
    int64_t seg_begin = std::max(begin, starts_[s]);
    int64_t seg_end = std::min(end, starts_[s] + segments_[s].length);
    if (seg_begin >= seg_end) continue;
    Segment segment = segments_[s];
    segment.offset += seg_begin - starts_[s];
    segment.length = seg_end - seg_begin;
    out.starts_.push_back(out.total_);
    out.total_ += segment.length;
    out.segments_.push_back(std::move(segment));
  }
  return out;
}

}  // namespace brigade::data
