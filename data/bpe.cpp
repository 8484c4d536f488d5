// Byte-level BPE in Hugging Face's tokenizer.json format: loading (every field
// checked), the encode pipeline (added tokens, NFC, pre-tokenizer, BPE), decoding and
// saving. The format and the rules are described in bpe.h.
#include "data/bpe.h"

#include <utf8proc.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <queue>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "data/bpe_impl.h"

namespace brigade::data {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

// ---------------------------------------------------------------------------------
// Byte-level alphabet (GPT-2's bytes_to_unicode).

namespace {

struct ByteAlphabet {
  std::array<uint32_t, 256> to_char{};               // byte -> code point
  std::unordered_map<uint32_t, uint8_t> to_byte;     // code point -> byte
  ByteAlphabet() {
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_char[b] = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + extra++);
      to_byte[to_char[b]] = static_cast<uint8_t>(b);
    }
  }
};

const ByteAlphabet& alphabet() {
  static const ByteAlphabet table;
  return table;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Length of the valid UTF-8 character at s[pos] (1..4), or 0 if the bytes there are
// not one (truncated, overlong, surrogate, beyond U+10FFFF, stray continuation).
size_t utf8_char_length(std::string_view s, size_t pos, uint32_t* cp = nullptr) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + pos;
  const size_t left = s.size() - pos;
  const unsigned char c = p[0];
  if (c < 0x80) {
    if (cp) *cp = c;
    return 1;
  }
  size_t n;
  uint32_t v, min;
  if (c >= 0xC2 && c <= 0xDF) { n = 2; v = c & 0x1F; min = 0x80; }
  else if (c >= 0xE0 && c <= 0xEF) { n = 3; v = c & 0x0F; min = 0x800; }
  else if (c >= 0xF0 && c <= 0xF4) { n = 4; v = c & 0x07; min = 0x10000; }
  else return 0;
  if (left < n) return 0;
  for (size_t i = 1; i < n; ++i) {
    if ((p[i] & 0xC0) != 0x80) return 0;
    v = (v << 6) | (p[i] & 0x3F);
  }
  if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 0;
  if (cp) *cp = v;
  return n;
}

// End of the run of valid UTF-8 starting at `pos`.
size_t valid_run_end(std::string_view s, size_t pos) {
  while (pos < s.size()) {
    if (static_cast<unsigned char>(s[pos]) < 0x80) {
      ++pos;
      continue;
    }
    size_t n = utf8_char_length(s, pos);
    if (n == 0) break;
    pos += n;
  }
  return pos;
}

size_t invalid_run_end(std::string_view s, size_t pos) {
  while (pos < s.size() && utf8_char_length(s, pos) == 0) ++pos;
  return pos;
}

// Unicode White_Space (what Oniguruma's \s and Rust's char::is_whitespace match).
bool is_white_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

bool is_word_char(uint32_t c) {
  if (c == '_') return true;
  utf8proc_category_t cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return (cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO) ||
         (cat >= UTF8PROC_CATEGORY_ND && cat <= UTF8PROC_CATEGORY_NO);
}

// Code point ending just before `pos` (valid UTF-8 assumed; 0 at the start).
uint32_t char_before(std::string_view s, size_t pos, size_t* length) {
  size_t b = pos;
  while (b > 0 && pos - b < 4) {
    --b;
    if ((static_cast<unsigned char>(s[b]) & 0xC0) != 0x80) break;
  }
  uint32_t cp = 0;
  size_t n = pos > 0 ? utf8_char_length(s, b, &cp) : 0;
  if (n != pos - b) n = 0, cp = 0;
  *length = n;
  return cp;
}

// Code points that NFC never changes and that never combine with what precedes them:
// enough to skip utf8proc for almost all real text.
bool nfc_quick_yes(std::string_view s) {
  size_t pos = 0;
  while (pos < s.size()) {
    uint32_t c = static_cast<unsigned char>(s[pos]);
    if (c < 0x80) {
      ++pos;
      continue;
    }
    pos += utf8_char_length(s, pos, &c);
    if (c < 0x300) continue;
    if (c >= 0x4E00 && c <= 0x9FFF) continue;   // CJK unified ideographs
    if (c >= 0x3041 && c <= 0x3096) continue;   // hiragana (not the combining 3099/309A)
    if (c >= 0x309B && c <= 0x30FF) continue;   // katakana, iteration and length marks
    if (c >= 0x3000 && c <= 0x3029) continue;   // CJK symbols (302A..302F combine)
    if (c >= 0xAC00 && c <= 0xD7A3) continue;   // Hangul syllables
    if (c >= 0xFF01 && c <= 0xFFEF) continue;   // half/full-width forms
    if (c >= 0x1F000 && c <= 0x1FAFF) continue; // emoji and symbols
    if (c >= 0x0400 && c <= 0x0482) continue;   // Cyrillic letters
    if (c >= 0x2010 && c <= 0x2027) continue;   // punctuation (not the 2000/2001 spaces)
    if (c >= 0x1E00 && c <= 0x1EFF) continue;   // Latin extended additional (precomposed)
    if (c >= 0x2190 && c <= 0x2BFF && c != 0x2329 && c != 0x232A) continue;  // arrows, math, dingbats
    if (c == 0x200D || c == 0xFE0F) continue;   // ZWJ, emoji presentation selector
    return false;
  }
  return true;
}

std::string nfc(std::string_view s) {
  utf8proc_uint8_t* out = nullptr;
  utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                    static_cast<utf8proc_ssize_t>(s.size()), &out,
                                    static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  BRIGADE_CHECK(n >= 0, "NFC normalisation failed: ", utf8proc_errmsg(n));
  std::string result(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
  std::free(out);
  return result;
}

// Oniguruma's \s is Unicode White_Space; PCRE2's (with UCP) leaves out U+0085. Spell
// it out so both engines split the same way.
std::string rewrite_for_pcre2(const std::string& pattern) {
  std::string out;
  out.reserve(pattern.size() + 32);
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] == '\\' && i + 1 < pattern.size()) {
      char next = pattern[i + 1];
      if (next == 's') out += "\\p{White_Space}";
      else if (next == 'S') out += "\\P{White_Space}";
      else out.append(pattern, i, 2);
      ++i;
    } else {
      out.push_back(pattern[i]);
    }
  }
  return out;
}

std::atomic<uint64_t> next_serial{1};

}  // namespace

std::string byte_to_token_char(uint8_t byte) {
  std::string s;
  append_utf8(s, alphabet().to_char[byte]);
  return s;
}

// ---------------------------------------------------------------------------------
// PCRE2 regex.

namespace {
// Per-thread match state: PCRE2 match data and JIT stacks cannot be shared.
struct MatchState {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  pcre2_jit_stack* stack = pcre2_jit_stack_create(32 * 1024, 64 * 1024 * 1024, nullptr);
  pcre2_match_context* context = pcre2_match_context_create(nullptr);
  MatchState() {
    if (context && stack) pcre2_jit_stack_assign(context, nullptr, stack);
  }
  ~MatchState() {
    pcre2_match_data_free(data);
    pcre2_jit_stack_free(stack);
    pcre2_match_context_free(context);
  }
};
}  // namespace

SplitRegex::SplitRegex(const std::string& pattern, bool literal, const std::string& what) {
  std::string compiled = literal ? pattern : rewrite_for_pcre2(pattern);
  int error = 0;
  PCRE2_SIZE offset = 0;
  uint32_t options = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(compiled.data()), compiled.size(), options,
                                   &error, &offset, nullptr);
  if (!code) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    BRIGADE_FAIL(what, ": bad regex '", pattern, "' at offset ", offset, ": ", reinterpret_cast<char*>(message));
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // the interpreter is the fallback
  code_.reset(code, pcre2_code_free);
}

bool SplitRegex::find(std::string_view text, size_t from, size_t* begin, size_t* end) const {
  thread_local MatchState state;
  BRIGADE_CHECK(state.data && state.context, "PCRE2: out of memory");
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.empty() ? "" : text.data());
  int rc = pcre2_match(code_.get(), subject, text.size(), from, PCRE2_NO_UTF_CHECK, state.data, state.context);
  if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
    rc = pcre2_match(code_.get(), subject, text.size(), from, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, state.data,
                     state.context);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(rc, message, sizeof(message));
    BRIGADE_FAIL("pre-tokenizer regex failed on a ", text.size(), "-byte piece: ", reinterpret_cast<char*>(message));
  }
  const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(state.data);
  *begin = ovector[0];
  *end = ovector[1];
  return true;
}

// ---------------------------------------------------------------------------------
// Added-token trie.

void AddedTokenTrie::add(const std::string& content, int32_t index) {
  int32_t node = 0;
  for (unsigned char c : content) {
    int32_t child = -1;
    for (auto& [byte, next] : nodes_[node].children)
      if (byte == c) child = next;
    if (child < 0) {
      child = static_cast<int32_t>(nodes_.size());
      nodes_[node].children.emplace_back(c, child);
      nodes_.emplace_back();
    }
    node = child;
  }
  nodes_[node].token = index;
  first_[static_cast<unsigned char>(content[0])] = true;
}

std::pair<int32_t, size_t> AddedTokenTrie::longest_at(std::string_view text, size_t pos) const {
  std::pair<int32_t, size_t> best{-1, 0};
  int32_t node = 0;
  for (size_t i = pos; i < text.size(); ++i) {
    int32_t child = -1;
    for (const auto& [byte, next] : nodes_[node].children)
      if (byte == static_cast<unsigned char>(text[i])) child = next;
    if (child < 0) break;
    node = child;
    if (nodes_[node].token >= 0) best = {nodes_[node].token, i + 1 - pos};
  }
  return best;
}

namespace {
// Cuts `text` at the added tokens of `trie`: on_text(gap) and on_added(index).
template <typename OnText, typename OnAdded>
void split_added(std::string_view text, const AddedTokenTrie& trie, const std::vector<AddedToken>& added,
                 OnText&& on_text, OnAdded&& on_added) {
  if (trie.empty()) {
    if (!text.empty()) on_text(text);
    return;
  }
  size_t start = 0, pos = 0;
  while (pos < text.size()) {
    if (!trie.may_start(static_cast<unsigned char>(text[pos]))) {
      ++pos;
      continue;
    }
    auto [index, length] = trie.longest_at(text, pos);
    if (index < 0) {
      ++pos;
      continue;
    }
    const AddedToken& token = added[static_cast<size_t>(index)];
    size_t b = pos, e = pos + length;
    if (token.single_word) {
      size_t n = 0;
      uint32_t before = char_before(text, b, &n);
      uint32_t after = 0;
      bool word_before = n > 0 && is_word_char(before);
      bool word_after = e < text.size() && utf8_char_length(text, e, &after) > 0 && is_word_char(after);
      if (word_before || word_after) {
        ++pos;
        continue;
      }
    }
    if (token.lstrip) {
      for (size_t n = 0; b > start;) {
        uint32_t c = char_before(text, b, &n);
        if (n == 0 || !is_white_space(c)) break;
        b -= n;
      }
    }
    if (token.rstrip) {
      for (uint32_t c = 0; e < text.size();) {
        size_t n = utf8_char_length(text, e, &c);
        if (n == 0 || !is_white_space(c)) break;
        e += n;
      }
    }
    if (b > start) on_text(text.substr(start, b - start));
    on_added(token.id);
    start = pos = e;
  }
  if (start < text.size()) on_text(text.substr(start));
}
}  // namespace

// ---------------------------------------------------------------------------------
// Encode pipeline.

void BpeTokenizer::Impl::pre_tokenize(std::string_view text, bool allow_special,
                                      const std::function<void(int32_t)>& on_added,
                                      const std::function<void(std::string_view)>& on_piece) const {
  const AddedTokenTrie& raw = allow_special ? raw_trie_all : raw_trie_plain;
  const AddedTokenTrie& normalized = allow_special ? norm_trie_all : norm_trie_plain;

  // The pre-tokenizer steps from `step` on, applied to valid UTF-8.
  std::function<void(std::string_view, size_t)> run_steps = [&](std::string_view s, size_t step) {
    if (s.empty()) return;
    const PreTokenizerStep& p = pre[step];
    if (p.kind == PreTokenizerStep::Kind::kSplit) {
      p.regex.split(s, [&](size_t b, size_t e, bool is_match) {
        if (!(is_match && p.remove)) run_steps(s.substr(b, e - b), step + 1);
      });
      return;
    }
    std::string prefixed;
    if (p.add_prefix_space && s[0] != ' ') {
      prefixed = " ";
      prefixed += s;
      s = prefixed;
    }
    if (p.use_regex)
      p.regex.split(s, [&](size_t b, size_t e, bool) { on_piece(s.substr(b, e - b)); });
    else
      on_piece(s);
  };

  auto valid_run = [&](std::string_view run) {
    std::string normalised;
    if (nfc && !nfc_quick_yes(run)) {
      normalised = brigade::data::nfc(run);
      run = normalised;
    }
    split_added(run, normalized, added, [&](std::string_view s) { run_steps(s, 0); }, on_added);
  };

  split_added(text, raw, added,
              [&](std::string_view segment) {
                size_t pos = 0;
                while (pos < segment.size()) {
                  size_t valid_end = valid_run_end(segment, pos);
                  if (valid_end > pos) valid_run(segment.substr(pos, valid_end - pos));
                  size_t invalid_end = invalid_run_end(segment, valid_end);
                  if (invalid_end > valid_end) on_piece(segment.substr(valid_end, invalid_end - valid_end));
                  pos = invalid_end;
                }
              },
              on_added);
}

void BpeTokenizer::Impl::bpe(std::string_view piece, std::vector<int32_t>& out) const {
  if (ignore_merges) {
    auto it = bytes_to_id.find(piece);
    if (it != bytes_to_id.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const size_t start = out.size();
  for (unsigned char c : piece) {
    int32_t id = byte_id[c];
    if (id < 0) {
      // HF: a character missing from the vocabulary becomes unk, or is dropped.
      if (unk_id < 0) continue;
      id = unk_id;
    }
    out.push_back(id);
  }
  int32_t* syms = out.data() + start;
  size_t n = out.size() - start;
  if (n < 2 || merge_rank.empty()) return;
  auto lookup = [&](int32_t left, int32_t right) { return merge_rank.get(MergeTable::key(left, right)); };

  constexpr size_t kSmall = 64;
  if (n <= kSmall) {
    // Lowest rank first, leftmost on ties; ranks[i] is the pair (syms[i], syms[i+1]).
    std::array<uint64_t, kSmall> ranks;
    for (size_t i = 0; i + 1 < n; ++i) ranks[i] = lookup(syms[i], syms[i + 1]);
    while (n > 1) {
      size_t best = 0;
      for (size_t i = 1; i + 1 < n; ++i)
        if (ranks[i] < ranks[best]) best = i;
      if (ranks[best] == UINT64_MAX) break;
      syms[best] = static_cast<int32_t>(ranks[best] & 0xFFFFFFFFu);
      std::copy(syms + best + 2, syms + n, syms + best + 1);
      for (size_t i = best + 1; i + 2 < n; ++i) ranks[i] = ranks[i + 1];
      --n;
      if (best > 0) ranks[best - 1] = lookup(syms[best - 1], syms[best]);
      if (best + 1 < n) ranks[best] = lookup(syms[best], syms[best + 1]);
    }
    out.resize(start + n);
    return;
  }

  // Long pieces: a linked list and a heap of candidate merges ordered by (rank, position).
  struct Sym {
    int32_t id, prev, next;
  };
  std::vector<Sym> list(n);
  for (size_t i = 0; i < n; ++i)
    list[i] = {syms[i], static_cast<int32_t>(i) - 1, i + 1 < n ? static_cast<int32_t>(i + 1) : -1};
  struct Candidate {
    uint64_t rank;  // rank << 32 | new id
    int32_t pos, left, right;
    bool operator>(const Candidate& o) const {
      return (rank >> 32) != (o.rank >> 32) ? (rank >> 32) > (o.rank >> 32) : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  auto push = [&](int32_t pos) {
    if (pos < 0 || list[pos].next < 0) return;
    uint64_t r = lookup(list[pos].id, list[list[pos].next].id);
    if (r != UINT64_MAX) heap.push({r, pos, list[pos].id, list[list[pos].next].id});
  };
  for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int32_t>(i));
  while (!heap.empty()) {
    Candidate c = heap.top();
    heap.pop();
    Sym& s = list[c.pos];
    if (s.id != c.left || s.next < 0 || list[s.next].id != c.right) continue;  // stale
    Sym& r = list[s.next];
    s.id = static_cast<int32_t>(c.rank & 0xFFFFFFFFu);
    r.id = -1;
    s.next = r.next;
    if (r.next >= 0) list[r.next].prev = c.pos;
    push(s.prev);
    push(c.pos);
  }
  out.resize(start);
  for (int32_t i = 0; i >= 0; i = list[i].next) out.push_back(list[i].id);
}

namespace {
// Word -> ids cache, one per thread and tokenizer (a few tokenizers per thread).
struct WordCache {
  static constexpr size_t kMaxWords = 1 << 18;
  static constexpr size_t kMaxWordBytes = 256;
  uint64_t serial = 0;
  std::unordered_map<std::string, std::pair<uint32_t, uint32_t>, StringHash, std::equal_to<>> index;
  std::vector<int32_t> ids;
};

WordCache& cache_for(uint64_t serial) {
  thread_local std::array<WordCache, 4> caches;
  thread_local size_t victim = 0;
  for (auto& c : caches)
    if (c.serial == serial) return c;
  WordCache& c = caches[victim];
  victim = (victim + 1) % caches.size();
  c.serial = serial;
  c.index.clear();
  c.ids.clear();
  return c;
}
}  // namespace

std::vector<int64_t> BpeTokenizer::encode(std::string_view text, bool allow_special) const {
  const Impl& impl = *impl_;
  WordCache& cache = cache_for(impl.serial);
  std::vector<int64_t> out;
  out.reserve(text.size() / 3 + 4);
  std::vector<int32_t> scratch;
  impl.pre_tokenize(
      text, allow_special, [&](int32_t id) { out.push_back(id); },
      [&](std::string_view piece) {
        if (piece.size() == 1 && impl.byte_id[static_cast<unsigned char>(piece[0])] >= 0) {
          out.push_back(impl.byte_id[static_cast<unsigned char>(piece[0])]);
          return;
        }
        if (piece.size() <= WordCache::kMaxWordBytes) {
          auto it = cache.index.find(piece);
          if (it != cache.index.end()) {
            const int32_t* ids = cache.ids.data() + it->second.first;
            out.insert(out.end(), ids, ids + it->second.second);
            return;
          }
        }
        scratch.clear();
        impl.bpe(piece, scratch);
        out.insert(out.end(), scratch.begin(), scratch.end());
        if (piece.size() <= WordCache::kMaxWordBytes) {
          if (cache.index.size() >= WordCache::kMaxWords) {
            cache.index.clear();
            cache.ids.clear();
          }
          cache.index.emplace(std::string(piece), std::make_pair(static_cast<uint32_t>(cache.ids.size()),
                                                                 static_cast<uint32_t>(scratch.size())));
          cache.ids.insert(cache.ids.end(), scratch.begin(), scratch.end());
        }
      });
  return out;
}

std::string BpeTokenizer::decode(std::span<const int64_t> ids) const {
  std::string text;
  text.reserve(ids.size() * 4);
  for (size_t i = 0; i < ids.size(); ++i) {
    int64_t id = ids[i];
    BRIGADE_CHECK(id >= 0 && id < vocab_size(), "tokenizer '", name(), "': cannot decode token id ", id,
                  " at position ", i, " (vocabulary is 0..", vocab_size() - 1, ")");
    text += impl_->token_bytes[static_cast<size_t>(id)];
  }
  return text;
}

int64_t BpeTokenizer::vocab_size() const { return static_cast<int64_t>(impl_->tokens.size()); }

std::optional<int64_t> BpeTokenizer::special_id(std::string_view name) const {
  const Impl& impl = *impl_;
  auto added_id = [&](std::string_view content) -> std::optional<int64_t> {
    auto it = impl.content_to_added.find(content);
    if (it == impl.content_to_added.end()) return std::nullopt;
    return it->second;
  };
  if (auto role = impl.roles.find(name); role != impl.roles.end()) {
    if (auto id = added_id(role->second)) return id;
    for (size_t i = 0; i < impl.tokens.size(); ++i)
      if (impl.tokens[i] == role->second) return static_cast<int64_t>(i);
  }
  static const std::vector<std::pair<std::string_view, std::vector<std::string_view>>> kWellKnown = {
      {kBosToken, {kBosToken, "<|begin_of_text|>", "<|endoftext|>"}},
      {kEosToken, {kEosToken, "<|end_of_text|>", "<|endoftext|>"}},
      {kPadToken, {kPadToken, "<|finetune_right_pad_id|>", "<|endoftext|>"}},
      {kImStartToken, {kImStartToken}},
      {kImEndToken, {kImEndToken, "<|eot_id|>"}},
  };
  for (const auto& [role, candidates] : kWellKnown) {
    if (role != name) continue;
    for (std::string_view candidate : candidates)
      if (auto id = added_id(candidate)) return id;
    return std::nullopt;
  }
  return added_id(name);
}

std::string BpeTokenizer::name() const { return impl_->source.empty() ? "bpe" : impl_->source; }
const std::vector<std::string>& BpeTokenizer::tokens() const { return impl_->tokens; }
const std::vector<std::string>& BpeTokenizer::merges() const { return impl_->merges; }
bool BpeTokenizer::is_special(int64_t id) const {
  return id >= 0 && id < vocab_size() && impl_->added_kind[static_cast<size_t>(id)] == 2;
}
bool BpeTokenizer::is_added(int64_t id) const {
  return id >= 0 && id < vocab_size() && impl_->added_kind[static_cast<size_t>(id)] != 0;
}
std::string BpeTokenizer::pre_tokenizer() const { return impl_->family(); }

std::string pre_tokenizer_pattern(std::string_view family) {
  if (family == "qwen2") return std::string(kQwen2Pattern);
  if (family == "llama-bpe") return std::string(kLlama3Pattern);
  if (family == "gpt2") return std::string(kGpt2Pattern);
  return {};
}

std::string BpeTokenizer::Impl::family() const {
  for (const PreTokenizerStep& step : pre) {
    if (step.kind != PreTokenizerStep::Kind::kSplit) continue;
    if (step.pattern == kQwen2Pattern) return "qwen2";
    if (step.pattern == kLlama3Pattern) return "llama-bpe";
    if (step.pattern == kGpt2Pattern) return "gpt2";
    return "default";
  }
  return !pre.empty() && pre.back().use_regex ? "gpt2" : "default";
}

// ---------------------------------------------------------------------------------
// Building and validating.

void BpeTokenizer::Impl::build() {
  const std::string where = source.empty() ? std::string("tokenizer") : source;
  const size_t n = tokens.size();
  BRIGADE_CHECK(n > 0 && n < (size_t{1} << 31), where, ": vocabulary size ", n, " out of range");
  const ByteAlphabet& table = alphabet();

  added_kind.assign(n, 0);
  content_to_added.clear();
  for (const AddedToken& t : added) {
    added_kind[static_cast<size_t>(t.id)] = t.special ? 2 : 1;
    content_to_added.emplace(t.content, t.id);
  }

  token_bytes.assign(n, {});
  byte_id.fill(-1);
  bytes_to_id.clear();
  std::unordered_map<std::string_view, int32_t> token_index;
  token_index.reserve(n);
  for (size_t id = 0; id < n; ++id) {
    const std::string& token = tokens[id];
    token_index.emplace(token, static_cast<int32_t>(id));
    if (added_kind[id] != 0) {
      token_bytes[id] = token;
      continue;
    }
    std::string bytes;
    bool mapped = true;
    for (size_t pos = 0; pos < token.size();) {
      uint32_t cp = 0;
      size_t len = utf8_char_length(token, pos, &cp);
      auto it = len ? table.to_byte.find(cp) : table.to_byte.end();
      if (it == table.to_byte.end()) {
        mapped = false;
        break;
      }
      bytes.push_back(static_cast<char>(it->second));
      pos += len;
    }
    // HF's ByteLevel decoder: a token with a character outside the alphabet gives its UTF-8.
    token_bytes[id] = mapped ? bytes : token;
    if (!mapped) continue;
    if (bytes.size() == 1 && byte_id[static_cast<unsigned char>(bytes[0])] < 0)
      byte_id[static_cast<unsigned char>(bytes[0])] = static_cast<int32_t>(id);
    if (ignore_merges) bytes_to_id.emplace(bytes, static_cast<int32_t>(id));
  }

  merge_pairs.clear();
  merges.clear();
  merge_rank.reserve(merge_tokens.size());
  for (size_t k = 0; k < merge_tokens.size(); ++k) {
    const auto& [left, right] = merge_tokens[k];
    auto l = token_index.find(left), r = token_index.find(right);
    BRIGADE_CHECK(l != token_index.end(), where, ": field 'model.merges[", k, "]': unknown token '", left, "'");
    BRIGADE_CHECK(r != token_index.end(), where, ": field 'model.merges[", k, "]': unknown token '", right, "'");
    auto m = token_index.find(left + right);
    BRIGADE_CHECK(m != token_index.end(), where, ": field 'model.merges[", k, "]': the merged token '", left + right,
                  "' is not in model.vocab");
    merge_pairs.emplace_back(l->second, r->second);
    merges.push_back(left + " " + right);
    // A repeated pair keeps its last rank, as HF's HashMap collect does.
    merge_rank.set(MergeTable::key(l->second, r->second),
                   (static_cast<uint64_t>(k) << 32) | static_cast<uint32_t>(m->second));
  }

  raw_trie_all = raw_trie_plain = norm_trie_all = norm_trie_plain = AddedTokenTrie{};
  for (size_t i = 0; i < added.size(); ++i) {
    const AddedToken& t = added[i];
    AddedTokenTrie& all = t.normalized ? norm_trie_all : raw_trie_all;
    AddedTokenTrie& plain = t.normalized ? norm_trie_plain : raw_trie_plain;
    all.add(t.content, static_cast<int32_t>(i));
    if (!t.special) plain.add(t.content, static_cast<int32_t>(i));
  }

  BRIGADE_CHECK(!pre.empty() && pre.back().kind == PreTokenizerStep::Kind::kByteLevel, where,
                ": field 'pre_tokenizer': brigade needs a ByteLevel pre-tokenizer as the last step");
  for (size_t i = 0; i < pre.size(); ++i) {
    PreTokenizerStep& step = pre[i];
    if (step.kind == PreTokenizerStep::Kind::kSplit)
      step.regex = SplitRegex(step.pattern, step.literal, where + ": field 'pre_tokenizer'");
    else if (step.use_regex)
      step.regex = SplitRegex(std::string(kGpt2Pattern), false, where + ": field 'pre_tokenizer'");
  }
  serial = next_serial.fetch_add(1);
}

BpeTokenizer make_bpe_tokenizer(std::shared_ptr<BpeTokenizer::Impl> impl) {
  impl->build();
  return BpeTokenizer(std::move(impl));
}

// ---------------------------------------------------------------------------------
// Loading tokenizer.json.

namespace {

// Field access that names the file and the field in every error.
struct JsonFile {
  std::string file;

  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    BRIGADE_FAIL(file, ": field '", field, "': ", what);
  }
  static const json* find(const json& obj, const char* key) {
    auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  // obj[key], where obj is the field `parent` ("" for the top level).
  const json& need(const json& obj, const std::string& parent, const char* key) const {
    const json* v = find(obj, key);
    if (!v) fail(parent.empty() ? std::string(key) : parent + "." + key, "missing");
    return *v;
  }
  const json& object(const json& v, const std::string& field) const {
    if (!v.is_object()) fail(field, std::string("expected an object, found ") + v.type_name());
    return v;
  }
  const json& array(const json& v, const std::string& field) const {
    if (!v.is_array()) fail(field, std::string("expected an array, found ") + v.type_name());
    return v;
  }
  std::string string(const json& v, const std::string& field) const {
    if (!v.is_string()) fail(field, std::string("expected a string, found ") + v.type_name());
    return v.get<std::string>();
  }
  bool boolean(const json& obj, const std::string& field, const char* key, bool fallback) const {
    const json* v = find(obj, key);
    if (!v) return fallback;
    if (!v->is_boolean()) fail(field + "." + key, std::string("expected true or false, found ") + v->type_name());
    return v->get<bool>();
  }
  int64_t integer(const json& v, const std::string& field) const {
    if (!v.is_number_integer()) fail(field, std::string("expected an integer, found ") + v.type_name());
    return v.get<int64_t>();
  }
  std::string type_of(const json& v, const std::string& field) const {
    object(v, field);
    return string(need(v, field, "type"), field + ".type");
  }
  json parse(const std::string& text) const {
    try {
      return json::parse(text);
    } catch (const json::parse_error& e) {
      BRIGADE_FAIL(file, ": not valid JSON (truncated or corrupt?) at byte ", e.byte, ": ", e.what());
    }
  }
};

void read_normalizer(const JsonFile& f, const json& v, const std::string& field, bool* nfc) {
  std::string type = f.type_of(v, field);
  if (type == "NFC") {
    *nfc = true;
  } else if (type == "Sequence") {
    const json& list = f.array(f.need(v, field, "normalizers"), field + ".normalizers");
    for (size_t i = 0; i < list.size(); ++i)
      read_normalizer(f, list[i], field + ".normalizers[" + std::to_string(i) + "]", nfc);
  } else {
    f.fail(field + ".type", "unsupported normalizer '" + type + "' (brigade supports NFC, or a Sequence of NFC)");
  }
}

PreTokenizerStep read_byte_level(const JsonFile& f, const json& v, const std::string& field) {
  PreTokenizerStep step;
  step.kind = PreTokenizerStep::Kind::kByteLevel;
  step.add_prefix_space = f.boolean(v, field, "add_prefix_space", true);
  step.use_regex = f.boolean(v, field, "use_regex", true);
  f.boolean(v, field, "trim_offsets", true);  // offsets only; checked for type
  return step;
}

PreTokenizerStep read_split(const JsonFile& f, const json& v, const std::string& field) {
  PreTokenizerStep step;
  step.kind = PreTokenizerStep::Kind::kSplit;
  const json& pattern = f.object(f.need(v, field, "pattern"), field + ".pattern");
  if (const json* regex = JsonFile::find(pattern, "Regex")) {
    step.pattern = f.string(*regex, field + ".pattern.Regex");
  } else if (const json* literal = JsonFile::find(pattern, "String")) {
    step.pattern = f.string(*literal, field + ".pattern.String");
    step.literal = true;
  } else {
    f.fail(field + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
  }
  if (step.pattern.empty()) f.fail(field + ".pattern", "empty pattern");
  std::string behavior = f.string(f.need(v, field, "behavior"), field + ".behavior");
  if (behavior == "Removed") step.remove = true;
  else if (behavior != "Isolated")
    f.fail(field + ".behavior", "unsupported split behavior '" + behavior + "' (brigade supports Isolated, Removed)");
  if (f.boolean(v, field, "invert", false)) f.fail(field + ".invert", "invert: true is not supported");
  return step;
}

std::vector<PreTokenizerStep> read_pre_tokenizer(const JsonFile& f, const json& root) {
  const json* v = JsonFile::find(root, "pre_tokenizer");
  if (!v) f.fail("pre_tokenizer", "missing (brigade needs a ByteLevel pre-tokenizer)");
  std::string type = f.type_of(*v, "pre_tokenizer");
  std::vector<PreTokenizerStep> steps;
  if (type == "ByteLevel") {
    steps.push_back(read_byte_level(f, *v, "pre_tokenizer"));
    return steps;
  }
  if (type != "Sequence")
    f.fail("pre_tokenizer.type", "unsupported pre-tokenizer '" + type + "' (brigade supports ByteLevel, or a "
                                 "Sequence of Split steps ending in ByteLevel)");
  const json& list = f.array(f.need(*v, "pre_tokenizer", "pretokenizers"), "pre_tokenizer.pretokenizers");
  for (size_t i = 0; i < list.size(); ++i) {
    std::string field = "pre_tokenizer.pretokenizers[" + std::to_string(i) + "]";
    std::string step_type = f.type_of(list[i], field);
    if (step_type == "Split") {
      if (!steps.empty() && steps.back().kind == PreTokenizerStep::Kind::kByteLevel)
        f.fail(field, "a Split after ByteLevel is not supported");
      steps.push_back(read_split(f, list[i], field));
    } else if (step_type == "ByteLevel") {
      if (i + 1 != list.size()) f.fail(field, "ByteLevel must be the last pre-tokenizer");
      steps.push_back(read_byte_level(f, list[i], field));
    } else {
      f.fail(field + ".type", "unsupported pre-tokenizer '" + step_type + "' (brigade supports Split, ByteLevel)");
    }
  }
  if (steps.empty() || steps.back().kind != PreTokenizerStep::Kind::kByteLevel)
    f.fail("pre_tokenizer.pretokenizers", "must end in a ByteLevel pre-tokenizer");
  return steps;
}

// bos_token etc. from tokenizer_config.json: a string, {"content": ...} or null.
void read_config_roles(const std::string& text, const std::string& source, BpeTokenizer::Impl& impl) {
  JsonFile f{source};
  json root = f.parse(text);
  f.object(root, "(top level)");
  const std::pair<const char*, std::string_view> fields[] = {
      {"bos_token", kBosToken}, {"eos_token", kEosToken}, {"pad_token", kPadToken}};
  for (const auto& [key, role] : fields) {
    const json* v = JsonFile::find(root, key);
    if (!v) continue;
    std::string content = v->is_object() ? f.string(f.need(*v, key, "content"), std::string(key) + ".content")
                                         : f.string(*v, key);
    bool known = impl.content_to_added.count(content) > 0 ||
                 std::find(impl.tokens.begin(), impl.tokens.end(), content) != impl.tokens.end();
    if (!known) f.fail(key, "'" + content + "' is not a token of the tokenizer.json");
    impl.roles.emplace(std::string(role), content);
  }
  if (const json* v = JsonFile::find(root, "add_bos_token"); v && !v->is_null()) {
    if (!v->is_boolean()) f.fail("add_bos_token", "must be true or false");
    impl.add_bos_token = v->get<bool>();
  }
  if (const json* v = JsonFile::find(root, "chat_template"); v && !v->is_null()) {
    if (v->is_string()) {
      impl.chat_template = v->get<std::string>();
    } else if (v->is_array()) {  // [{"name": ..., "template": ...}]: the default one
      for (const json& entry : *v) {
        if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template") &&
            entry["template"].is_string())
          impl.chat_template = entry["template"].get<std::string>();
      }
    } else {
      f.fail("chat_template", "must be a string or a list of {name, template}");
    }
  }
}

}  // namespace

BpeTokenizer BpeTokenizer::load(const fs::path& tokenizer_json) {
  const fs::path config = tokenizer_json.parent_path() / "tokenizer_config.json";
  BpeTokenizer tokenizer = parse(read_file(tokenizer_json), tokenizer_json.string(),
                                 fs::exists(config) ? read_file(config) : "", config.string());
  // transformers 4.43+ saves the template as its own file.
  const fs::path jinja = tokenizer_json.parent_path() / "chat_template.jinja";
  if (tokenizer.impl_->chat_template.empty() && fs::exists(jinja))
    std::const_pointer_cast<Impl>(tokenizer.impl_)->chat_template = read_file(jinja);
  return tokenizer;
}

bool BpeTokenizer::add_bos() const {
  if (impl_->add_bos_token) return *impl_->add_bos_token;
  if (impl_->post_processor_adds_bos) return true;
  const auto bos = special_id(kBosToken);
  return bos && impl_->tokens[static_cast<size_t>(*bos)] == kBosToken;
}

const std::string& BpeTokenizer::chat_template() const { return impl_->chat_template; }

BpeTokenizer BpeTokenizer::parse(const std::string& text, const std::string& source,
                                 const std::string& config_text, const std::string& config_source) {
  JsonFile f{source};
  json root = f.parse(text);
  f.object(root, "(top level)");
  auto impl = std::make_shared<Impl>();
  impl->source = source;

  const json& model = f.object(f.need(root, "", "model"), "model");
  if (const json* type = JsonFile::find(model, "type")) {
    std::string t = f.string(*type, "model.type");
    if (t != "BPE") f.fail("model.type", "unsupported model '" + t + "' (brigade reads BPE)");
  }
  if (const json* dropout = JsonFile::find(model, "dropout"))
    if (!dropout->is_number() || dropout->get<double>() != 0.0) f.fail("model.dropout", "BPE dropout is not supported");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (const json* v = JsonFile::find(model, key))
      if (f.string(*v, std::string("model.") + key) != "")
        f.fail(std::string("model.") + key, "not supported by a byte-level BPE");
  if (f.boolean(model, "model", "byte_fallback", false)) f.fail("model.byte_fallback", "not supported");
  f.boolean(model, "model", "fuse_unk", false);
  impl->ignore_merges = f.boolean(model, "model", "ignore_merges", false);

  // Vocabulary and added tokens: ids must be exactly 0..N-1.
  const json& vocab = f.object(f.need(model, "model", "vocab"), "model.vocab");
  std::vector<std::pair<std::string, int64_t>> entries;
  entries.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it)
    entries.emplace_back(it.key(), f.integer(it.value(), "model.vocab['" + it.key() + "']"));
  const json* added_json = JsonFile::find(root, "added_tokens");
  if (added_json) f.array(*added_json, "added_tokens");
  std::unordered_map<std::string, int64_t> vocab_ids;
  for (const auto& [token, id] : entries) vocab_ids.emplace(token, id);
  size_t extra = 0;  // added tokens not already in the vocab
  if (added_json) {
    for (size_t i = 0; i < added_json->size(); ++i) {
      std::string field = "added_tokens[" + std::to_string(i) + "]";
      const json& t = f.object((*added_json)[i], field);
      AddedToken token;
      token.content = f.string(f.need(t, field, "content"), field + ".content");
      if (token.content.empty()) f.fail(field + ".content", "empty");
      int64_t id = f.integer(f.need(t, field, "id"), field + ".id");
      token.id = static_cast<int32_t>(std::clamp<int64_t>(id, -1, INT32_MAX));
      token.special = f.boolean(t, field, "special", false);
      token.normalized = f.boolean(t, field, "normalized", !token.special);
      token.lstrip = f.boolean(t, field, "lstrip", false);
      token.rstrip = f.boolean(t, field, "rstrip", false);
      token.single_word = f.boolean(t, field, "single_word", false);
      auto in_vocab = vocab_ids.find(token.content);
      if (in_vocab == vocab_ids.end()) {
        ++extra;
      } else if (in_vocab->second != id) {
        f.fail(field + ".id", "id " + std::to_string(id) + " but model.vocab has '" + token.content + "' as id " +
                                  std::to_string(in_vocab->second));
      }
      if (id < 0) f.fail(field + ".id", "negative id " + std::to_string(id));
      impl->added.push_back(std::move(token));
    }
  }
  const size_t total = entries.size() + extra;
  impl->tokens.assign(total, {});
  std::vector<bool> used(total, false);
  for (const auto& [token, id] : entries) {
    std::string field = "model.vocab['" + token + "']";
    if (id < 0 || static_cast<size_t>(id) >= total)
      f.fail(field, "id " + std::to_string(id) + " out of range: ids of model.vocab and added_tokens must be 0.." +
                        std::to_string(total - 1));
    if (used[id]) f.fail(field, "id " + std::to_string(id) + " is also used by '" + impl->tokens[id] + "'");
    used[id] = true;
    impl->tokens[id] = token;
  }
  for (size_t i = 0; i < impl->added.size(); ++i) {
    const AddedToken& t = impl->added[i];
    std::string field = "added_tokens[" + std::to_string(i) + "].id";
    if (static_cast<size_t>(t.id) >= total)
      f.fail(field, "id " + std::to_string(t.id) + " out of range: ids of model.vocab and added_tokens must be 0.." +
                        std::to_string(total - 1));
    if (vocab_ids.count(t.content)) continue;
    if (used[t.id]) f.fail(field, "id " + std::to_string(t.id) + " is also used by '" + impl->tokens[t.id] + "'");
    used[t.id] = true;
    impl->tokens[t.id] = t.content;
  }

  if (const json* unk = JsonFile::find(model, "unk_token")) {
    std::string content = f.string(*unk, "model.unk_token");
    auto it = vocab_ids.find(content);
    if (it == vocab_ids.end()) f.fail("model.unk_token", "'" + content + "' is not in model.vocab");
    impl->unk_id = static_cast<int32_t>(it->second);
  }

  const json& merges = f.array(f.need(model, "model", "merges"), "model.merges");
  impl->merge_tokens.reserve(merges.size());
  for (size_t k = 0; k < merges.size(); ++k) {
    std::string field = "model.merges[" + std::to_string(k) + "]";
    const json& m = merges[k];
    if (m.is_string()) {
      std::string s = m.get<std::string>();
      size_t space = s.find(' ');
      if (space == std::string::npos || space == 0 || space + 1 == s.size() || s.find(' ', space + 1) != std::string::npos)
        f.fail(field, "'" + s + "' is not two tokens separated by one space");
      impl->merge_tokens.emplace_back(s.substr(0, space), s.substr(space + 1));
    } else if (m.is_array() && m.size() == 2) {
      impl->merge_tokens.emplace_back(f.string(m[0], field + "[0]"), f.string(m[1], field + "[1]"));
    } else {
      f.fail(field, std::string("expected \"left right\" or [\"left\", \"right\"], found ") + m.type_name());
    }
  }

  if (const json* normalizer = JsonFile::find(root, "normalizer")) read_normalizer(f, *normalizer, "normalizer", &impl->nfc);
  impl->pre = read_pre_tokenizer(f, root);
  if (const json* decoder = JsonFile::find(root, "decoder")) {
    std::string type = f.type_of(*decoder, "decoder");
    if (type != "ByteLevel") f.fail("decoder.type", "unsupported decoder '" + type + "' (brigade supports ByteLevel)");
  }
  if (const json* post = JsonFile::find(root, "post_processor")) {
    impl->post_processor_json = post->dump();
    // Whether it puts a special token first (Llama 3's BOS): the model's BOS convention.
    auto starts_with_special = [](const json& p) {
      return p.is_object() && p.value("type", "") == "TemplateProcessing" && p.contains("single") &&
             p["single"].is_array() && !p["single"].empty() && p["single"][0].is_object() &&
             p["single"][0].contains("SpecialToken");
    };
    impl->post_processor_adds_bos = starts_with_special(*post);
    if (post->is_object() && post->value("type", "") == "Sequence" && post->contains("processors")) {
      for (const json& p : (*post)["processors"]) impl->post_processor_adds_bos |= starts_with_special(p);
    }
  }

  // build() turns merge strings into ids; the roles need the added-token index first.
  BpeTokenizer tokenizer = make_bpe_tokenizer(impl);
  if (!config_text.empty()) read_config_roles(config_text, config_source.empty() ? source : config_source, *impl);
  return tokenizer;
}

// ---------------------------------------------------------------------------------
// The byte tokenizer as a BPE, and saving.

BpeTokenizer BpeTokenizer::from_byte_tokenizer() {
  auto impl = std::make_shared<Impl>();
  for (int b = 0; b < 256; ++b) impl->tokens.push_back(byte_to_token_char(static_cast<uint8_t>(b)));
  for (std::string_view special : {kBosToken, kEosToken, kPadToken, kImStartToken, kImEndToken}) {
    AddedToken t;
    t.content = std::string(special);
    t.id = static_cast<int32_t>(impl->tokens.size());
    t.special = true;
    impl->tokens.push_back(t.content);
    impl->added.push_back(std::move(t));
  }
  PreTokenizerStep byte_level;
  byte_level.use_regex = true;
  impl->pre.push_back(std::move(byte_level));
  return make_bpe_tokenizer(std::move(impl));
}

void BpeTokenizer::save(const fs::path& dir, const std::string& chat_template) const {
  const Impl& impl = *impl_;
  fs::create_directories(dir);

  ordered_json root;
  root["version"] = "1.0";
  root["truncation"] = nullptr;
  root["padding"] = nullptr;
  ordered_json added = ordered_json::array();
  for (const AddedToken& t : impl.added)
    added.push_back({{"id", t.id}, {"content", t.content}, {"single_word", t.single_word}, {"lstrip", t.lstrip},
                     {"rstrip", t.rstrip}, {"normalized", t.normalized}, {"special", t.special}});
  root["added_tokens"] = added;
  root["normalizer"] = impl.nfc ? ordered_json{{"type", "NFC"}} : ordered_json(nullptr);
  ordered_json steps = ordered_json::array();
  for (const PreTokenizerStep& step : impl.pre) {
    if (step.kind == PreTokenizerStep::Kind::kSplit)
      steps.push_back({{"type", "Split"},
                       {"pattern", {{step.literal ? "String" : "Regex", step.pattern}}},
                       {"behavior", step.remove ? "Removed" : "Isolated"},
                       {"invert", false}});
    else
      steps.push_back({{"type", "ByteLevel"}, {"add_prefix_space", step.add_prefix_space}, {"trim_offsets", false},
                       {"use_regex", step.use_regex}});
  }
  root["pre_tokenizer"] = steps.size() == 1 ? steps[0] : ordered_json{{"type", "Sequence"}, {"pretokenizers", steps}};
  root["post_processor"] = ordered_json::parse(impl.post_processor_json);
  root["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  ordered_json model;
  model["type"] = "BPE";
  model["dropout"] = nullptr;
  model["unk_token"] = impl.unk_id >= 0 ? ordered_json(impl.tokens[impl.unk_id]) : ordered_json(nullptr);
  model["continuing_subword_prefix"] = nullptr;
  model["end_of_word_suffix"] = nullptr;
  model["fuse_unk"] = false;
  model["byte_fallback"] = false;
  model["ignore_merges"] = impl.ignore_merges;
  ordered_json vocab = ordered_json::object();
  for (size_t id = 0; id < impl.tokens.size(); ++id) vocab[impl.tokens[id]] = id;
  model["vocab"] = std::move(vocab);
  ordered_json merges = ordered_json::array();
  for (const auto& [left, right] : impl.merge_tokens) merges.push_back({left, right});
  model["merges"] = std::move(merges);
  root["model"] = std::move(model);

  ordered_json config;
  config["tokenizer_class"] = "PreTrainedTokenizerFast";
  const std::pair<const char*, std::string_view> roles[] = {
      {"bos_token", kBosToken}, {"eos_token", kEosToken}, {"pad_token", kPadToken}};
  for (const auto& [key, role] : roles)
    if (auto id = special_id(role)) config[key] = impl.tokens[static_cast<size_t>(*id)];
  ordered_json decoder = ordered_json::object();
  for (const AddedToken& t : impl.added)
    decoder[std::to_string(t.id)] = {{"content", t.content}, {"lstrip", t.lstrip}, {"normalized", t.normalized},
                                     {"rstrip", t.rstrip}, {"single_word", t.single_word}, {"special", t.special}};
  config["added_tokens_decoder"] = std::move(decoder);
  config["clean_up_tokenization_spaces"] = false;
  if (special_id(kBosToken)) config["add_bos_token"] = add_bos();
  if (!chat_template.empty()) config["chat_template"] = chat_template;
  else if (!impl.chat_template.empty()) config["chat_template"] = impl.chat_template;

  try {
    write_file_atomic(dir / "tokenizer.json", root.dump(2) + "\n");
    write_file_atomic(dir / "tokenizer_config.json", config.dump(2) + "\n");
  } catch (const nlohmann::json::exception& e) {
    BRIGADE_FAIL("cannot save tokenizer to ", dir.string(), ": ", e.what());
  }
}

}  // namespace brigade::data
