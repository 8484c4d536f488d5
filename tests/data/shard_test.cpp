#include <gtest/gtest.h>

#include <cstring>
#include <fstream>

#include "core/fs.h"
#include "data/shard.h"
#include "tests/testing.h"

namespace brigade::data {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

template <typename T>
void poke(std::string& bytes, size_t offset, T value) {
  std::memcpy(bytes.data() + offset, &value, sizeof(T));
}

// A small valid shard: two documents, 7 tokens, 64 + 7*2 bytes.
fs::path make_small_shard(const TempDir& dir) {
  fs::path path = dir / "small.bin";
  ShardWriter writer(path, 261, /*with_mask=*/false);
  std::vector<int64_t> a = {256, 1, 2, 257};
  std::vector<int64_t> b = {256, 3, 257};
  writer.add_document(a);
  writer.add_document(b);
  writer.finish();
  return path;
}

TEST(Shard, RoundTripUint16WithoutMask) {
  TempDir dir;
  fs::path path = dir / "a.bin";
  ShardWriter writer(path, 261, false);
  std::vector<int64_t> doc1 = {256, 'h', 'i', 257};
  std::vector<int64_t> doc2 = {256, 0, 255, 260, 257};
  writer.add_document(doc1);
  EXPECT_FALSE(fs::exists(path)) << "the shard must appear only on finish()";
  writer.add_document(doc2);
  ShardHeader written = writer.finish();
  EXPECT_EQ(written.token_count, 9u);
  EXPECT_EQ(written.doc_count, 2u);
  EXPECT_EQ(written.dtype_bytes, 2u);
  ASSERT_TRUE(fs::exists(path));
  EXPECT_FALSE(fs::exists(dir / "a.bin.tmp"));
  EXPECT_EQ(fs::file_size(path), 64u + 9u * 2u);

  Shard shard(path);
  EXPECT_EQ(shard.size(), 9);
  EXPECT_FALSE(shard.has_mask());
  EXPECT_EQ(shard.header().version, 1u);
  EXPECT_EQ(shard.header().vocab_size, 261u);
  EXPECT_EQ(shard.header().doc_count, 2u);
  EXPECT_EQ(shard.path(), path);
  std::vector<int64_t> all = {256, 'h', 'i', 257, 256, 0, 255, 260, 257};
  for (int64_t i = 0; i < 9; ++i) EXPECT_EQ(shard.token(i), all[i]) << i;

  std::vector<int64_t> tokens(4);
  std::vector<uint8_t> mask(4, 7);
  shard.read(3, 4, tokens.data(), mask.data());
  EXPECT_EQ(tokens, (std::vector<int64_t>{257, 256, 0, 255}));
  EXPECT_EQ(mask, (std::vector<uint8_t>{1, 1, 1, 1}));  // no mask stream: every token trains
}

TEST(Shard, RoundTripUint32WithMask) {
  TempDir dir;
  fs::path path = dir / "big.bin";
  const uint32_t vocab = 100000;  // ids above 65535 need 4-byte tokens
  ShardWriter writer(path, vocab, /*with_mask=*/true);
  std::vector<int64_t> doc = {0, 65535, 65536, 99999, 12345};
  std::vector<uint8_t> mask = {0, 0, 1, 1, 0};
  writer.add_document(doc, mask);
  ShardHeader written = writer.finish();
  EXPECT_EQ(written.dtype_bytes, 4u);
  EXPECT_TRUE(written.has_mask);
  EXPECT_EQ(fs::file_size(path), 64u + 5u * 4u + 5u);

  Shard shard(path);
  EXPECT_EQ(shard.header().dtype_bytes, 4u);
  EXPECT_EQ(shard.header().vocab_size, vocab);
  EXPECT_TRUE(shard.has_mask());
  std::vector<int64_t> tokens(5);
  std::vector<uint8_t> got_mask(5);
  shard.read(0, 5, tokens.data(), got_mask.data());
  EXPECT_EQ(tokens, doc);
  EXPECT_EQ(got_mask, mask);
  EXPECT_EQ(shard.token(2), 65536);

  // Null mask pointer reads only tokens.
  std::vector<int64_t> two(2);
  shard.read(3, 2, two.data(), nullptr);
  EXPECT_EQ(two, (std::vector<int64_t>{99999, 12345}));
}

TEST(Shard, Uint16WithMask) {
  TempDir dir;
  fs::path path = dir / "m.bin";
  ShardWriter writer(path, 65536, true);  // 65536 ids still fit uint16
  std::vector<int64_t> doc = {65535, 1, 2};
  std::vector<uint8_t> mask = {0, 1, 1};
  writer.add_document(doc, mask);
  EXPECT_EQ(writer.finish().dtype_bytes, 2u);
  Shard shard(path);
  std::vector<int64_t> tokens(3);
  std::vector<uint8_t> got(3);
  shard.read(0, 3, tokens.data(), got.data());
  EXPECT_EQ(tokens, doc);
  EXPECT_EQ(got, mask);
}

TEST(Shard, MoveKeepsMapping) {
  TempDir dir;
  Shard a(make_small_shard(dir));
  Shard b(std::move(a));
  EXPECT_EQ(b.size(), 7);
  EXPECT_EQ(b.token(4), 256);
  EXPECT_EQ(b.token(5), 3);
}

TEST(ShardWriter, RejectsBadDocuments) {
  TempDir dir;
  ShardWriter plain(dir / "p.bin", 261, false);
  std::vector<int64_t> bad_id = {1, 261};
  EXPECT_BRIGADE_ERROR(plain.add_document(bad_id), "token id 261 at document position 1");
  std::vector<int64_t> ok = {1, 2};
  std::vector<uint8_t> mask = {1, 1};
  EXPECT_BRIGADE_ERROR(plain.add_document(ok, mask), "shard opened without one");

  ShardWriter masked(dir / "m.bin", 261, true);
  std::vector<uint8_t> short_mask = {1};
  EXPECT_BRIGADE_ERROR(masked.add_document(ok, short_mask), "2 tokens but 1 mask values");
  EXPECT_BRIGADE_ERROR(plain.add_document({}), "empty document");
  std::vector<uint8_t> bad_mask = {1, 2};
  EXPECT_BRIGADE_ERROR(masked.add_document(ok, bad_mask), "mask value 2 at document position 1");
}

TEST(ShardWriter, NoFileWithoutFinish) {
  TempDir dir;
  {
    ShardWriter writer(dir / "x.bin", 261, false);
    std::vector<int64_t> doc = {1, 2, 3};
    writer.add_document(doc);
  }
  EXPECT_FALSE(fs::exists(dir / "x.bin"));
  EXPECT_FALSE(fs::exists(dir / "x.bin.tmp"));
}

TEST(ShardWriter, FinishTwiceIsError) {
  TempDir dir;
  ShardWriter writer(dir / "x.bin", 261, false);
  writer.finish();
  EXPECT_BRIGADE_ERROR(writer.finish(), "finish called twice");
  Shard empty(dir / "x.bin");
  EXPECT_EQ(empty.size(), 0);
}

TEST(ShardErrors, MissingFile) {
  TempDir dir;
  fs::path path = dir / "nope.bin";
  EXPECT_BRIGADE_ERROR(Shard{path}, "token shard " + path.string() + ": cannot open: No such file");
}

TEST(ShardErrors, EmptyFile) {
  TempDir dir;
  fs::path path = dir / "empty.bin";
  write_file_atomic(path, "");
  EXPECT_BRIGADE_ERROR(Shard{path}, path.string() + ": empty file (0 bytes)");
}

TEST(ShardErrors, ShorterThanHeader) {
  TempDir dir;
  fs::path path = dir / "short.bin";
  write_file_atomic(path, "BRGSHARD\x01");
  EXPECT_BRIGADE_ERROR(Shard{path}, "file has 9 bytes, shorter than the 64-byte header");
}

TEST(ShardErrors, WrongMagic) {
  TempDir dir;
  fs::path path = make_small_shard(dir);
  std::string bytes = read_file(path);
  bytes.replace(0, 8, "GGUF\x03\x00\x00\x00", 8);
  write_file_atomic(path, bytes);
  EXPECT_BRIGADE_ERROR(Shard{path}, "bad magic 'GGUF\?\?\?\?' (expected 'BRGSHARD')");
}

TEST(ShardErrors, WrongVersion) {
  TempDir dir;
  fs::path path = make_small_shard(dir);
  std::string bytes = read_file(path);
  poke<uint32_t>(bytes, 8, 2);
  write_file_atomic(path, bytes);
  EXPECT_BRIGADE_ERROR(Shard{path}, "unsupported version 2 (this build reads version 1)");
}

TEST(ShardErrors, WrongDtype) {
  TempDir dir;
  fs::path path = make_small_shard(dir);
  std::string bytes = read_file(path);
  poke<uint32_t>(bytes, 12, 3);
  write_file_atomic(path, bytes);
  EXPECT_BRIGADE_ERROR(Shard{path}, "dtype 3 is neither 2 (uint16) nor 4 (uint32)");
}

TEST(ShardErrors, UnknownFlags) {
  TempDir dir;
  fs::path path = make_small_shard(dir);
  std::string bytes = read_file(path);
  poke<uint32_t>(bytes, 24, 0x6);
  write_file_atomic(path, bytes);
  EXPECT_BRIGADE_ERROR(Shard{path}, "unknown flags 0x6");
}

TEST(ShardErrors, NonzeroReserved) {
  TempDir dir;
  fs::path path = make_small_shard(dir);
  std::string bytes = read_file(path);
  bytes[50] = 1;
  write_file_atomic(path, bytes);
  EXPECT_BRIGADE_ERROR(Shard{path}, "reserved header byte 50 is 1");
}

TEST(ShardErrors, Truncated) {
  TempDir dir;
  fs::path path = make_small_shard(dir);
  std::string bytes = read_file(path);
  ASSERT_EQ(bytes.size(), 78u);
  bytes.resize(75);
  write_file_atomic(path, bytes);
  EXPECT_BRIGADE_ERROR(Shard{path}, "token shard " + path.string() +
                                        ": truncated: header says 7 tokens (78 bytes expected), "
                                        "file has 75 bytes");
}

TEST(ShardErrors, TrailingBytes) {
  TempDir dir;
  fs::path path = make_small_shard(dir);
  std::string bytes = read_file(path);
  bytes += "junk";
  write_file_atomic(path, bytes);
  EXPECT_BRIGADE_ERROR(Shard{path}, ": trailing bytes: header says 7 tokens (78 bytes expected), "
                                    "file has 82 bytes");
}

TEST(ShardErrors, HeaderCountDisagreesWithSize) {
  TempDir dir;
  fs::path path = make_small_shard(dir);
  std::string bytes = read_file(path);
  poke<uint64_t>(bytes, 16, 1000);
  write_file_atomic(path, bytes);
  EXPECT_BRIGADE_ERROR(Shard{path},
                       "truncated: header says 1000 tokens (2064 bytes expected), file has 78 bytes");

  poke<uint64_t>(bytes, 16, 3);
  write_file_atomic(path, bytes);
  EXPECT_BRIGADE_ERROR(Shard{path},
                       "trailing bytes: header says 3 tokens (70 bytes expected), file has 78 bytes");

  // A count so large the expected size overflows.
  poke<uint64_t>(bytes, 16, ~uint64_t{0});
  write_file_atomic(path, bytes);
  EXPECT_BRIGADE_ERROR(Shard{path}, "more than any file can hold");
}

TEST(ShardErrors, MaskFlagWithoutMaskBytes) {
  TempDir dir;
  fs::path path = make_small_shard(dir);
  std::string bytes = read_file(path);
  poke<uint32_t>(bytes, 24, 1);  // claims a mask stream that is not there
  write_file_atomic(path, bytes);
  EXPECT_BRIGADE_ERROR(Shard{path}, "truncated: header says 7 tokens (85 bytes expected)");
}

TEST(ShardErrors, MoreDocumentsThanTokens) {
  TempDir dir;
  fs::path path = make_small_shard(dir);
  std::string bytes = read_file(path);
  poke<uint64_t>(bytes, 32, 8);
  write_file_atomic(path, bytes);
  EXPECT_BRIGADE_ERROR(Shard{path}, "header says 8 documents but only 7 tokens");
}

TEST(ShardErrors, CorruptTokenAndMaskOnRead) {
  TempDir dir;
  fs::path path = dir / "m.bin";
  ShardWriter writer(path, 261, true);
  std::vector<int64_t> doc = {256, 1, 257};
  std::vector<uint8_t> mask = {0, 1, 1};
  writer.add_document(doc, mask);
  writer.finish();
  std::string bytes = read_file(path);
  poke<uint16_t>(bytes, 64 + 2, 300);  // token 1 outside the vocabulary
  bytes[64 + 6 + 2] = 5;               // mask of token 2 is not 0/1
  write_file_atomic(path, bytes);

  Shard shard(path);  // opening does not scan tokens
  std::vector<int64_t> tokens(3);
  std::vector<uint8_t> got(3);
  EXPECT_BRIGADE_ERROR(shard.read(0, 3, tokens.data(), got.data()),
                       "token 1 is 300, outside the vocabulary of 261");
  EXPECT_BRIGADE_ERROR(shard.read(2, 1, tokens.data(), got.data()),
                       "loss mask of token 2 is 5, not 0 or 1");
}

}  // namespace
}  // namespace brigade::data
