#include "data/spm.h"

#include <algorithm>
#include <queue>

#include "core/error.h"

namespace brigade::data {

namespace {

constexpr std::string_view kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's space

std::string byte_token_text(unsigned char byte) {
  static const char* hex = "0123456789ABCDEF";
  return std::string{'<', '0', 'x', hex[byte >> 4], hex[byte & 15], '>'};
}

// Bytes of the UTF-8 character starting with `lead` (1 for a stray continuation byte).
size_t utf8_length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead >> 5) == 0x6) return 2;
  if ((lead >> 4) == 0xE) return 3;
  if ((lead >> 3) == 0x1E) return 4;
  return 1;
}

std::string replace_all(std::string text, std::string_view from, std::string_view to) {
  for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size())) {
    text.replace(at, from.size(), to);
  }
  return text;
}

bool is_type(int32_t type, SpmTokenType t) { return type == static_cast<int32_t>(t); }

}  // namespace

SpmTokenizer::SpmTokenizer(SpmVocabulary vocabulary, std::string source)
    : vocab_(std::move(vocabulary)), source_(std::move(source)) {
  const size_t n = vocab_.tokens.size();
  BRIGADE_CHECK(n > 0, source_, ": the SentencePiece vocabulary is empty");
  BRIGADE_CHECK(vocab_.scores.size() == n && vocab_.types.size() == n, source_, ": ", n, " tokens but ",
                vocab_.scores.size(), " scores and ", vocab_.types.size(), " token types");
  for (size_t id = 0; id < n; ++id) {
    BRIGADE_CHECK(vocab_.types[id] >= 1 && vocab_.types[id] <= 6, source_, ": token ", id, " has token type ",
                  vocab_.types[id], " (llama.cpp's types are 1..6)");
    ids_[vocab_.tokens[id]] = static_cast<int64_t>(id);
  }
  for (const auto& [role, id] : {std::pair{"bos", vocab_.bos}, {"eos", vocab_.eos}, {"pad", vocab_.pad}, {"unk", vocab_.unk}}) {
    BRIGADE_CHECK(!id || (*id >= 0 && *id < static_cast<int64_t>(n)), source_, ": the ", role, " token id ", *id,
                  " is not a token id (", n, " tokens)");
  }
  for (int b = 0; b < 256; ++b) {
    auto it = ids_.find(byte_token_text(static_cast<unsigned char>(b)));
    if (it == ids_.end()) it = ids_.find(std::string(1, static_cast<char>(b)));
    BRIGADE_CHECK(it != ids_.end(), source_, ": the vocabulary has no byte token ", byte_token_text(static_cast<unsigned char>(b)),
                  " (brigade reads SentencePiece vocabularies with byte fallback)");
    byte_ids_[b] = it->second;
  }
  for (size_t id = 0; id < n; ++id) {
    const int32_t type = vocab_.types[id];
    if (!vocab_.tokens[id].empty() && (is_type(type, SpmTokenType::kControl) || is_type(type, SpmTokenType::kUserDefined) ||
                                       is_type(type, SpmTokenType::kUnknown))) {
      specials_.push_back(static_cast<int64_t>(id));
    }
  }
  std::stable_sort(specials_.begin(), specials_.end(), [&](int64_t a, int64_t b) {
    return vocab_.tokens[static_cast<size_t>(a)].size() > vocab_.tokens[static_cast<size_t>(b)].size();
  });
}

std::optional<int64_t> SpmTokenizer::special_id(std::string_view name) const {
  if (name == kBosToken) return vocab_.bos;
  if (name == kEosToken) return vocab_.eos;
  if (name == kPadToken) return vocab_.pad;
  auto it = ids_.find(std::string(name));
  if (it == ids_.end()) return std::nullopt;
  const int32_t type = vocab_.types[static_cast<size_t>(it->second)];
  if (is_type(type, SpmTokenType::kControl) || is_type(type, SpmTokenType::kUserDefined)) return it->second;
  return std::nullopt;
}

// Merges of one piece (already with ▁ for spaces) by score, as llama.cpp's
// llm_tokenizer_spm_session does.
void SpmTokenizer::encode_piece(std::string text, std::vector<int64_t>& out) const {
  struct Symbol {
    int prev, next;
    size_t start, length;
  };
  std::vector<Symbol> symbols;
  for (size_t at = 0; at < text.size();) {
    const size_t length = std::min(text.size() - at, utf8_length(static_cast<unsigned char>(text[at])));
    const int index = static_cast<int>(symbols.size());
    symbols.push_back({index - 1, at + length == text.size() ? -1 : index + 1, at, length});
    at += length;
  }
  if (symbols.empty()) return;
  struct Bigram {
    int left, right;
    float score;
    size_t length;
  };
  // Highest score first; among equal scores, the leftmost pair.
  auto lower = [](const Bigram& a, const Bigram& b) { return a.score < b.score || (a.score == b.score && a.left > b.left); };
  std::priority_queue<Bigram, std::vector<Bigram>, decltype(lower)> queue(lower);
  auto try_pair = [&](int left, int right) {
    if (left < 0 || right < 0) return;
    const Symbol& l = symbols[static_cast<size_t>(left)];
    const Symbol& r = symbols[static_cast<size_t>(right)];
    auto it = ids_.find(text.substr(l.start, l.length + r.length));
    if (it == ids_.end()) return;
    queue.push({left, right, vocab_.scores[static_cast<size_t>(it->second)], l.length + r.length});
  };
  for (size_t i = 1; i < symbols.size(); ++i) try_pair(static_cast<int>(i) - 1, static_cast<int>(i));
  while (!queue.empty()) {
    const Bigram b = queue.top();
    queue.pop();
    Symbol& l = symbols[static_cast<size_t>(b.left)];
    Symbol& r = symbols[static_cast<size_t>(b.right)];
    // Stale: one side was merged into something else since this pair was queued.
    if (l.length == 0 || r.length == 0 || l.length + r.length != b.length) continue;
    l.length += r.length;
    r.length = 0;
    l.next = r.next;
    if (r.next >= 0) symbols[static_cast<size_t>(r.next)].prev = b.left;
    try_pair(l.prev, b.left);
    try_pair(b.left, l.next);
  }
  for (int i = 0; i != -1; i = symbols[static_cast<size_t>(i)].next) {
    const Symbol& s = symbols[static_cast<size_t>(i)];
    const std::string piece = text.substr(s.start, s.length);
    auto it = ids_.find(piece);
    if (it != ids_.end()) {
      out.push_back(it->second);
      continue;
    }
    // Only single characters stay unmerged without being tokens: byte fallback.
    for (unsigned char c : piece) out.push_back(byte_ids_[c]);
  }
}

std::vector<int64_t> SpmTokenizer::encode(std::string_view text, bool allow_special) const {
  // The text cut at special tokens, longest token first over the whole text (as
  // llama.cpp partitions it): fragments are raw text (id < 0) or one token.
  struct Fragment {
    int64_t id;  // -1: raw text
    size_t start, length;
  };
  std::vector<Fragment> fragments = {{-1, 0, text.size()}};
  for (int64_t id : specials_) {
    const int32_t type = vocab_.types[static_cast<size_t>(id)];
    if (!allow_special && !is_type(type, SpmTokenType::kUserDefined)) continue;
    const std::string& token = vocab_.tokens[static_cast<size_t>(id)];
    std::vector<Fragment> next;
    for (const Fragment& f : fragments) {
      if (f.id >= 0) {
        next.push_back(f);
        continue;
      }
      size_t at = f.start;
      const size_t end = f.start + f.length;
      while (true) {
        const size_t found = text.substr(0, end).find(token, at);
        if (found == std::string_view::npos) break;
        if (found > at) next.push_back({-1, at, found - at});
        next.push_back({id, found, token.size()});
        at = found + token.size();
      }
      if (at < end) next.push_back({-1, at, end - at});
    }
    fragments = std::move(next);
  }
  std::vector<int64_t> out;
  bool after_special = true;  // the start of the text counts as following one
  for (const Fragment& f : fragments) {
    if (f.id >= 0) {
      out.push_back(f.id);
      after_special = true;
      continue;
    }
    std::string piece = vocab_.add_space_prefix && after_special ? " " : "";
    piece += text.substr(f.start, f.length);
    encode_piece(replace_all(std::move(piece), " ", kSpace), out);
    after_special = false;
  }
  return out;
}

std::string SpmTokenizer::decode(std::span<const int64_t> ids) const {
  std::string text;
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t id = ids[i];
    BRIGADE_CHECK(id >= 0 && id < vocab_size(), source_, ": cannot decode token id ", id, " at position ", i,
                  " (vocabulary is 0..", vocab_size() - 1, ")");
    const std::string& token = vocab_.tokens[static_cast<size_t>(id)];
    if (is_type(vocab_.types[static_cast<size_t>(id)], SpmTokenType::kByte) && token.size() == 6 &&
        token.starts_with("<0x")) {
      text.push_back(static_cast<char>(std::stoi(token.substr(3, 2), nullptr, 16)));
    } else if (is_type(vocab_.types[static_cast<size_t>(id)], SpmTokenType::kNormal)) {
      text += replace_all(token, kSpace, " ");
    } else {
      text += token;
    }
  }
  return text;
}

}  // namespace brigade::data
