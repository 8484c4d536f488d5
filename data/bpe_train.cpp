// The BPE trainer: count pre-tokenized words, then merge the most frequent adjacent
// pair until the vocabulary is full. Rules in bpe.h (train_bpe).
#include <algorithm>
#include <queue>
#include <set>

#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "data/bpe.h"
#include "data/bpe_impl.h"

namespace brigade::data {

namespace {

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// The tokenizer around the merges: bytes 0..255, pre-tokenizer, NFC, specials.
std::shared_ptr<BpeTokenizer::Impl> base_impl(const std::vector<std::string>& specials, const std::string& pattern) {
  auto impl = std::make_shared<BpeTokenizer::Impl>();
  for (int b = 0; b < 256; ++b) impl->tokens.push_back(byte_to_token_char(static_cast<uint8_t>(b)));
  impl->nfc = true;
  PreTokenizerStep split;
  split.kind = PreTokenizerStep::Kind::kSplit;
  split.pattern = pattern.empty() ? std::string(kQwen2Pattern) : pattern;
  impl->pre.push_back(std::move(split));
  impl->pre.push_back(PreTokenizerStep{});  // ByteLevel: no prefix space, no regex
  for (const std::string& s : specials) {
    AddedToken t;
    t.content = s;
    t.id = static_cast<int32_t>(impl->tokens.size());
    t.special = true;
    impl->tokens.push_back(s);
    impl->added.push_back(std::move(t));
  }
  return impl;
}

struct Candidate {
  int64_t count;
  uint64_t pair;
  // Most frequent first; on a tie the smallest (left id, right id).
  bool operator<(const Candidate& o) const { return count != o.count ? count < o.count : pair > o.pair; }
};

}  // namespace

BpeTokenizer train_bpe(std::span<const std::string> corpus, int64_t vocab_size,
                       const std::vector<std::string>& special_tokens, const std::string& pattern) {
  const int64_t fixed = 256 + static_cast<int64_t>(special_tokens.size());
  BRIGADE_CHECK(vocab_size >= fixed, "train_bpe: vocab_size ", vocab_size, " is smaller than the 256 byte tokens plus ",
                special_tokens.size(), " special tokens");
  BRIGADE_CHECK(vocab_size < (int64_t{1} << 31), "train_bpe: vocab_size ", vocab_size, " too large");
  std::set<std::string> seen;
  for (const std::string& s : special_tokens) {
    BRIGADE_CHECK(!s.empty(), "train_bpe: empty special token");
    BRIGADE_CHECK(seen.insert(s).second, "train_bpe: special token '", s, "' given twice");
  }

  // Words and their counts.
  auto base = base_impl(special_tokens, pattern);
  base->build();
  std::unordered_map<std::string, int64_t> word_counts;
  for (const std::string& text : corpus)
    base->pre_tokenize(text, /*allow_special=*/true, [](int32_t) {},
                       [&](std::string_view piece) { ++word_counts[std::string(piece)]; });
  std::vector<std::pair<std::string, int64_t>> sorted(word_counts.begin(), word_counts.end());
  word_counts.clear();
  std::sort(sorted.begin(), sorted.end());
  std::vector<std::vector<int32_t>> words(sorted.size());
  std::vector<int64_t> counts(sorted.size());
  for (size_t w = 0; w < sorted.size(); ++w) {
    for (unsigned char c : sorted[w].first) words[w].push_back(c);  // byte b is id b
    counts[w] = sorted[w].second;
  }

  std::unordered_map<uint64_t, int64_t> pair_count;
  std::unordered_map<uint64_t, std::vector<int32_t>> pair_words;  // may hold stale entries
  for (size_t w = 0; w < words.size(); ++w) {
    for (size_t i = 0; i + 1 < words[w].size(); ++i) {
      uint64_t p = pair_key(words[w][i], words[w][i + 1]);
      pair_count[p] += counts[w];
      pair_words[p].push_back(static_cast<int32_t>(w));
    }
  }
  std::priority_queue<Candidate> heap;
  for (const auto& [p, c] : pair_count) heap.push({c, p});

  std::vector<std::string> tokens = base->tokens;
  tokens.resize(256);
  std::vector<std::pair<std::string, std::string>> merges;
  const int64_t target = vocab_size - fixed;
  std::vector<std::pair<uint64_t, int64_t>> delta;
  std::vector<int32_t> merged;
  Progress bar("tokenizer merges", target, stderr_is_terminal(), /*quiet_seconds=*/2.0);
  while (static_cast<int64_t>(merges.size()) < target && !heap.empty()) {
    bar.tick(static_cast<int64_t>(merges.size()), "");
    Candidate top = heap.top();
    heap.pop();
    auto current = pair_count.find(top.pair);
    if (current == pair_count.end() || current->second != top.count) continue;  // stale entry
    if (top.count <= 0) break;
    const int32_t left = static_cast<int32_t>(top.pair >> 32), right = static_cast<int32_t>(top.pair & 0xFFFFFFFFu);
    const int32_t id = static_cast<int32_t>(tokens.size());
    merges.emplace_back(tokens[left], tokens[right]);
    tokens.push_back(tokens[left] + tokens[right]);

    std::vector<int32_t> affected = std::move(pair_words[top.pair]);
    pair_words.erase(top.pair);
    std::sort(affected.begin(), affected.end());
    affected.erase(std::unique(affected.begin(), affected.end()), affected.end());
    delta.clear();
    for (int32_t w : affected) {
      std::vector<int32_t>& word = words[static_cast<size_t>(w)];
      merged.clear();
      bool found = false;
      for (size_t i = 0; i < word.size();) {
        if (i + 1 < word.size() && word[i] == left && word[i + 1] == right) {
          merged.push_back(id);
          i += 2;
          found = true;
        } else {
          merged.push_back(word[i++]);
        }
      }
      if (!found) continue;
      const int64_t c = counts[static_cast<size_t>(w)];
      for (size_t i = 0; i + 1 < word.size(); ++i) delta.emplace_back(pair_key(word[i], word[i + 1]), -c);
      for (size_t i = 0; i + 1 < merged.size(); ++i) {
        uint64_t p = pair_key(merged[i], merged[i + 1]);
        delta.emplace_back(p, c);
        if (merged[i] == id || merged[i + 1] == id) pair_words[p].push_back(w);
      }
      word.swap(merged);
    }
    std::sort(delta.begin(), delta.end());
    for (size_t i = 0; i < delta.size();) {
      uint64_t p = delta[i].first;
      int64_t d = 0;
      for (; i < delta.size() && delta[i].first == p; ++i) d += delta[i].second;
      if (d == 0) continue;
      int64_t& count = pair_count[p];
      count += d;
      if (count > 0) heap.push({count, p});
      else pair_count.erase(p);
    }
  }

  bar.tick(static_cast<int64_t>(merges.size()), "");
  bar.finish();
  auto impl = base_impl(special_tokens, pattern);
  impl->tokens = tokens;
  impl->merge_tokens = std::move(merges);
  for (AddedToken& t : impl->added) {
    t.id = static_cast<int32_t>(impl->tokens.size());
    impl->tokens.push_back(t.content);
  }
  return make_bpe_tokenizer(std::move(impl));
}

}  // namespace brigade::data
