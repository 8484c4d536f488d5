// Tokenizers. `Tokenizer` is the interface the rest of brigade uses; the byte-level
// tokenizer here needs no vocabulary file, and data/bpe.h's BpeTokenizer (Hugging
// Face tokenizer.json, byte-level BPE) implements the same interface.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace brigade::data {

// Names of the special tokens every brigade tokenizer provides.
inline constexpr std::string_view kBosToken = "<|bos|>";
inline constexpr std::string_view kEosToken = "<|eos|>";
inline constexpr std::string_view kPadToken = "<|pad|>";
inline constexpr std::string_view kImStartToken = "<|im_start|>";  // chat turn start (ChatML)
inline constexpr std::string_view kImEndToken = "<|im_end|>";      // chat turn end

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Token ids for `text`. With allow_special, the special-token strings above found in
  // the text become their ids; otherwise they are encoded as ordinary text.
  virtual std::vector<int64_t> encode(std::string_view text, bool allow_special = false) const = 0;
  // Text for `ids`; special tokens render as their names. Ids outside the vocabulary
  // are an Error.
  virtual std::string decode(std::span<const int64_t> ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  // The id of a special token by name ("<|eos|>"), if this tokenizer has it.
  virtual std::optional<int64_t> special_id(std::string_view name) const = 0;
  virtual std::string name() const = 0;

  int64_t bos_id() const;
  int64_t eos_id() const;
  int64_t pad_id() const;

  // The model's convention: whether a sequence starts with the BOS token (Llama,
  // Mistral, brigade's byte tokenizer: yes; Qwen2/3, SmolLM2: no). Hugging Face
  // tokenizers say it in tokenizer_config.json's add_bos_token or their
  // post-processor, GGUF files in tokenizer.ggml.add_bos_token.
  virtual bool add_bos() const { return true; }
  // The Jinja chat template the model ships (tokenizer_config.json `chat_template`,
  // a chat_template.jinja beside it, GGUF `tokenizer.chat_template`); empty if none.
  virtual const std::string& chat_template() const;
};

// The tokens every sequence starts with: the BOS token when the tokenizer's
// convention adds one, else none.
std::vector<int64_t> sequence_start(const Tokenizer& tokenizer);

// Bytes 0..255 are ids 0..255; special tokens follow at 256.. in the order
// bos, eos, pad, im_start, im_end.
class ByteTokenizer final : public Tokenizer {
 public:
  ByteTokenizer();
  std::vector<int64_t> encode(std::string_view text, bool allow_special = false) const override;
  std::string decode(std::span<const int64_t> ids) const override;
  int64_t vocab_size() const override;
  std::optional<int64_t> special_id(std::string_view name) const override;
  std::string name() const override { return "byte"; }

 private:
  std::vector<std::string> specials_;
};

// Factory by recipe name: "byte", or the path of a tokenizer.json (or of a directory
// holding one) for a BpeTokenizer; anything else is an Error saying what is accepted.
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& name);

}  // namespace brigade::data
