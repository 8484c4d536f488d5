#include "core/fs.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace brigade {

std::string read_file(const std::filesystem::path& path) {
  BRIGADE_CHECK(std::filesystem::exists(path), "file not found: ", path.string());
  std::ifstream in(path, std::ios::binary);
  BRIGADE_CHECK(in.good(), "cannot open ", path.string(), ": ", std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file_atomic(const std::filesystem::path& path, const std::string& content) {
  std::filesystem::path tmp = path;
  tmp += ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  BRIGADE_CHECK(fd >= 0, "cannot write ", tmp.string(), ": ", std::strerror(errno));
  size_t off = 0;
  while (off < content.size()) {
    ssize_t n = ::write(fd, content.data() + off, content.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      BRIGADE_FAIL("cannot write ", tmp.string(), ": ", std::strerror(err));
    }
    off += static_cast<size_t>(n);
  }
  ::fsync(fd);
  ::close(fd);
  std::filesystem::rename(tmp, path);
  fsync_dir(path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path());
}

void fsync_dir(const std::filesystem::path& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

MappedFile::MappedFile(const std::filesystem::path& path, const std::string& describe) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  BRIGADE_CHECK(fd >= 0, describe, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    BRIGADE_FAIL(describe, ": not a readable regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    // Writable copy-on-write pages: tensors may alias the mapping and be modified
    // in place without touching the file.
    void* map = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    const int err = errno;
    ::close(fd);
    BRIGADE_CHECK(map != MAP_FAILED, describe, ": mmap failed: ", std::strerror(err));
    data_ = static_cast<const uint8_t*>(map);
  } else {
    ::close(fd);
  }
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
}

}  // namespace brigade
