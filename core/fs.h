// File helpers that never leave a half-written file behind.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>

namespace brigade {

// Reads a whole file; a missing or unreadable file is an Error naming the path.
std::string read_file(const std::filesystem::path& path);

// Writes to `path.tmp`, fsyncs, then renames over `path`: readers see the old
// content or the new, never a torn file.
void write_file_atomic(const std::filesystem::path& path, const std::string& content);

// fsync a directory so a rename inside it survives a crash.
void fsync_dir(const std::filesystem::path& dir);

// A whole file mapped into memory, private copy-on-write (MAP_PRIVATE): writes to
// the pages never reach the file. `describe` names the file
// in errors ("safetensors file X"). An empty file maps to an empty span.
class MappedFile {
 public:
  MappedFile(const std::filesystem::path& path, const std::string& describe);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  uint8_t* writable_data() const { return const_cast<uint8_t*>(data_); }  // copy-on-write pages
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace brigade
