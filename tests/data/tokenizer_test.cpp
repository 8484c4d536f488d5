#include <gtest/gtest.h>

#include "data/tokenizer.h"
#include "tests/testing.h"

namespace brigade::data {
namespace {

TEST(ByteTokenizer, VocabularyAndSpecialIds) {
  ByteTokenizer tok;
  EXPECT_EQ(tok.vocab_size(), 261);
  EXPECT_EQ(tok.name(), "byte");
  EXPECT_EQ(tok.bos_id(), 256);
  EXPECT_EQ(tok.eos_id(), 257);
  EXPECT_EQ(tok.pad_id(), 258);
  EXPECT_EQ(tok.special_id(kImStartToken), 259);
  EXPECT_EQ(tok.special_id(kImEndToken), 260);
  EXPECT_EQ(tok.special_id("<|nope|>"), std::nullopt);
}

TEST(ByteTokenizer, AsciiIdsAreBytes) {
  ByteTokenizer tok;
  EXPECT_EQ(tok.encode("Hi!"), (std::vector<int64_t>{72, 105, 33}));
  EXPECT_TRUE(tok.encode("").empty());
}

TEST(ByteTokenizer, Utf8RoundTrip) {
  ByteTokenizer tok;
  const std::string text = "naïve café — 日本語 🙂\n\t\x01";
  std::vector<int64_t> ids = tok.encode(text);
  EXPECT_EQ(ids.size(), text.size());  // one id per byte
  // "ï" is the two bytes C3 AF.
  EXPECT_EQ(ids[2], 0xC3);
  EXPECT_EQ(ids[3], 0xAF);
  for (int64_t id : ids) {
    EXPECT_GE(id, 0);
    EXPECT_LT(id, 256);
  }
  EXPECT_EQ(tok.decode(ids), text);
}

TEST(ByteTokenizer, SpecialsOnlyWithAllowSpecial) {
  ByteTokenizer tok;
  const std::string text = "<|im_start|>user\nhi<|im_end|><|eos|>";
  std::vector<int64_t> plain = tok.encode(text);
  EXPECT_EQ(plain.size(), text.size());
  EXPECT_EQ(plain[0], '<');
  EXPECT_EQ(tok.decode(plain), text);

  std::vector<int64_t> special = tok.encode(text, /*allow_special=*/true);
  std::vector<int64_t> expected = {259, 'u', 's', 'e', 'r', '\n', 'h', 'i', 260, 257};
  EXPECT_EQ(special, expected);
  EXPECT_EQ(tok.decode(special), text);
}

TEST(ByteTokenizer, PartialSpecialStaysText) {
  ByteTokenizer tok;
  std::vector<int64_t> ids = tok.encode("a<|bos|<|bos|>", true);
  std::vector<int64_t> expected = {'a', '<', '|', 'b', 'o', 's', '|', 256};
  EXPECT_EQ(ids, expected);
}

TEST(ByteTokenizer, DecodeRendersSpecialNames) {
  ByteTokenizer tok;
  std::vector<int64_t> ids = {256, 'o', 'k', 257, 258};
  EXPECT_EQ(tok.decode(ids), "<|bos|>ok<|eos|><|pad|>");
}

TEST(ByteTokenizer, DecodeOutOfRangeIsError) {
  ByteTokenizer tok;
  std::vector<int64_t> high = {'a', 261};
  EXPECT_BRIGADE_ERROR(tok.decode(high), "token id 261 at position 1");
  std::vector<int64_t> negative = {-1};
  EXPECT_BRIGADE_ERROR(tok.decode(negative), "token id -1");
}

TEST(MakeTokenizer, ByName) {
  auto tok = make_tokenizer("byte");
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->name(), "byte");
  EXPECT_EQ(tok->vocab_size(), 261);
  EXPECT_BRIGADE_ERROR(make_tokenizer("gpt2"), "unknown tokenizer 'gpt2' (known: byte)");
}

}  // namespace
}  // namespace brigade::data
