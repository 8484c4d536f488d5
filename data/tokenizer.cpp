#include "data/tokenizer.h"

#include <filesystem>

#include "core/error.h"
#include "data/bpe.h"

namespace brigade::data {

namespace {
constexpr int64_t kByteCount = 256;

int64_t required_special(const Tokenizer& tokenizer, std::string_view name) {
  std::optional<int64_t> id = tokenizer.special_id(name);
  BRIGADE_CHECK(id.has_value(), "tokenizer '", tokenizer.name(), "' has no special token ", name);
  return *id;
}
}  // namespace

int64_t Tokenizer::bos_id() const { return required_special(*this, kBosToken); }
int64_t Tokenizer::eos_id() const { return required_special(*this, kEosToken); }
int64_t Tokenizer::pad_id() const { return required_special(*this, kPadToken); }

const std::string& Tokenizer::chat_template() const {
  static const std::string none;
  return none;
}

std::vector<int64_t> sequence_start(const Tokenizer& tokenizer) {
  if (!tokenizer.add_bos()) return {};
  return {tokenizer.bos_id()};
}

ByteTokenizer::ByteTokenizer()
    : specials_{std::string(kBosToken), std::string(kEosToken), std::string(kPadToken),
                std::string(kImStartToken), std::string(kImEndToken)} {}

std::vector<int64_t> ByteTokenizer::encode(std::string_view text, bool allow_special) const {
  std::vector<int64_t> ids;
  ids.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    if (allow_special && text[i] == '<') {
      bool matched = false;
      for (size_t s = 0; s < specials_.size(); ++s) {
        if (text.substr(i).starts_with(specials_[s])) {
          ids.push_back(kByteCount + static_cast<int64_t>(s));
          i += specials_[s].size();
          matched = true;
          break;
        }
      }
      if (matched) continue;
    }
    ids.push_back(static_cast<unsigned char>(text[i]));
    ++i;
  }
  return ids;
}

std::string ByteTokenizer::decode(std::span<const int64_t> ids) const {
  std::string text;
  text.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    int64_t id = ids[i];
    BRIGADE_CHECK(id >= 0 && id < vocab_size(), "byte tokenizer: cannot decode token id ", id,
                  " at position ", i, " (vocabulary is 0..", vocab_size() - 1, ")");
    if (id < kByteCount)
      text.push_back(static_cast<char>(id));
    else
      text += specials_[static_cast<size_t>(id - kByteCount)];
  }
  return text;
}

int64_t ByteTokenizer::vocab_size() const {
  return kByteCount + static_cast<int64_t>(specials_.size());
}

std::optional<int64_t> ByteTokenizer::special_id(std::string_view name) const {
  for (size_t s = 0; s < specials_.size(); ++s)
    if (specials_[s] == name) return kByteCount + static_cast<int64_t>(s);
  return std::nullopt;
}

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& name) {
  if (name == "byte") return std::make_unique<ByteTokenizer>();
  // A Hugging Face tokenizer: a tokenizer.json, or a model directory holding one.
  if (const auto path = find_tokenizer_json(name); !path.empty())
    return std::make_unique<BpeTokenizer>(BpeTokenizer::load(path));
  BRIGADE_FAIL("unknown tokenizer '", name,
               "' (known: byte), and no Hugging Face tokenizer.json at that path (a file, or a directory holding one)");
}

std::filesystem::path find_tokenizer_json(const std::string& name) {
  const std::filesystem::path path(name);
  if (std::filesystem::is_directory(path) && std::filesystem::is_regular_file(path / "tokenizer.json"))
    return path / "tokenizer.json";
  if (std::filesystem::is_regular_file(path)) return path;
  return {};
}

}  // namespace brigade::data
