// Byte-level BPE tokenizers in Hugging Face's tokenizer.json format (GPT-2, Llama 3,
// Qwen2/Qwen3 families), a BPE trainer, and chat templates.
//
// What load() reads from tokenizer.json (an unsupported value in these fields is an
// Error naming the file and the field; `version`, `truncation`, `padding` and the
// offset options are ignored: encode() never truncates or pads):
//   model           type "BPE"; vocab {token: id}; merges as ["a b", ...] or
//                   [["a", "b"], ...]; ignore_merges; unk_token; dropout null/0;
//                   no continuing_subword_prefix / end_of_word_suffix / byte_fallback.
//   added_tokens    [{id, content, special, normalized, lstrip, rstrip, single_word}].
//                   Ids of vocab and added tokens together must be exactly 0..N-1.
//   normalizer      null, NFC, or a Sequence of NFC (utf8proc).
//   pre_tokenizer   ByteLevel (use_regex: the GPT-2 split; add_prefix_space), or a
//                   Sequence of Split(Regex|String, behavior Isolated|Removed, invert
//                   false) steps ending in ByteLevel (Qwen2, Llama 3). Regexes run in
//                   PCRE2 (UTF + UCP, JIT); `\s`/`\S` become \p{White_Space} so they
//                   match what Oniguruma (HF's engine) matches.
//   decoder         null or ByteLevel.
//   post_processor  kept verbatim for save(); encode() never adds tokens on its own.
//
// Encoding, step by step (HF's order): added tokens with normalized=false are cut
// out of the raw text (special ones only with allow_special; leftmost, then longest
// match); each remaining run of valid UTF-8 is NFC-normalised, cut at added tokens
// with normalized=true, pre-tokenized and BPE-merged (lowest merge rank first, the
// leftmost on ties; with ignore_merges a piece that is itself a token is kept whole).
//
// Invalid UTF-8: Hugging Face cannot be given such text (Python str / Rust String),
// so there is nothing to copy. brigade keeps the raw bytes: each maximal run of
// invalid bytes is its own pre-token, BPE-merged from its single bytes, and the valid
// runs around it are encoded as if the invalid run were a special token between
// them. So decode(encode(x)) == x byte for byte (when x is NFC or there is no
// normaliser), and text that is valid UTF-8 gets exactly HF's ids.
//
// Decoding: ordinary tokens go through the byte-level alphabet back to bytes (a token
// with a character outside it contributes its UTF-8 as HF's decoder does); added
// tokens decode to their literal content. No lossy UTF-8 repair: the bytes come back.
//
// Special-token roles (special_id): for the brigade role names <|bos|>, <|eos|>,
// <|pad|>, the bos_token / eos_token / pad_token of a tokenizer_config.json next to
// the tokenizer.json (a string or {"content": ...}; null means "not set") win; else
// the first token that exists among
//   <|bos|>: <|bos|>, <|begin_of_text|>, <|endoftext|>
//   <|eos|>: <|eos|>, <|end_of_text|>, <|endoftext|>
//   <|pad|>: <|pad|>, <|finetune_right_pad_id|>, <|endoftext|>
//   <|im_start|>: <|im_start|>
//   <|im_end|>: <|im_end|>, <|eot_id|>
// and any other name is looked up as the literal content of an added token.
//
// The encoder caches word -> ids per thread (no locks; bounded), so encode() is safe
// to call from several threads on one tokenizer.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "data/tokenizer.h"

namespace brigade::data {

class BpeTokenizer final : public Tokenizer {
 public:
  // Reads a tokenizer.json (model.type "BPE" with a ByteLevel pre-tokenizer/decoder).
  // Special-token roles (the brigade names <|bos|>, <|eos|>, <|pad|>) come from a
  // tokenizer_config.json next to it when present (bos_token, eos_token, pad_token),
  // else from well-known names. Any malformed field is an Error naming the file and
  // the field.
  static BpeTokenizer load(const std::filesystem::path& tokenizer_json);
  // The same from tokenizer.json text (`source` names it in errors) and, when not
  // empty, tokenizer_config.json text for the special-token roles.
  static BpeTokenizer parse(const std::string& tokenizer_json, const std::string& source,
                            const std::string& tokenizer_config = {}, const std::string& config_source = {});

  // brigade's byte tokenizer as a byte-level BPE without merges: the same ids
  // (bytes 0..255, then the special tokens at 256..), so a model trained with the
  // byte tokenizer exports with a tokenizer.json / GGUF vocabulary.
  static BpeTokenizer from_byte_tokenizer();

  // Writes tokenizer.json (and tokenizer_config.json with the special-token roles,
  // add_bos_token, and `chat_template` when non-empty: the given one, else the
  // tokenizer's own) into `dir`.
  void save(const std::filesystem::path& dir, const std::string& chat_template = {}) const;

  std::vector<int64_t> encode(std::string_view text, bool allow_special = false) const override;
  std::string decode(std::span<const int64_t> ids) const override;
  int64_t vocab_size() const override;
  std::optional<int64_t> special_id(std::string_view name) const override;
  std::string name() const override;
  // tokenizer_config.json's add_bos_token when it has one; else whether the
  // post-processor is a TemplateProcessing that starts with a special token; else
  // whether the BOS role is brigade's own <|bos|> (tokenizers brigade trained, which
  // have always started documents with it).
  bool add_bos() const override;
  // tokenizer_config.json's chat_template (a string, or the "default" of a list of
  // named templates), else chat_template.jinja beside the tokenizer.json.
  const std::string& chat_template() const override;

  // What a GGUF vocabulary needs (tokenizer.ggml.*):
  // id -> token string as stored in tokenizer.json (byte-level unicode form for
  // ordinary tokens, the literal content for added tokens).
  const std::vector<std::string>& tokens() const;
  // Merge rules in priority order, each "left right".
  const std::vector<std::string>& merges() const;
  bool is_special(int64_t id) const;     // an added token marked special
  bool is_added(int64_t id) const;       // any added token
  // The pre-tokenizer family: "gpt2", "llama-bpe" (Llama 3) or "qwen2" — llama.cpp's
  // tokenizer.ggml.pre names — chosen from the split regex; "default" for a regex
  // that is none of those.
  std::string pre_tokenizer() const;

  struct Impl;  // data/bpe_impl.h

 private:
  explicit BpeTokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  friend BpeTokenizer make_bpe_tokenizer(std::shared_ptr<Impl> impl);
  std::shared_ptr<const Impl> impl_;  // immutable once built: copies share it
};

// The split regex of a pre-tokenizer family ("gpt2", "llama-bpe", "qwen2", as
// pre_tokenizer() names them); empty for any other name.
std::string pre_tokenizer_pattern(std::string_view family);

// The tokenizer.json a tokenizer name refers to: the file itself, or the
// tokenizer.json inside a directory; empty when `name` is neither ("byte", a typo).
std::filesystem::path find_tokenizer_json(const std::string& name);

// Trains a byte-level BPE vocabulary of `vocab_size` ids (the 256 byte tokens, the
// merges, then `special_tokens` as added tokens) on `corpus` with the pre-tokenizer
// regex `pattern` (empty: the Qwen2 pattern) and an NFC normaliser, like Qwen2.
// Special tokens found in the corpus are cut out before counting. Each step merges
// the most frequent adjacent pair; ties go to the smallest (left id, right id), so
// the result depends only on the corpus. Fewer merges when the corpus runs out of
// pairs. Pair counts are updated incrementally (only words holding the merged pair
// are revisited).
BpeTokenizer train_bpe(std::span<const std::string> corpus, int64_t vocab_size,
                       const std::vector<std::string>& special_tokens, const std::string& pattern = {});

struct ChatMessage {
  std::string role;     // "system", "user", "assistant"
  std::string content;
};
// Renders a conversation in a model family's format: "chatml" (Qwen2/Qwen3) or
// "llama3"; with add_generation_prompt the assistant's header ends the text.
std::string apply_chat_template(const std::string& family, std::span<const ChatMessage> messages,
                                bool add_generation_prompt);
// The same template as a Jinja string for tokenizer_config.json.
std::string chat_template_jinja(const std::string& family);

}  // namespace brigade::data
