// File helpers that never leave a half-written file behind.
#pragma once

#include <filesystem>
#include <string>

namespace brigade {

// Reads a whole file; a missing or unreadable file is an Error naming the path.
std::string read_file(const std::filesystem::path& path);

// Writes to `path.tmp`, fsyncs, then renames over `path`: readers see the old
// content or the new, never a torn file.
void write_file_atomic(const std::filesystem::path& path, const std::string& content);

// fsync a directory so a rename inside it survives a crash.
void fsync_dir(const std::filesystem::path& dir);

}  // namespace brigade
