// Internals of BpeTokenizer shared by bpe.cpp (load, save, encode, decode) and
// bpe_train.cpp (the trainer builds an Impl and reuses its pre-tokenizer).
#pragma once

#include <optional>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "data/bpe.h"

namespace brigade::data {

// Hash for string maps looked up by string_view without a copy.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

// (left id, right id) -> (rank << 32 | merged id): open addressing, because this
// lookup is the inner loop of BPE and std::unordered_map's modulo hashing shows up.
class MergeTable {
 public:
  static constexpr uint64_t kNone = UINT64_MAX;
  static uint64_t key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
  }
  void reserve(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    slots_.assign(cap, {kNone, kNone});
    shift_ = 64 - static_cast<int>(__builtin_ctzll(cap));
    size_ = 0;
  }
  // Inserts or overwrites.
  void set(uint64_t k, uint64_t value) {
    if (2 * (size_ + 1) > slots_.size()) grow();
    for (size_t i = slot(k);; i = (i + 1) & (slots_.size() - 1)) {
      if (slots_[i].first == kNone) ++size_, slots_[i].first = k;
      if (slots_[i].first == k) {
        slots_[i].second = value;
        return;
      }
    }
  }
  uint64_t get(uint64_t k) const {
    if (size_ == 0) return kNone;
    for (size_t i = slot(k);; i = (i + 1) & (slots_.size() - 1)) {
      if (slots_[i].first == k) return slots_[i].second;
      if (slots_[i].first == kNone) return kNone;
    }
  }
  bool empty() const { return size_ == 0; }

 private:
  size_t slot(uint64_t k) const { return static_cast<size_t>((k * 0x9E3779B97F4A7C15ull) >> shift_); }
  void grow() {
    std::vector<std::pair<uint64_t, uint64_t>> old = std::move(slots_);
    reserve(old.size());
    for (const auto& [k, v] : old)
      if (k != kNone) set(k, v);
  }
  std::vector<std::pair<uint64_t, uint64_t>> slots_;
  int shift_ = 64;
  size_t size_ = 0;
};

// GPT-2's byte <-> printable-character table used by every byte-level BPE.
std::string byte_to_token_char(uint8_t byte);  // the character's UTF-8

// The split regexes of the model families (as written in their tokenizer.json).
inline constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// A compiled PCRE2 pattern (UTF, UCP, JIT when available), shareable between threads.
class SplitRegex {
 public:
  SplitRegex() = default;
  // `literal`: the pattern is a plain string (HF's {"String": ...}). `what` names the
  // source for the error on a bad pattern.
  SplitRegex(const std::string& pattern, bool literal, const std::string& what);
  // Calls `on_span(begin, end, is_match)` for the matches of the pattern in `text` (valid
  // UTF-8) and the gaps between them, in order; empty spans are skipped.
  template <typename F>
  void split(std::string_view text, F&& on_span) const;
  bool empty() const { return !code_; }

 private:
  // Next match at or after `from`: false when none. Sets [*begin, *end).
  bool find(std::string_view text, size_t from, size_t* begin, size_t* end) const;
  std::shared_ptr<pcre2_code> code_;
};

template <typename F>
void SplitRegex::split(std::string_view text, F&& on_span) const {
  size_t prev = 0, from = 0, b = 0, e = 0;
  while (from <= text.size() && find(text, from, &b, &e)) {
    if (b > prev) on_span(prev, b, false);
    if (e > b) {
      on_span(b, e, true);
      prev = from = e;
    } else {
      // An empty match: step over one character, as Oniguruma's find_iter does.
      prev = b;
      from = b + 1;
      while (from < text.size() && (static_cast<unsigned char>(text[from]) & 0xC0) == 0x80) ++from;
    }
  }
  if (prev < text.size()) on_span(prev, text.size(), false);
}

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false;
  bool normalized = false;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
};

// Added-token matcher: a byte trie, leftmost then longest match.
class AddedTokenTrie {
 public:
  void add(const std::string& content, int32_t index);
  bool empty() const { return nodes_.size() <= 1; }
  // Longest token starting at text[pos], as (index, length); index -1 when none.
  std::pair<int32_t, size_t> longest_at(std::string_view text, size_t pos) const;
  // Whether any token could start with this byte (a quick filter).
  bool may_start(unsigned char c) const { return first_[c]; }

 private:
  struct Node {
    int32_t token = -1;
    std::vector<std::pair<unsigned char, int32_t>> children;
  };
  std::vector<Node> nodes_{Node{}};
  std::array<bool, 256> first_{};
};

// One step of the pre-tokenizer.
struct PreTokenizerStep {
  enum class Kind { kSplit, kByteLevel } kind = Kind::kByteLevel;
  std::string pattern;        // kSplit: the regex (or literal string)
  bool literal = false;       // kSplit: {"String": ...}
  bool remove = false;        // kSplit: behavior Removed (else Isolated)
  bool add_prefix_space = false;  // kByteLevel
  bool use_regex = false;         // kByteLevel: split with the GPT-2 pattern first
  SplitRegex regex;               // compiled pattern (kSplit, or kByteLevel with use_regex)
};

struct BpeTokenizer::Impl {
  // --- what the files say ------------------------------------------------------
  std::string source;                   // the tokenizer.json, for messages; "" if built
  std::vector<std::string> tokens;      // id -> token string as in tokenizer.json
  std::vector<std::pair<std::string, std::string>> merge_tokens;  // priority order
  std::vector<AddedToken> added;
  bool nfc = false;
  std::vector<PreTokenizerStep> pre;    // Splits, then one ByteLevel last
  bool ignore_merges = false;
  int32_t unk_id = -1;
  std::string post_processor_json = "null";  // kept verbatim for save()
  std::map<std::string, std::string, std::less<>> roles;  // brigade role -> token content (config)
  std::optional<bool> add_bos_token;    // tokenizer_config.json's, when it says
  bool post_processor_adds_bos = false; // a TemplateProcessing that starts with a special token
  std::string chat_template;            // tokenizer_config.json's (or chat_template.jinja)

  // --- derived by build() ---------------------------------------------------------
  std::vector<std::pair<int32_t, int32_t>> merge_pairs;  // merge_tokens as ids
  std::vector<std::string> merges;      // merge_tokens as "left right"
  std::vector<uint8_t> added_kind;      // id -> 0 ordinary, 1 added, 2 added + special
  std::vector<std::string> token_bytes; // id -> bytes it decodes to
  std::array<int32_t, 256> byte_id{};   // byte -> id of its one-byte token (-1: none)
  MergeTable merge_rank;                // (left, right) -> (rank << 32 | merged id)
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> bytes_to_id;  // ignore_merges
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> content_to_added;
  AddedTokenTrie raw_trie_all, raw_trie_plain;  // normalized=false tokens: all / non-special
  AddedTokenTrie norm_trie_all, norm_trie_plain;  // normalized=true tokens
  uint64_t serial = 0;                  // identifies this Impl in the per-thread caches

  // Validates the fields above and derives the rest; errors name `source`.
  void build();

  // Runs the whole pipeline up to BPE: `on_added(id)` for each added token matched,
  // `on_piece(bytes)` for each pre-token.
  void pre_tokenize(std::string_view text, bool allow_special,
                    const std::function<void(int32_t)>& on_added,
                    const std::function<void(std::string_view)>& on_piece) const;
  // BPE of one pre-token (raw bytes), appended to `out`.
  void bpe(std::string_view piece, std::vector<int32_t>& out) const;
  std::string family() const;
};

BpeTokenizer make_bpe_tokenizer(std::shared_ptr<BpeTokenizer::Impl> impl);

}  // namespace brigade::data
