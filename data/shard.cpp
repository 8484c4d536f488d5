#include "data/shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>

#include "core/error.h"
#include "core/fs.h"

namespace brigade::data {

// The format is little-endian and we copy fields with memcpy.
static_assert(std::endian::native == std::endian::little, "token shards assume a little-endian host");

namespace {

constexpr uint32_t kFlagMask = 1u;

// Header field offsets (see the table in shard.h).
constexpr size_t kOffVersion = 8;
constexpr size_t kOffDtype = 12;
constexpr size_t kOffTokenCount = 16;
constexpr size_t kOffFlags = 24;
constexpr size_t kOffVocab = 28;
constexpr size_t kOffDocCount = 32;
constexpr size_t kOffReserved = 40;

template <typename T>
void put(uint8_t* dst, size_t offset, T value) {
  std::memcpy(dst + offset, &value, sizeof(T));
}

template <typename T>
T get(const uint8_t* src, size_t offset) {
  T value;
  std::memcpy(&value, src + offset, sizeof(T));
  return value;
}

// Writes all of [data, data+size) or throws naming `path`.
void write_all(int fd, const std::filesystem::path& path, const void* data, size_t size) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    BRIGADE_CHECK(n > 0, "cannot write token shard ", path.string(), ": ", std::strerror(errno));
    p += n;
    size -= static_cast<size_t>(n);
  }
}

// Closes the descriptor on every path out of a scope.
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

// ---------------------------------------------------------------- ShardWriter

ShardWriter::ShardWriter(std::filesystem::path path, uint32_t vocab_size, bool with_mask)
    : path_(std::move(path)) {
  BRIGADE_CHECK(vocab_size > 0, "token shard ", path_.string(), ": vocab_size must be positive");
  header_.vocab_size = vocab_size;
  header_.dtype_bytes = vocab_size <= (1u << 16) ? 2 : 4;
  header_.has_mask = with_mask;
}

ShardWriter::~ShardWriter() {
  // finish() removes its own temporary on failure; nothing else exists on disk yet.
  // Never throw from here.
  if (!finished_) {
    std::error_code ec;
    std::filesystem::path tmp = path_;
    tmp += ".tmp";
    std::filesystem::remove(tmp, ec);
  }
}

void ShardWriter::add_document(std::span<const int64_t> tokens, std::span<const uint8_t> mask) {
  BRIGADE_CHECK(!finished_, "token shard ", path_.string(), ": add_document after finish");
  BRIGADE_CHECK(!tokens.empty(), "token shard ", path_.string(),
                ": empty document (every document starts with BOS)");
  if (header_.has_mask) {
    BRIGADE_CHECK(mask.size() == tokens.size(), "token shard ", path_.string(), ": document has ",
                  tokens.size(), " tokens but ", mask.size(), " mask values");
  } else {
    BRIGADE_CHECK(mask.empty(), "token shard ", path_.string(),
                  ": a mask was given to a shard opened without one");
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    BRIGADE_CHECK(tokens[i] >= 0 && tokens[i] < static_cast<int64_t>(header_.vocab_size),
                  "token shard ", path_.string(), ": token id ", tokens[i], " at document position ",
                  i, " is outside the vocabulary [0, ", header_.vocab_size, ")");
  }
  for (size_t i = 0; i < mask.size(); ++i) {
    BRIGADE_CHECK(mask[i] <= 1, "token shard ", path_.string(), ": mask value ",
                  static_cast<int>(mask[i]), " at document position ", i, " is not 0 or 1");
  }
  tokens_.reserve(tokens_.size() + tokens.size());
  for (int64_t t : tokens) tokens_.push_back(static_cast<uint32_t>(t));
  mask_.insert(mask_.end(), mask.begin(), mask.end());
  header_.doc_count += 1;
}

ShardHeader ShardWriter::finish() {
  BRIGADE_CHECK(!finished_, "token shard ", path_.string(), ": finish called twice");
  header_.token_count = tokens_.size();

  uint8_t head[kShardHeaderBytes] = {};
  std::memcpy(head, kShardMagic, sizeof(kShardMagic));
  put<uint32_t>(head, kOffVersion, header_.version);
  put<uint32_t>(head, kOffDtype, header_.dtype_bytes);
  put<uint64_t>(head, kOffTokenCount, header_.token_count);
  put<uint32_t>(head, kOffFlags, header_.has_mask ? kFlagMask : 0u);
  put<uint32_t>(head, kOffVocab, header_.vocab_size);
  put<uint64_t>(head, kOffDocCount, header_.doc_count);

  std::filesystem::path tmp = path_;
  tmp += ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  BRIGADE_CHECK(fd >= 0, "cannot create token shard ", tmp.string(), ": ", std::strerror(errno));
  try {
    FdCloser closer{fd};
    write_all(fd, tmp, head, sizeof(head));
    if (header_.dtype_bytes == 4) {
      write_all(fd, tmp, tokens_.data(), tokens_.size() * sizeof(uint32_t));
    } else {
      // Narrow in chunks so a large shard does not need a second full-size buffer.
      constexpr size_t kChunk = 1 << 20;
      std::vector<uint16_t> narrow;
      for (size_t begin = 0; begin < tokens_.size(); begin += kChunk) {
        size_t end = std::min(tokens_.size(), begin + kChunk);
        narrow.assign(tokens_.begin() + static_cast<std::ptrdiff_t>(begin),
                      tokens_.begin() + static_cast<std::ptrdiff_t>(end));
        write_all(fd, tmp, narrow.data(), narrow.size() * sizeof(uint16_t));
      }
    }
    if (header_.has_mask) write_all(fd, tmp, mask_.data(), mask_.size());
    BRIGADE_CHECK(::fsync(fd) == 0, "cannot sync token shard ", tmp.string(), ": ",
                  std::strerror(errno));
  } catch (...) {
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    throw;
  }
  std::filesystem::rename(tmp, path_);
  fsync_dir(path_.parent_path().empty() ? std::filesystem::path(".") : path_.parent_path());
  finished_ = true;
  tokens_ = {};
  mask_ = {};
  return header_;
}

// ---------------------------------------------------------------------- Shard

Shard::Shard(const std::filesystem::path& path) : path_(path) {
  const std::string name = "token shard " + path.string();
  int fd = ::open(path.c_str(), O_RDONLY);
  BRIGADE_CHECK(fd >= 0, name, ": cannot open: ", std::strerror(errno));
  FdCloser closer{fd};
  struct stat st {};
  BRIGADE_CHECK(::fstat(fd, &st) == 0, name, ": cannot stat: ", std::strerror(errno));
  BRIGADE_CHECK(S_ISREG(st.st_mode), name, ": not a regular file");
  const auto file_bytes = static_cast<uint64_t>(st.st_size);
  BRIGADE_CHECK(file_bytes > 0, name, ": empty file (0 bytes); expected a ", kShardHeaderBytes,
                "-byte header");
  BRIGADE_CHECK(file_bytes >= kShardHeaderBytes, name, ": file has ", file_bytes,
                " bytes, shorter than the ", kShardHeaderBytes, "-byte header");

  void* map = ::mmap(nullptr, file_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  BRIGADE_CHECK(map != MAP_FAILED, name, ": mmap failed: ", std::strerror(errno));
  base_ = static_cast<const uint8_t*>(map);
  bytes_ = file_bytes;

  // The destructor does not run when the constructor throws, so unmap here.
  try {
    const uint8_t* h = base_;
    if (std::memcmp(h, kShardMagic, sizeof(kShardMagic)) != 0) {
      std::string magic;
      for (size_t i = 0; i < sizeof(kShardMagic); ++i) {
        char c = static_cast<char>(h[i]);
        magic += (c >= 32 && c < 127) ? c : '?';
      }
      BRIGADE_FAIL(name, ": bad magic '", magic,
                   "' (expected 'BRGSHARD'); not a brigade token shard (make one with "
                   "`brigade data prepare`)");
    }
    header_.version = get<uint32_t>(h, kOffVersion);
    BRIGADE_CHECK(header_.version == kShardVersion, name, ": unsupported version ", header_.version,
                  " (this build reads version ", kShardVersion, ")");
    header_.dtype_bytes = get<uint32_t>(h, kOffDtype);
    BRIGADE_CHECK(header_.dtype_bytes == 2 || header_.dtype_bytes == 4, name, ": dtype ",
                  header_.dtype_bytes, " is neither 2 (uint16) nor 4 (uint32)");
    header_.token_count = get<uint64_t>(h, kOffTokenCount);
    uint32_t flags = get<uint32_t>(h, kOffFlags);
    BRIGADE_CHECK((flags & ~kFlagMask) == 0, name, ": unknown flags 0x", std::hex, flags,
                  std::dec, " (only bit 0, the loss mask, is defined)");
    header_.has_mask = (flags & kFlagMask) != 0;
    header_.vocab_size = get<uint32_t>(h, kOffVocab);
    BRIGADE_CHECK(header_.vocab_size > 0, name, ": vocab_size is 0");
    header_.doc_count = get<uint64_t>(h, kOffDocCount);
    BRIGADE_CHECK(header_.doc_count <= header_.token_count, name, ": header says ",
                  header_.doc_count, " documents but only ", header_.token_count, " tokens");
    for (size_t i = kOffReserved; i < kShardHeaderBytes; ++i)
      BRIGADE_CHECK(h[i] == 0, name, ": reserved header byte ", i, " is ", static_cast<int>(h[i]),
                    ", expected 0");

    const uint64_t per_token = header_.dtype_bytes + (header_.has_mask ? 1 : 0);
    const uint64_t max_tokens = (std::numeric_limits<uint64_t>::max() - kShardHeaderBytes) / per_token;
    BRIGADE_CHECK(header_.token_count <= max_tokens, name, ": header says ", header_.token_count,
                  " tokens, more than any file can hold");
    const uint64_t expected = kShardHeaderBytes + header_.token_count * per_token;
    if (file_bytes != expected) {
      BRIGADE_FAIL(name, ": ", file_bytes < expected ? "truncated" : "trailing bytes",
                   ": header says ", header_.token_count, " tokens (", expected,
                   " bytes expected), file has ", file_bytes, " bytes");
    }
  } catch (...) {
    ::munmap(const_cast<uint8_t*>(base_), bytes_);
    throw;
  }
}

Shard::~Shard() {
  if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), bytes_);
}

Shard::Shard(Shard&& other) noexcept
    : path_(std::move(other.path_)), header_(other.header_), base_(other.base_), bytes_(other.bytes_) {
  other.base_ = nullptr;
  other.bytes_ = 0;
  other.header_ = ShardHeader{};
}

int64_t Shard::token(int64_t i) const {
  BRIGADE_ASSERT(i >= 0 && i < size(), "shard token index ", i, " outside [0, ", size(), ")");
  const uint8_t* data = base_ + kShardHeaderBytes;
  if (header_.dtype_bytes == 2) return get<uint16_t>(data, static_cast<size_t>(i) * 2);
  return get<uint32_t>(data, static_cast<size_t>(i) * 4);
}

void Shard::read(int64_t start, int64_t len, int64_t* out_tokens, uint8_t* out_mask) const {
  BRIGADE_ASSERT(start >= 0 && len >= 0 && start + len <= size(), "shard read [", start, ", ",
                 start + len, ") outside [0, ", size(), ")");
  const uint8_t* data = base_ + kShardHeaderBytes;
  // Tokens are not checked against vocab_size on open (that would touch every page);
  // checking here is one compare per token, cheap beside the copy, and turns a
  // corrupt file into a clear error instead of an out-of-range embedding index.
  const int64_t vocab = header_.vocab_size;
  if (header_.dtype_bytes == 2) {
    for (int64_t i = 0; i < len; ++i)
      out_tokens[i] = get<uint16_t>(data, static_cast<size_t>(start + i) * 2);
  } else {
    for (int64_t i = 0; i < len; ++i)
      out_tokens[i] = get<uint32_t>(data, static_cast<size_t>(start + i) * 4);
  }
  for (int64_t i = 0; i < len; ++i) {
    BRIGADE_CHECK(out_tokens[i] < vocab, "token shard ", path_.string(), ": token ", start + i,
                  " is ", out_tokens[i], ", outside the vocabulary of ", vocab);
  }
  if (out_mask == nullptr) return;
  if (!header_.has_mask) {
    std::memset(out_mask, 1, static_cast<size_t>(len));
    return;
  }
  const uint8_t* mask = data + header_.token_count * header_.dtype_bytes;
  std::memcpy(out_mask, mask + start, static_cast<size_t>(len));
  for (int64_t i = 0; i < len; ++i) {
    BRIGADE_CHECK(out_mask[i] <= 1, "token shard ", path_.string(), ": loss mask of token ",
                  start + i, " is ", static_cast<int>(out_mask[i]), ", not 0 or 1");
  }
}

}  // namespace brigade::data
