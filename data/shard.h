// Binary token shards: brigade's on-disk training data.
//
// Layout (little-endian), version 1:
//
//   offset  size  field
//   0       8     magic "BRGSHARD"
//   8       4     version (uint32) = 1
//   12      4     dtype (uint32): 2 = uint16 tokens, 4 = uint32 tokens (the byte width)
//   16      8     token_count (uint64)
//   24      4     flags (uint32): bit 0 = a loss-mask stream follows the tokens
//   28      4     vocab_size (uint32): the tokenizer's vocabulary, every token < this
//   32      8     doc_count (uint64): documents (each starts with BOS) in the shard
//   40      24    reserved, zero
//   64      ...   tokens: token_count x dtype bytes
//   ...     ...   loss mask (if flag bit 0): token_count bytes, each 0 or 1
//
// The file size must equal 64 + token_count * dtype + (mask ? token_count : 0);
// a reader rejects anything else (truncated, padded, wrong magic or version) with an
// Error naming the file and the disagreement, and reads tokens through mmap.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

namespace brigade::data {

inline constexpr char kShardMagic[8] = {'B', 'R', 'G', 'S', 'H', 'A', 'R', 'D'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr size_t kShardHeaderBytes = 64;

struct ShardHeader {
  uint32_t version = kShardVersion;
  uint32_t dtype_bytes = 2;  // 2 or 4
  uint64_t token_count = 0;
  bool has_mask = false;
  uint32_t vocab_size = 0;
  uint64_t doc_count = 0;
};

// Streams documents into a shard; the file appears (atomically renamed from
// PATH.tmp) only on finish(), so a crash never leaves a half-written shard.
class ShardWriter {
 public:
  // dtype_bytes is chosen from vocab_size: 2 when every id fits in uint16, else 4.
  ShardWriter(std::filesystem::path path, uint32_t vocab_size, bool with_mask);
  ~ShardWriter();
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  // One document: tokens and, when the shard has a mask, one 0/1 per token.
  void add_document(std::span<const int64_t> tokens, std::span<const uint8_t> mask = {});
  // Writes header and data, renames into place. Returns the header written.
  ShardHeader finish();

 private:
  std::filesystem::path path_;
  ShardHeader header_;
  std::vector<uint32_t> tokens_;
  std::vector<uint8_t> mask_;
  bool finished_ = false;
};

// A validated, memory-mapped, read-only shard.
class Shard {
 public:
  explicit Shard(const std::filesystem::path& path);
  ~Shard();
  Shard(Shard&& other) noexcept;
  Shard& operator=(Shard&&) = delete;
  Shard(const Shard&) = delete;

  const ShardHeader& header() const { return header_; }
  const std::filesystem::path& path() const { return path_; }
  int64_t size() const { return static_cast<int64_t>(header_.token_count); }
  bool has_mask() const { return header_.has_mask; }
  int64_t token(int64_t i) const;
  // Copies tokens [start, start+len) (and mask, if out_mask is non-null: 1 where the
  // shard has no mask).
  void read(int64_t start, int64_t len, int64_t* out_tokens, uint8_t* out_mask) const;

 private:
  std::filesystem::path path_;
  ShardHeader header_;
  const uint8_t* base_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace brigade::data
