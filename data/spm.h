// SentencePiece BPE vocabularies (Llama 2, Mistral v0.1, TinyLlama, ...) as llama.cpp
// runs them: a GGUF file's tokenizer.ggml.model "llama" with its tokens, scores and
// token types.
//
// Encoding a piece of text (between special tokens):
//   1. a space is put in front when add_space_prefix and the piece starts the text
//      or follows a special token; every ' ' becomes U+2581 ("▁");
//   2. the piece is split into UTF-8 characters, and the adjacent pair whose
//      concatenation is a vocabulary token with the highest score is merged,
//      repeatedly (equal scores: the leftmost pair first) until no pair merges;
//   3. each symbol that is a token is emitted; any other (a character the
//      vocabulary lacks) is emitted byte by byte as the <0xXX> byte tokens.
// With allow_special, control tokens (type 3) found in the text become their ids;
// user-defined tokens (type 4) always do, as llama.cpp partitions them.
//
// Decoding: U+2581 back to ' ', byte tokens to their bytes, other tokens as their
// text (control tokens included). The space added by step 1 is kept: decode gives
// what the model sees.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "data/tokenizer.h"

namespace brigade::data {

// llama.cpp's token types (tokenizer.ggml.token_type).
enum class SpmTokenType : int32_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

struct SpmVocabulary {
  std::vector<std::string> tokens;
  std::vector<float> scores;        // one per token
  std::vector<int32_t> types;       // one per token (SpmTokenType values)
  bool add_space_prefix = true;     // tokenizer.ggml.add_space_prefix
  bool add_bos = true;              // tokenizer.ggml.add_bos_token
  std::optional<int64_t> bos, eos, pad, unk;
  std::string chat_template;        // tokenizer.chat_template
};

class SpmTokenizer final : public Tokenizer {
 public:
  // Validates the vocabulary: equal lengths, known types, role ids in range, and a
  // byte token <0xXX> for every byte (an Error naming `source` otherwise).
  SpmTokenizer(SpmVocabulary vocabulary, std::string source);

  std::vector<int64_t> encode(std::string_view text, bool allow_special = false) const override;
  std::string decode(std::span<const int64_t> ids) const override;
  int64_t vocab_size() const override { return static_cast<int64_t>(vocab_.tokens.size()); }
  // The brigade role names (<|bos|>, <|eos|>, <|pad|>) from the role ids; any other
  // name: a control or user-defined token with that text.
  std::optional<int64_t> special_id(std::string_view name) const override;
  std::string name() const override { return source_; }
  bool add_bos() const override { return vocab_.add_bos && vocab_.bos.has_value(); }
  const std::string& chat_template() const override { return vocab_.chat_template; }

  const SpmVocabulary& vocabulary() const { return vocab_; }

 private:
  void encode_piece(std::string text, std::vector<int64_t>& out) const;

  SpmVocabulary vocab_;
  std::string source_;
  std::unordered_map<std::string, int64_t> ids_;  // token text -> id (the first of duplicates)
  int64_t byte_ids_[256] = {};
  std::vector<int64_t> specials_;  // control and user-defined ids, longest text first
};

}  // namespace brigade::data
