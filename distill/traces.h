// The trace store: the teacher's samples, append-only and crash-safe.
//
// A trace store is a directory with two files.
//
// traces.jsonl: one JSON object per line, one line per sample:
//
//   {"prompt_id": "17", "sample": 0, "text": "<think>...</think>\n\\boxed{1086}",
//    "finish_reason": "stop", "prompt_tokens": 12, "completion_tokens": 41,
//    "topk": {"offset": 1200, "positions": 41}}
//
//   finish_reason  "stop" (the teacher ended the sample), "length" (cut at the token
//                  limit) or "error" (the teacher failed; text is empty)
//   error          present only with finish_reason "error": what went wrong (for
//                  example "HTTP 503 after 4 attempts: ...")
//   topk           present only when top-k logprobs were captured: `positions`
//                  records (one per generated token) starting at record `offset` of
//                  the sidecar
//
// traces.topk.bin: the top-k sidecar, little-endian:
//
//   offset  size  field
//   0       8     magic "BRGTOPK1"
//   8       4     version (uint32) = 1
//   12      4     k (uint32) >= 1: candidates per position
//   16      16    reserved, zero
//   32      ...   records, 8k bytes each: k int32 token ids, then their k float32
//                 logprobs, in the teacher's order (most likely first)
//
// Record r starts at byte 32 + r * 8k. Lines that carry "topk" refer to
// consecutive, non-overlapping record ranges in line order, so the sidecar holds
// exactly header + (records referenced) * 8k bytes.
//
// Crash safety: a sample's sidecar records are written before its line, and the
// line is written with one write() ending in '\n'. A kill -9 can therefore leave
// at most a torn last line (no '\n', or not valid JSON) and sidecar records no line
// refers to. TraceWriter repairs both on open: it drops the torn line (log_warn)
// and truncates the sidecar to the records of the last complete line. flush()
// fsyncs both files, so a power loss loses at most the samples since the last flush.
// A bad line anywhere but at the end is corruption: an Error naming file and line.
//
// Failed samples and retries: a sample whose teacher call failed is stored with
// finish_reason "error". It does not count as done, so the next run generates it
// again and appends a second line for the same (prompt_id, sample). Readers keep
// only the last line per (prompt_id, sample); a non-error sample is never
// appended twice.
//
// Text is stored as UTF-8; invalid UTF-8 from a teacher is replaced with U+FFFD.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace brigade::distill {

inline constexpr char kTopkMagic[8] = {'B', 'R', 'G', 'T', 'O', 'P', 'K', '1'};
inline constexpr uint32_t kTopkVersion = 1;
inline constexpr size_t kTopkHeaderBytes = 32;
inline constexpr const char* kTracesFile = "traces.jsonl";
inline constexpr const char* kTopkFile = "traces.topk.bin";

struct Trace {
  std::string prompt_id;
  int64_t sample = 0;             // index among the prompt's samples, >= 0
  std::string text;               // the completion, without the prompt
  std::string finish_reason;      // "stop", "length" or "error"
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  std::string error;              // why the teacher failed (finish_reason "error"); else empty
  torch::Tensor topk_ids;         // [positions, k] int32; undefined without logprobs
  torch::Tensor topk_logprobs;    // [positions, k] float32; undefined without logprobs

  bool failed() const { return finish_reason == "error"; }
};

// Where a trace's records lie in the sidecar.
struct TopkRange {
  int64_t offset = 0;     // first record
  int64_t positions = 0;  // records
};

// Read access to a validated sidecar, memory-mapped. Tensors it returns share the
// mapping (zero copy) and keep it alive after the sidecar object is gone.
class TopkSidecar {
 public:
  explicit TopkSidecar(const std::filesystem::path& path);

  int64_t k() const { return k_; }
  int64_t records() const { return records_; }
  // ids [positions, k] int32 and logprobs [positions, k] float32 (strided views of
  // the file; writes to them stay in memory). An Error if the range is out of bounds.
  std::pair<torch::Tensor, torch::Tensor> read(const TopkRange& range) const;

 private:
  struct Mapping;
  std::filesystem::path path_;
  int64_t k_ = 0;
  int64_t records_ = 0;
  std::shared_ptr<Mapping> mapping_;
};

// Appends samples to a trace store, creating the directory and files if needed.
// One writer per store at a time (an flock on traces.jsonl; a second is an Error).
class TraceWriter {
 public:
  // k: top-k candidates per position for logprobs, 0 for none. A store that
  // already has a sidecar must be reopened with the same k.
  TraceWriter(std::filesystem::path dir, int64_t k);
  ~TraceWriter();
  TraceWriter(const TraceWriter&) = delete;
  TraceWriter& operator=(const TraceWriter&) = delete;

  // (prompt_id, sample) of every stored sample that did not fail: what a resumed
  // run skips.
  const std::set<std::pair<std::string, int64_t>>& done() const { return done_; }
  int64_t k() const { return k_; }
  const std::filesystem::path& dir() const { return dir_; }

  // Stores one sample (its topk tensors [positions, k] when k > 0 and it has them).
  // An Error if (prompt_id, sample) is already done or a field is invalid.
  void append(const Trace& trace);
  // fsyncs both files: everything appended so far survives a power loss.
  void flush();

 private:
  std::filesystem::path dir_;
  int64_t k_ = 0;
  int lines_fd_ = -1;
  int topk_fd_ = -1;
  int64_t topk_records_ = 0;  // records in the sidecar, all referenced by lines
  std::set<std::pair<std::string, int64_t>> done_;
};

// Reads a whole trace store. A torn last line is ignored (with a log_warn) and left
// for the next TraceWriter to repair; any other damage is an Error.
class TraceReader {
 public:
  explicit TraceReader(const std::filesystem::path& dir);

  // Number of samples: the last record per (prompt_id, sample), failed ones included.
  int64_t size() const { return static_cast<int64_t>(traces_.size()); }
  // In store order; topk tensors are zero-copy views of the mapped sidecar.
  const std::vector<Trace>& traces() const { return traces_; }
  // Where traces()[i]'s records lie in the sidecar (positions 0 without topk).
  const TopkRange& topk_range(int64_t i) const { return ranges_.at(static_cast<size_t>(i)); }
  int64_t k() const { return k_; }  // 0 when the store has no sidecar

 private:
  std::vector<Trace> traces_;
  std::vector<TopkRange> ranges_;
  int64_t k_ = 0;
};

}  // namespace brigade::distill
