#include "distill/traces.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <tuple>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"

namespace brigade::distill {

// The sidecar is little-endian and we copy fields with memcpy.
static_assert(std::endian::native == std::endian::little, "the top-k sidecar assumes a little-endian host");

namespace fs = std::filesystem;

namespace {

constexpr size_t kOffVersion = 8;
constexpr size_t kOffK = 12;
constexpr size_t kOffReserved = 16;

int64_t record_bytes(int64_t k) { return 8 * k; }  // k int32 ids + k float32 logprobs

// Closes the descriptor on every path out of a scope.
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

void write_all(int fd, const fs::path& path, const void* data, size_t size) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    BRIGADE_CHECK(n > 0, "cannot write ", path.string(), ": ", std::strerror(errno));
    p += n;
    size -= static_cast<size_t>(n);
  }
}

uint64_t file_size_of(int fd, const fs::path& path) {
  struct stat st {};
  BRIGADE_CHECK(::fstat(fd, &st) == 0, "cannot stat ", path.string(), ": ", std::strerror(errno));
  return static_cast<uint64_t>(st.st_size);
}

void truncate_to(int fd, const fs::path& path, uint64_t size) {
  BRIGADE_CHECK(::ftruncate(fd, static_cast<off_t>(size)) == 0, "cannot truncate ", path.string(),
                ": ", std::strerror(errno));
}

std::string header_bytes(int64_t k) {
  std::string header(kTopkHeaderBytes, '\0');
  std::memcpy(header.data(), kTopkMagic, sizeof(kTopkMagic));
  const uint32_t version = kTopkVersion;
  const auto k32 = static_cast<uint32_t>(k);
  std::memcpy(header.data() + kOffVersion, &version, 4);
  std::memcpy(header.data() + kOffK, &k32, 4);
  return header;
}

struct SidecarInfo {
  int64_t k = 0;
  int64_t records = 0;  // complete records after the header
};

// Validates the header of the sidecar open on `fd`. Bytes after the last complete
// record (a crash in the middle of an append) are not counted.
SidecarInfo read_sidecar_header(int fd, const fs::path& path) {
  const uint64_t size = file_size_of(fd, path);
  BRIGADE_CHECK(size >= kTopkHeaderBytes, "top-k sidecar ", path.string(), " is truncated: ", size,
                " bytes, the header alone is ", kTopkHeaderBytes);
  uint8_t header[kTopkHeaderBytes];
  BRIGADE_CHECK(::pread(fd, header, kTopkHeaderBytes, 0) == static_cast<ssize_t>(kTopkHeaderBytes),
                "cannot read ", path.string(), ": ", std::strerror(errno));
  BRIGADE_CHECK(std::memcmp(header, kTopkMagic, sizeof(kTopkMagic)) == 0, "top-k sidecar ",
                path.string(), ": bad magic (expected \"BRGTOPK1\"); not a brigade trace sidecar");
  uint32_t version = 0, k = 0;
  std::memcpy(&version, header + kOffVersion, 4);
  std::memcpy(&k, header + kOffK, 4);
  BRIGADE_CHECK(version == kTopkVersion, "top-k sidecar ", path.string(), ": version ", version,
                ", this brigade reads version ", kTopkVersion);
  BRIGADE_CHECK(k >= 1 && k <= (1u << 20), "top-k sidecar ", path.string(), ": k = ", k,
                " is out of range [1, 1048576]");
  for (size_t i = kOffReserved; i < kTopkHeaderBytes; ++i) {
    BRIGADE_CHECK(header[i] == 0, "top-k sidecar ", path.string(), ": reserved header byte ", i,
                  " is not zero");
  }
  SidecarInfo info;
  info.k = k;
  info.records = static_cast<int64_t>((size - kTopkHeaderBytes) / static_cast<uint64_t>(record_bytes(k)));
  return info;
}

bool valid_finish_reason(const std::string& reason) {
  return reason == "stop" || reason == "length" || reason == "error";
}

struct StoredLine {
  Trace trace;  // topk tensors left undefined
  bool has_topk = false;
  TopkRange topk;
};

// One line of traces.jsonl, or nullopt with `reason` set.
std::optional<StoredLine> parse_trace_line(const std::string& line, std::string& reason) {
  nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    reason = "not valid JSON";
    return std::nullopt;
  }
  if (!j.is_object()) {
    reason = "not a JSON object";
    return std::nullopt;
  }
  auto string_field = [&](const char* key, std::string& out) {
    auto it = j.find(key);
    if (it == j.end() || !it->is_string()) {
      reason = std::string("no \"") + key + "\" string";
      return false;
    }
    out = it->get<std::string>();
    return true;
  };
  auto count_field = [&](const nlohmann::json& object, const char* key, int64_t& out) {
    auto it = object.find(key);
    if (it == object.end() || !it->is_number_integer() || it->get<int64_t>() < 0) {
      reason = std::string("no \"") + key + "\" non-negative integer";
      return false;
    }
    out = it->get<int64_t>();
    return true;
  };
  StoredLine stored;
  Trace& t = stored.trace;
  if (!string_field("prompt_id", t.prompt_id) || !count_field(j, "sample", t.sample) ||
      !string_field("text", t.text) || !string_field("finish_reason", t.finish_reason) ||
      !count_field(j, "prompt_tokens", t.prompt_tokens) ||
      !count_field(j, "completion_tokens", t.completion_tokens)) {
    return std::nullopt;
  }
  if (t.prompt_id.empty()) {
    reason = "empty \"prompt_id\"";
    return std::nullopt;
  }
  if (!valid_finish_reason(t.finish_reason)) {
    reason = "\"finish_reason\" is \"" + t.finish_reason + "\", not stop, length or error";
    return std::nullopt;
  }
  if (auto error = j.find("error"); error != j.end() && error->is_string()) t.error = error->get<std::string>();
  auto topk = j.find("topk");
  if (topk != j.end()) {
    TopkRange range;
    if (!topk->is_object() || !count_field(*topk, "offset", range.offset) ||
        !count_field(*topk, "positions", range.positions)) {
      if (reason.empty() || !topk->is_object()) reason = "\"topk\" is not {\"offset\", \"positions\"}";
      return std::nullopt;
    }
    stored.has_topk = true;
    stored.topk = range;
  }
  return stored;
}

struct ScanResult {
  uint64_t valid_bytes = 0;  // bytes of the complete, valid lines
  int64_t records_end = 0;   // sidecar records those lines refer to
  int64_t torn_line = 0;     // line number of a dropped last line, 0 if none
  std::string torn_reason;
};

// Reads traces.jsonl line by line, handing every valid line to `visit`. The sidecar
// holds `available_records` complete records. A bad last line is reported in the
// result; a bad line followed by more lines is an Error.
ScanResult scan_traces(const fs::path& file, int64_t available_records,
                       const std::function<void(StoredLine&&)>& visit) {
  std::ifstream in(file, std::ios::binary);
  BRIGADE_CHECK(in.good(), "cannot open ", file.string(), ": ", std::strerror(errno));
  ScanResult result;
  std::string line;
  int64_t line_number = 0;
  while (std::getline(in, line)) {
    ++line_number;
    BRIGADE_CHECK(result.torn_line == 0, "trace store ", file.string(), " is corrupt: line ",
                  result.torn_line, " is bad (", result.torn_reason,
                  ") but more lines follow; only the last line can be torn by a crash");
    const bool complete = !in.eof();  // getline stopped at a '\n'
    std::string reason;
    std::optional<StoredLine> stored =
        complete ? parse_trace_line(line, reason) : std::optional<StoredLine>();
    if (!complete) reason = "no newline at the end: a write cut short";
    if (stored && stored->has_topk) {
      const TopkRange& range = stored->topk;
      if (range.offset != result.records_end) {
        reason = "\"topk\" offset " + std::to_string(range.offset) + " does not follow the previous sample's records (" +
                 std::to_string(result.records_end) + ")";
        stored.reset();
      } else if (range.offset + range.positions > available_records) {
        reason = "\"topk\" records [" + std::to_string(range.offset) + ", " +
                 std::to_string(range.offset + range.positions) + ") are beyond the sidecar's " +
                 std::to_string(available_records) + " records";
        stored.reset();
      }
    }
    if (!stored) {
      result.torn_line = line_number;
      result.torn_reason = std::move(reason);
      continue;
    }
    result.valid_bytes += line.size() + 1;
    if (stored->has_topk) result.records_end += stored->topk.positions;
    visit(std::move(*stored));
  }
  BRIGADE_CHECK(!in.bad(), "cannot read ", file.string(), ": ", std::strerror(errno));
  return result;
}

}  // namespace

// ---------------------------------------------------------------- TopkSidecar

struct TopkSidecar::Mapping {
  void* base = nullptr;
  size_t bytes = 0;
  ~Mapping() {
    if (base != nullptr) ::munmap(base, bytes);
  }
};

TopkSidecar::TopkSidecar(const fs::path& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  BRIGADE_CHECK(fd >= 0, "cannot open top-k sidecar ", path.string(), ": ", std::strerror(errno));
  FdCloser closer{fd};
  const SidecarInfo info = read_sidecar_header(fd, path);
  k_ = info.k;
  records_ = info.records;
  mapping_ = std::make_shared<Mapping>();
  mapping_->bytes = kTopkHeaderBytes + static_cast<size_t>(records_ * record_bytes(k_));
  // Private and writable: tensors handed out may be modified without touching the file.
  void* base = ::mmap(nullptr, mapping_->bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  BRIGADE_CHECK(base != MAP_FAILED, "cannot map ", path.string(), ": ", std::strerror(errno));
  mapping_->base = base;
}

std::pair<torch::Tensor, torch::Tensor> TopkSidecar::read(const TopkRange& range) const {
  BRIGADE_CHECK(range.offset >= 0 && range.positions >= 0 && range.offset + range.positions <= records_,
                "top-k sidecar ", path_.string(), ": records [", range.offset, ", ",
                range.offset + range.positions, ") are out of range (it holds ", records_, ")");
  if (range.positions == 0) {
    return {torch::empty({0, k_}, torch::kInt32), torch::empty({0, k_}, torch::kFloat32)};
  }
  auto* record = static_cast<uint8_t*>(mapping_->base) + kTopkHeaderBytes + range.offset * record_bytes(k_);
  // Each record is k ids then k logprobs: both are [positions, k] views with a row
  // stride of 2k four-byte elements. The deleter keeps the mapping alive.
  std::shared_ptr<Mapping> keep = mapping_;
  auto release = [keep](void*) {};
  const std::vector<int64_t> sizes = {range.positions, k_};
  const std::vector<int64_t> strides = {2 * k_, 1};
  torch::Tensor ids = torch::from_blob(record, sizes, strides, release, torch::kInt32);
  torch::Tensor logprobs =
      torch::from_blob(record + 4 * k_, sizes, strides, release, torch::kFloat32);
  return {ids, logprobs};
}

// ---------------------------------------------------------------- TraceWriter

TraceWriter::TraceWriter(fs::path dir, int64_t k) : dir_(std::move(dir)), k_(k) {
  BRIGADE_CHECK(k >= 0 && k <= (1 << 20), "trace store ", dir_.string(), ": top-k k = ", k,
                " is out of range [0, 1048576]");
  std::error_code ec;
  fs::create_directories(dir_, ec);
  BRIGADE_CHECK(!ec, "cannot create trace store directory ", dir_.string(), ": ", ec.message());
  const fs::path lines_path = dir_ / kTracesFile;
  const fs::path topk_path = dir_ / kTopkFile;

  lines_fd_ = ::open(lines_path.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  BRIGADE_CHECK(lines_fd_ >= 0, "cannot open ", lines_path.string(), ": ", std::strerror(errno));
  if (::flock(lines_fd_, LOCK_EX | LOCK_NB) != 0) {
    ::close(lines_fd_);
    lines_fd_ = -1;
    BRIGADE_FAIL("trace store ", dir_.string(), " is in use by another writer");
  }
  // From here on the destructor does not run if we throw: close by hand on failure.
  try {
    int64_t available = 0;
    if (fs::exists(topk_path)) {
      topk_fd_ = ::open(topk_path.c_str(), O_RDWR | O_APPEND | O_CLOEXEC);
      BRIGADE_CHECK(topk_fd_ >= 0, "cannot open ", topk_path.string(), ": ", std::strerror(errno));
      const SidecarInfo info = read_sidecar_header(topk_fd_, topk_path);
      BRIGADE_CHECK(info.k == k_, "trace store ", dir_.string(), " holds top-", info.k,
                    " logprobs but was opened with k = ", k_,
                    "; use the same logprobs setting or a new directory");
      available = info.records;
    }

    const ScanResult scan = scan_traces(lines_path, available, [&](StoredLine&& line) {
      auto key = std::make_pair(line.trace.prompt_id, line.trace.sample);
      if (line.trace.failed()) {
        done_.erase(key);
      } else {
        done_.insert(std::move(key));
      }
    });
    bool repaired = false;
    if (scan.torn_line != 0) {
      log_warn("trace store ", lines_path.string(), ": dropping torn last line ", scan.torn_line, " (",
               scan.torn_reason, "); that sample will be generated again");
      truncate_to(lines_fd_, lines_path, scan.valid_bytes);
      repaired = true;
    }
    topk_records_ = scan.records_end;
    if (topk_fd_ >= 0) {
      const uint64_t want = kTopkHeaderBytes + static_cast<uint64_t>(topk_records_ * record_bytes(k_));
      if (file_size_of(topk_fd_, topk_path) != want) {
        // Records written before a crash whose line never made it.
        truncate_to(topk_fd_, topk_path, want);
        repaired = true;
      }
    } else if (k_ > 0) {
      // The header appears whole or not at all.
      write_file_atomic(topk_path, header_bytes(k_));
      topk_fd_ = ::open(topk_path.c_str(), O_RDWR | O_APPEND | O_CLOEXEC);
      BRIGADE_CHECK(topk_fd_ >= 0, "cannot open ", topk_path.string(), ": ", std::strerror(errno));
    }
    if (repaired) flush();
    fsync_dir(dir_);
  } catch (...) {
    if (topk_fd_ >= 0) ::close(topk_fd_);
    ::close(lines_fd_);
    throw;
  }
}

TraceWriter::~TraceWriter() {
  // Best effort, never throws: append() already handed everything to the kernel.
  if (topk_fd_ >= 0) {
    ::fsync(topk_fd_);
    ::close(topk_fd_);
  }
  if (lines_fd_ >= 0) {
    ::fsync(lines_fd_);
    ::close(lines_fd_);
  }
}

void TraceWriter::append(const Trace& trace) {
  const fs::path lines_path = dir_ / kTracesFile;
  const fs::path topk_path = dir_ / kTopkFile;
  BRIGADE_CHECK(!trace.prompt_id.empty(), "trace store ", dir_.string(), ": a trace has an empty prompt_id");
  BRIGADE_CHECK(trace.sample >= 0, "trace store ", dir_.string(), ": prompt ", trace.prompt_id,
                " has negative sample index ", trace.sample);
  BRIGADE_CHECK(valid_finish_reason(trace.finish_reason), "trace store ", dir_.string(), ": prompt ",
                trace.prompt_id, " sample ", trace.sample, ": finish_reason \"", trace.finish_reason,
                "\" is not stop, length or error");
  BRIGADE_CHECK(trace.prompt_tokens >= 0 && trace.completion_tokens >= 0, "trace store ", dir_.string(),
                ": prompt ", trace.prompt_id, " sample ", trace.sample, " has negative token counts");
  auto key = std::make_pair(trace.prompt_id, trace.sample);
  BRIGADE_CHECK(done_.count(key) == 0, "trace store ", dir_.string(), ": prompt ", trace.prompt_id,
                " sample ", trace.sample, " is already stored");

  nlohmann::json j = {{"prompt_id", trace.prompt_id},         {"sample", trace.sample},
                      {"text", trace.text},                   {"finish_reason", trace.finish_reason},
                      {"prompt_tokens", trace.prompt_tokens}, {"completion_tokens", trace.completion_tokens}};
  if (!trace.error.empty()) j["error"] = trace.error;

  std::string records;
  int64_t positions = 0;
  const bool has_topk = trace.topk_ids.defined() || trace.topk_logprobs.defined();
  if (has_topk) {
    BRIGADE_CHECK(k_ > 0, "trace store ", dir_.string(), " was opened without logprobs (k = 0) but prompt ",
                  trace.prompt_id, " sample ", trace.sample, " carries top-k tensors");
    BRIGADE_CHECK(trace.topk_ids.defined() && trace.topk_logprobs.defined() && trace.topk_ids.dim() == 2 &&
                      trace.topk_ids.sizes() == trace.topk_logprobs.sizes() && trace.topk_ids.size(1) == k_,
                  "trace store ", dir_.string(), ": prompt ", trace.prompt_id, " sample ", trace.sample,
                  ": topk_ids and topk_logprobs must both be [positions, ", k_, "]");
    const torch::Tensor ids = trace.topk_ids.to(torch::kCPU, torch::kInt32).contiguous();
    const torch::Tensor logprobs = trace.topk_logprobs.to(torch::kCPU, torch::kFloat32).contiguous();
    positions = ids.size(0);
    records.resize(static_cast<size_t>(positions * record_bytes(k_)));
    const auto* id_data = ids.data_ptr<int32_t>();
    const auto* lp_data = logprobs.data_ptr<float>();
    char* out = records.data();
    for (int64_t p = 0; p < positions; ++p) {
      std::memcpy(out, id_data + p * k_, 4 * k_);
      std::memcpy(out + 4 * k_, lp_data + p * k_, 4 * k_);
      out += record_bytes(k_);
    }
    j["topk"] = {{"offset", topk_records_}, {"positions", positions}};
  }
  const std::string line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";

  // Records first, then the line that refers to them: a crash in between leaves
  // only unreferenced records, which the next open truncates. A failed write is
  // rolled back so the files stay appendable.
  const uint64_t topk_size = kTopkHeaderBytes + static_cast<uint64_t>(topk_records_ * record_bytes(k_));
  const uint64_t lines_size = file_size_of(lines_fd_, lines_path);
  try {
    if (!records.empty()) write_all(topk_fd_, topk_path, records.data(), records.size());
    write_all(lines_fd_, lines_path, line.data(), line.size());
  } catch (...) {
    if (topk_fd_ >= 0) (void)::ftruncate(topk_fd_, static_cast<off_t>(topk_size));
    (void)::ftruncate(lines_fd_, static_cast<off_t>(lines_size));
    throw;
  }
  topk_records_ += positions;
  if (!trace.failed()) done_.insert(std::move(key));
}

void TraceWriter::flush() {
  if (topk_fd_ >= 0) {
    BRIGADE_CHECK(::fsync(topk_fd_) == 0, "cannot fsync ", (dir_ / kTopkFile).string(), ": ",
                  std::strerror(errno));
  }
  BRIGADE_CHECK(::fsync(lines_fd_) == 0, "cannot fsync ", (dir_ / kTracesFile).string(), ": ",
                std::strerror(errno));
}

// ---------------------------------------------------------------- TraceReader

TraceReader::TraceReader(const fs::path& dir) {
  const fs::path lines_path = dir / kTracesFile;
  const fs::path topk_path = dir / kTopkFile;
  BRIGADE_CHECK(fs::is_regular_file(lines_path), "no trace store at ", dir.string(), " (", kTracesFile,
                " is missing)");
  std::optional<TopkSidecar> sidecar;
  if (fs::exists(topk_path)) {
    sidecar.emplace(topk_path);
    k_ = sidecar->k();
  }

  std::vector<StoredLine> lines;
  std::map<std::pair<std::string, int64_t>, size_t> last;  // key -> index of its last line
  const ScanResult scan = scan_traces(lines_path, sidecar ? sidecar->records() : 0, [&](StoredLine&& line) {
    last[{line.trace.prompt_id, line.trace.sample}] = lines.size();
    lines.push_back(std::move(line));
  });
  if (scan.torn_line != 0) {
    log_warn("trace store ", lines_path.string(), ": ignoring torn last line ", scan.torn_line, " (",
             scan.torn_reason, ")");
  }

  traces_.reserve(last.size());
  ranges_.reserve(last.size());
  for (size_t i = 0; i < lines.size(); ++i) {
    StoredLine& line = lines[i];
    if (last.at({line.trace.prompt_id, line.trace.sample}) != i) continue;  // superseded by a retry
    TopkRange range;
    if (line.has_topk) {
      BRIGADE_CHECK(sidecar.has_value(), "trace store ", dir.string(), ": prompt ", line.trace.prompt_id,
                    " sample ", line.trace.sample, " refers to top-k records but ", kTopkFile, " is missing");
      range = line.topk;
      std::tie(line.trace.topk_ids, line.trace.topk_logprobs) = sidecar->read(range);
    }
    traces_.push_back(std::move(line.trace));
    ranges_.push_back(range);
  }
}

}  // namespace brigade::distill
