#include <gtest/gtest.h>

#include <numeric>

#include "data/corpus.h"
#include "data/shard.h"
#include "tests/testing.h"

namespace brigade::data {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

// Shard of tokens first..first+count-1 with mask = token % 2 (when with_mask).
fs::path write_range_shard(const fs::path& path, int64_t first, int64_t count, bool with_mask) {
  ShardWriter writer(path, 1000, with_mask);
  std::vector<int64_t> tokens(static_cast<size_t>(count));
  std::iota(tokens.begin(), tokens.end(), first);
  std::vector<uint8_t> mask;
  if (with_mask)
    for (int64_t t : tokens) mask.push_back(static_cast<uint8_t>(t % 2));
  if (count > 0) writer.add_document(tokens, mask);
  writer.finish();
  return path;
}

std::vector<int64_t> read_tokens(const TokenCorpus& corpus, int64_t start, int64_t len,
                                 std::vector<uint8_t>* mask = nullptr) {
  std::vector<int64_t> tokens(static_cast<size_t>(len));
  std::vector<uint8_t> m(static_cast<size_t>(len));
  corpus.read(start, len, tokens.data(), m.data());
  if (mask) *mask = m;
  return tokens;
}

std::vector<int64_t> range(int64_t first, int64_t count) {
  std::vector<int64_t> v(static_cast<size_t>(count));
  std::iota(v.begin(), v.end(), first);
  return v;
}

TEST(TokenCorpus, FromTokens) {
  TokenCorpus corpus = TokenCorpus::from_tokens({5, 9, 2, 7}, {1, 0, 1, 1});
  EXPECT_EQ(corpus.size(), 4);
  EXPECT_EQ(corpus.vocab_bound(), 10);
  std::vector<uint8_t> mask;
  EXPECT_EQ(read_tokens(corpus, 1, 3, &mask), (std::vector<int64_t>{9, 2, 7}));
  EXPECT_EQ(mask, (std::vector<uint8_t>{0, 1, 1}));

  TokenCorpus unmasked = TokenCorpus::from_tokens({3, 4});
  EXPECT_EQ(read_tokens(unmasked, 0, 2, &mask), (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(mask, (std::vector<uint8_t>{1, 1}));

  TokenCorpus empty = TokenCorpus::from_tokens({});
  EXPECT_EQ(empty.size(), 0);
  EXPECT_EQ(empty.vocab_bound(), 0);
}

TEST(TokenCorpus, FromTokensRejectsBadInput) {
  EXPECT_BRIGADE_ERROR(TokenCorpus::from_tokens({1, 2, 3}, {1, 1}), "3 tokens but 2 mask values");
  EXPECT_BRIGADE_ERROR(TokenCorpus::from_tokens({1, -4}), "token 1 has negative id -4");
  EXPECT_BRIGADE_ERROR(TokenCorpus::from_tokens({1, 2}, {1, 3}), "mask value 3 at token 1");
}

TEST(TokenCorpus, ReadsAcrossShardBoundaries) {
  TempDir dir;
  // Segments: [0,10) [10,13) [13,13) empty [13,30) with masks on the first only.
  std::vector<fs::path> paths = {
      write_range_shard(dir / "a.bin", 0, 10, true),
      write_range_shard(dir / "b.bin", 10, 3, false),
      write_range_shard(dir / "c.bin", 0, 0, false),
      write_range_shard(dir / "d.bin", 13, 17, false),
  };
  TokenCorpus corpus = TokenCorpus::from_shards(paths);
  EXPECT_EQ(corpus.size(), 30);
  EXPECT_EQ(corpus.vocab_bound(), 1000);

  std::vector<uint8_t> mask;
  // Spans all three non-empty segments.
  EXPECT_EQ(read_tokens(corpus, 7, 20, &mask), range(7, 20));
  std::vector<uint8_t> expected_mask = {1, 0, 1};  // tokens 7, 8, 9 have mask t % 2
  expected_mask.resize(20, 1);
  EXPECT_EQ(mask, expected_mask);
  // Exactly one segment, at its edges.
  EXPECT_EQ(read_tokens(corpus, 10, 3), range(10, 3));
  EXPECT_EQ(read_tokens(corpus, 13, 1), range(13, 1));
  EXPECT_EQ(read_tokens(corpus, 29, 1), range(29, 1));
  EXPECT_EQ(read_tokens(corpus, 0, 30), range(0, 30));
  // Every window agrees with the concatenation.
  for (int64_t start = 0; start < 30; ++start)
    for (int64_t len = 0; start + len <= 30; len += 4)
      EXPECT_EQ(read_tokens(corpus, start, len), range(start, len)) << start << "+" << len;
}

TEST(TokenCorpus, FromShardsErrors) {
  EXPECT_BRIGADE_ERROR(TokenCorpus::from_shards({}), "token corpus: no shard files given");
  TempDir dir;
  std::vector<fs::path> paths = {write_range_shard(dir / "a.bin", 0, 4, false), dir / "gone.bin"};
  EXPECT_BRIGADE_ERROR(TokenCorpus::from_shards(paths), "gone.bin: cannot open");
}

TEST(TokenCorpus, SliceSharesStorage) {
  TempDir dir;
  std::vector<fs::path> paths = {write_range_shard(dir / "a.bin", 0, 10, true),
                                 write_range_shard(dir / "b.bin", 10, 10, false)};
  TokenCorpus corpus = TokenCorpus::from_shards(paths);

  TokenCorpus middle = corpus.slice(5, 15);
  EXPECT_EQ(middle.size(), 10);
  EXPECT_EQ(middle.vocab_bound(), 1000);
  std::vector<uint8_t> mask;
  EXPECT_EQ(read_tokens(middle, 0, 10, &mask), range(5, 10));
  EXPECT_EQ(mask, (std::vector<uint8_t>{1, 0, 1, 0, 1, 1, 1, 1, 1, 1}));
  EXPECT_EQ(read_tokens(middle, 4, 3), range(9, 3));

  // A slice of a slice.
  TokenCorpus inner = middle.slice(3, 8);
  EXPECT_EQ(inner.size(), 5);
  EXPECT_EQ(read_tokens(inner, 0, 5), range(8, 5));

  TokenCorpus tail = corpus.slice(12, 20);
  EXPECT_EQ(read_tokens(tail, 0, 8), range(12, 8));
  EXPECT_EQ(corpus.slice(7, 7).size(), 0);

  // In-memory storage slices the same way.
  TokenCorpus memory = TokenCorpus::from_tokens(range(100, 10), {0, 1, 0, 1, 0, 1, 0, 1, 0, 1});
  TokenCorpus part = memory.slice(2, 6);
  EXPECT_EQ(read_tokens(part, 0, 4, &mask), range(102, 4));
  EXPECT_EQ(mask, (std::vector<uint8_t>{0, 1, 0, 1}));

  EXPECT_BRIGADE_ERROR(corpus.slice(5, 21), "slice [5, 21) is outside [0, 20)");
  EXPECT_BRIGADE_ERROR(corpus.slice(6, 5), "slice [6, 5)");
}

}  // namespace
}  // namespace brigade::data
