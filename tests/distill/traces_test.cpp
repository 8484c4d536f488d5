#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <map>
#include <thread>

#include "core/fs.h"
#include "distill/traces.h"
#include "tests/testing.h"

namespace brigade::distill {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

// A sample whose text and top-k content are a function of (id, sample).
Trace make_trace(const std::string& id, int64_t sample, int64_t k, int64_t positions) {
  Trace t;
  t.prompt_id = id;
  t.sample = sample;
  t.text = "<think>\n" + id + " sample " + std::to_string(sample) + "\n</think>\n\\boxed{" + id + "}";
  t.finish_reason = "stop";
  t.prompt_tokens = 5;
  t.completion_tokens = positions;
  if (k > 0) {
    const int64_t base = static_cast<int64_t>(std::hash<std::string>{}(id) % 1000) + 1000 * sample;
    t.topk_ids = torch::arange(base, base + positions * k, torch::kInt32).reshape({positions, k});
    t.topk_logprobs = -torch::arange(0, positions * k, torch::kFloat32).reshape({positions, k}) / 8.0f -
                      static_cast<float>(sample);
  }
  return t;
}

Trace failed_trace(const std::string& id, int64_t sample) {
  Trace t;
  t.prompt_id = id;
  t.sample = sample;
  t.finish_reason = "error";
  return t;
}

std::map<std::pair<std::string, int64_t>, const Trace*> by_key(const TraceReader& reader) {
  std::map<std::pair<std::string, int64_t>, const Trace*> out;
  for (const Trace& t : reader.traces()) {
    EXPECT_TRUE(out.emplace(std::make_pair(t.prompt_id, t.sample), &t).second)
        << "duplicate " << t.prompt_id << "/" << t.sample;
  }
  return out;
}

void expect_same(const Trace& got, const Trace& want) {
  EXPECT_EQ(got.prompt_id, want.prompt_id);
  EXPECT_EQ(got.sample, want.sample);
  EXPECT_EQ(got.text, want.text);
  EXPECT_EQ(got.finish_reason, want.finish_reason);
  EXPECT_EQ(got.prompt_tokens, want.prompt_tokens);
  EXPECT_EQ(got.completion_tokens, want.completion_tokens);
  ASSERT_EQ(got.topk_ids.defined(), want.topk_ids.defined());
  if (want.topk_ids.defined()) {
    EXPECT_EQ(got.topk_ids.scalar_type(), torch::kInt32);
    EXPECT_EQ(got.topk_logprobs.scalar_type(), torch::kFloat32);
    EXPECT_TRUE(torch::equal(got.topk_ids, want.topk_ids)) << got.prompt_id << "/" << got.sample;
    EXPECT_TRUE(torch::equal(got.topk_logprobs, want.topk_logprobs)) << got.prompt_id << "/" << got.sample;
  }
}

int64_t count_lines(const fs::path& path) {
  const std::string content = read_file(path);
  return std::count(content.begin(), content.end(), '\n');
}

TEST(DistillTraces, AppendReopenAndResume) {
  TempDir dir;
  const fs::path store = dir / "store";
  {
    TraceWriter writer(store, 0);
    EXPECT_TRUE(writer.done().empty());
    writer.append(make_trace("a", 0, 0, 3));
    writer.append(make_trace("a", 1, 0, 4));
    writer.flush();
    EXPECT_EQ(writer.done().size(), 2u);
    EXPECT_BRIGADE_ERROR(writer.append(make_trace("a", 1, 0, 4)), "already stored");
  }
  EXPECT_FALSE(fs::exists(store / kTopkFile)) << "no sidecar without logprobs";
  {
    TraceWriter writer(store, 0);
    EXPECT_EQ(writer.done(), (std::set<std::pair<std::string, int64_t>>{{"a", 0}, {"a", 1}}));
    EXPECT_BRIGADE_ERROR(writer.append(make_trace("a", 0, 0, 3)), "already stored");
    writer.append(make_trace("b", 0, 0, 2));
  }
  TraceReader reader(store);
  ASSERT_EQ(reader.size(), 3);
  EXPECT_EQ(reader.k(), 0);
  expect_same(reader.traces()[0], make_trace("a", 0, 0, 3));
  expect_same(reader.traces()[1], make_trace("a", 1, 0, 4));
  expect_same(reader.traces()[2], make_trace("b", 0, 0, 2));
  EXPECT_EQ(count_lines(store / kTracesFile), 3);
}

TEST(DistillTraces, TopkRoundTripAndSidecarLayout) {
  TempDir dir;
  const int64_t k = 4;
  std::vector<Trace> written = {make_trace("p1", 0, k, 5), make_trace("p1", 1, k, 0), make_trace("p2", 0, k, 3)};
  Trace plain = make_trace("p3", 0, 0, 2);  // a sample without logprobs in a store with them
  {
    TraceWriter writer(dir.path(), k);
    for (const Trace& t : written) writer.append(t);
    writer.append(plain);
  }
  // Header plus 5 + 0 + 3 records of 8k bytes.
  const std::string bytes = read_file(dir / kTopkFile);
  ASSERT_EQ(bytes.size(), kTopkHeaderBytes + 8u * 8u * k);
  EXPECT_EQ(bytes.substr(0, 8), "BRGTOPK1");
  uint32_t version = 0, k_on_disk = 0;
  std::memcpy(&version, bytes.data() + 8, 4);
  std::memcpy(&k_on_disk, bytes.data() + 12, 4);
  EXPECT_EQ(version, 1u);
  EXPECT_EQ(k_on_disk, static_cast<uint32_t>(k));
  EXPECT_EQ(bytes.substr(16, 16), std::string(16, '\0'));
  // Record 6 is p2's second position: its ids, then its logprobs.
  const char* record = bytes.data() + kTopkHeaderBytes + 6 * 8 * k;
  int32_t id0 = 0;
  float lp0 = 0;
  std::memcpy(&id0, record, 4);
  std::memcpy(&lp0, record + 4 * k, 4);
  EXPECT_EQ(id0, written[2].topk_ids[1][0].item<int32_t>());
  EXPECT_EQ(lp0, written[2].topk_logprobs[1][0].item<float>());

  // The JSONL points at the records.
  const std::string lines = read_file(dir / kTracesFile);
  EXPECT_NE(lines.find("\"topk\":{\"offset\":5,\"positions\":3}"), std::string::npos) << lines;

  TraceReader reader(dir.path());
  ASSERT_EQ(reader.size(), 4);
  EXPECT_EQ(reader.k(), k);
  for (size_t i = 0; i < written.size(); ++i) expect_same(reader.traces()[i], written[i]);
  expect_same(reader.traces()[3], plain);
  EXPECT_EQ(reader.topk_range(2).offset, 5);
  EXPECT_EQ(reader.topk_range(2).positions, 3);
  EXPECT_EQ(reader.traces()[1].topk_ids.sizes().vec(), (std::vector<int64_t>{0, k}));

  // The tensors share the mapping and outlive the reader.
  torch::Tensor ids = reader.traces()[0].topk_ids;
  { TraceReader gone(dir.path()); }
  EXPECT_TRUE(torch::equal(ids, written[0].topk_ids));

  // TopkSidecar reads the same records directly (the build stage's path).
  TopkSidecar sidecar(dir / kTopkFile);
  EXPECT_EQ(sidecar.records(), 8);
  auto [direct_ids, direct_lps] = sidecar.read({5, 3});
  EXPECT_TRUE(torch::equal(direct_ids, written[2].topk_ids));
  EXPECT_TRUE(torch::equal(direct_lps, written[2].topk_logprobs));
  EXPECT_BRIGADE_ERROR(sidecar.read({6, 3}), "out of range");
}

TEST(DistillTraces, TopkShapeAndSettingMismatchesAreErrors) {
  TempDir dir;
  {
    TraceWriter writer(dir.path(), 4);
    Trace wrong_k = make_trace("a", 0, 3, 2);
    EXPECT_BRIGADE_ERROR(writer.append(wrong_k), "[positions, 4]");
    Trace half = make_trace("a", 0, 4, 2);
    half.topk_logprobs = torch::Tensor();
    EXPECT_BRIGADE_ERROR(writer.append(half), "[positions, 4]");
    Trace bad_reason = make_trace("a", 0, 4, 2);
    bad_reason.finish_reason = "done";
    EXPECT_BRIGADE_ERROR(writer.append(bad_reason), "finish_reason");
    writer.append(make_trace("a", 0, 4, 2));
  }
  EXPECT_BRIGADE_ERROR(TraceWriter(dir.path(), 8), "opened with k = 8");
  EXPECT_BRIGADE_ERROR(TraceWriter(dir.path(), 0), "opened with k = 0");
  TempDir plain;
  TraceWriter writer(plain.path(), 0);
  EXPECT_BRIGADE_ERROR(writer.append(make_trace("a", 0, 4, 2)), "without logprobs");
  // A second writer on the same store is refused while the first is open.
  EXPECT_BRIGADE_ERROR(TraceWriter(plain.path(), 0), "in use by another writer");
}

TEST(DistillTraces, TornLastLineIsDroppedAndSidecarTruncated) {
  TempDir dir;
  const int64_t k = 2;
  {
    TraceWriter writer(dir.path(), k);
    writer.append(make_trace("a", 0, k, 3));
    writer.append(make_trace("a", 1, k, 4));
    writer.append(make_trace("b", 0, k, 2));
  }
  const fs::path lines = dir / kTracesFile;
  const fs::path sidecar = dir / kTopkFile;
  // Cut the last line in half, as a kill -9 in the middle of its write would.
  const std::string content = read_file(lines);
  const size_t last_start = content.rfind('\n', content.size() - 2) + 1;
  fs::resize_file(lines, last_start + (content.size() - last_start) / 2);
  ASSERT_EQ(fs::file_size(sidecar), kTopkHeaderBytes + 9u * 8u * k);

  {
    TraceReader reader(dir.path());  // read-only: ignores the torn line
    EXPECT_EQ(reader.size(), 2);
  }
  {
    TraceWriter writer(dir.path(), k);
    EXPECT_EQ(writer.done(), (std::set<std::pair<std::string, int64_t>>{{"a", 0}, {"a", 1}}));
    EXPECT_EQ(fs::file_size(lines), last_start) << "the torn line is gone";
    EXPECT_EQ(fs::file_size(sidecar), kTopkHeaderBytes + 7u * 8u * k) << "b/0's records are gone";
    writer.append(make_trace("b", 0, k, 2));  // generated again
    writer.append(make_trace("c", 0, k, 1));
  }
  TraceReader reader(dir.path());
  ASSERT_EQ(reader.size(), 4);
  auto all = by_key(reader);
  expect_same(*all.at({"a", 0}), make_trace("a", 0, k, 3));
  expect_same(*all.at({"a", 1}), make_trace("a", 1, k, 4));
  expect_same(*all.at({"b", 0}), make_trace("b", 0, k, 2));
  expect_same(*all.at({"c", 0}), make_trace("c", 0, k, 1));
  EXPECT_EQ(count_lines(lines), 4);
  EXPECT_EQ(fs::file_size(sidecar), kTopkHeaderBytes + 10u * 8u * k);
}

TEST(DistillTraces, CompleteLastLineWhoseRecordsAreMissingIsDropped) {
  // A line whose records never reached the sidecar (or a line that parses badly
  // but ends in '\n') is treated as torn when it is the last one.
  TempDir dir;
  const int64_t k = 2;
  {
    TraceWriter writer(dir.path(), k);
    writer.append(make_trace("a", 0, k, 3));
    writer.append(make_trace("a", 1, k, 4));
  }
  fs::resize_file(dir / kTopkFile, kTopkHeaderBytes + 5u * 8u * k);  // a/1 has 1 of its 4 records
  {
    TraceWriter writer(dir.path(), k);
    EXPECT_EQ(writer.done().size(), 1u);
    EXPECT_EQ(fs::file_size(dir / kTopkFile), kTopkHeaderBytes + 3u * 8u * k);
  }
  std::ofstream(dir / kTracesFile, std::ios::app) << "{\"prompt_id\": \"x\", \"sample\": \"zero\"}\n";
  TraceWriter writer(dir.path(), k);
  EXPECT_EQ(writer.done().size(), 1u);
  writer.append(make_trace("a", 1, k, 4));
  EXPECT_EQ(writer.done().size(), 2u);
}

TEST(DistillTraces, DamageBeforeTheLastLineIsAnError) {
  TempDir dir;
  {
    TraceWriter writer(dir.path(), 0);
    writer.append(make_trace("a", 0, 0, 1));
    writer.append(make_trace("a", 1, 0, 1));
  }
  std::string content = read_file(dir / kTracesFile);
  content.insert(content.find('\n') + 1, "{\"prompt_id\": \"a\", \"sample\": 7, \"text\": 3}\n");
  write_file_atomic(dir / kTracesFile, content);
  EXPECT_BRIGADE_ERROR(TraceWriter(dir.path(), 0), "line 2 is bad (no \"text\" string)");
  EXPECT_BRIGADE_ERROR(TraceReader(dir.path()), "more lines follow");
}

TEST(DistillTraces, CorruptSidecarHeaderIsAnError) {
  TempDir dir;
  {
    TraceWriter writer(dir.path(), 2);
    writer.append(make_trace("a", 0, 2, 1));
  }
  std::string bytes = read_file(dir / kTopkFile);
  std::string bad_magic = bytes;
  bad_magic[0] = 'X';
  write_file_atomic(dir / kTopkFile, bad_magic);
  EXPECT_BRIGADE_ERROR(TraceReader(dir.path()), "bad magic");
  EXPECT_BRIGADE_ERROR(TraceWriter(dir.path(), 2), "bad magic");
  std::string bad_version = bytes;
  bad_version[8] = 9;
  write_file_atomic(dir / kTopkFile, bad_version);
  EXPECT_BRIGADE_ERROR(TraceReader(dir.path()), "version 9");
  write_file_atomic(dir / kTopkFile, bytes.substr(0, 20));
  EXPECT_BRIGADE_ERROR(TraceReader(dir.path()), "truncated");
  std::string reserved = bytes;
  reserved[20] = 1;
  write_file_atomic(dir / kTopkFile, reserved);
  EXPECT_BRIGADE_ERROR(TraceReader(dir.path()), "reserved header byte 20");
  EXPECT_BRIGADE_ERROR(TraceReader(dir / "missing"), "no trace store");
}

TEST(DistillTraces, FailedSamplesAreRetriedAndTheLastRecordWins) {
  TempDir dir;
  {
    TraceWriter writer(dir.path(), 0);
    writer.append(make_trace("a", 0, 0, 2));
    writer.append(failed_trace("a", 1));
    writer.append(failed_trace("b", 0));
    EXPECT_EQ(writer.done(), (std::set<std::pair<std::string, int64_t>>{{"a", 0}}))
        << "failed samples are not done";
  }
  {
    TraceReader reader(dir.path());
    ASSERT_EQ(reader.size(), 3);
    EXPECT_TRUE(reader.traces()[1].failed());
  }
  {
    TraceWriter writer(dir.path(), 0);
    EXPECT_EQ(writer.done().size(), 1u) << "a resumed run retries a/1 and b/0";
    writer.append(make_trace("a", 1, 0, 3));  // the retry succeeds
    writer.append(failed_trace("b", 0));      // fails again
    EXPECT_EQ(writer.done().size(), 2u);
  }
  TraceWriter writer(dir.path(), 0);
  EXPECT_EQ(writer.done(), (std::set<std::pair<std::string, int64_t>>{{"a", 0}, {"a", 1}}));
  writer.append(make_trace("b", 0, 0, 1));

  TraceReader reader(dir.path());
  EXPECT_EQ(count_lines(dir / kTracesFile), 6);
  ASSERT_EQ(reader.size(), 3) << "one sample per (prompt_id, sample)";
  auto all = by_key(reader);
  expect_same(*all.at({"a", 1}), make_trace("a", 1, 0, 3));
  expect_same(*all.at({"b", 0}), make_trace("b", 0, 0, 1));
}

TEST(DistillTraces, InvalidUtf8TextIsStoredReplaced) {
  TempDir dir;
  {
    TraceWriter writer(dir.path(), 0);
    Trace t = make_trace("a", 0, 0, 1);
    t.text = "ok \xff end";
    writer.append(t);
  }
  TraceReader reader(dir.path());
  ASSERT_EQ(reader.size(), 1);
  EXPECT_EQ(reader.traces()[0].text, "ok \xEF\xBF\xBD end");
}

TEST(DistillTraces, KillNineWhileAppendingLosesNothingStoredAndDuplicatesNothing) {
  TempDir dir;
  const int64_t k = 3;
  for (int round = 0; round < 3; ++round) {
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      // Append samples until killed; resume skips what an earlier round stored.
      try {
        TraceWriter writer(dir.path(), k);
        for (int64_t s = 0;; ++s) {
          if (writer.done().count({"p", s}) == 0) writer.append(make_trace("p", s, k, 1 + s % 7));
        }
      } catch (...) {
        ::_exit(3);
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(150 + 50 * round));
    ASSERT_EQ(::kill(child, SIGKILL), 0);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFSIGNALED(status)) << "the writer stopped by itself with status " << status;
  }
  TraceWriter writer(dir.path(), k);  // repairs whatever the last kill left
  const int64_t stored = static_cast<int64_t>(writer.done().size());
  EXPECT_GT(stored, 0);
  TraceReader reader(dir.path());
  ASSERT_EQ(reader.size(), stored);
  EXPECT_EQ(count_lines(dir / kTracesFile), stored) << "no sample appears twice";
  for (int64_t s = 0; s < stored; ++s) {
    EXPECT_EQ(writer.done().count({"p", s}), 1u) << "samples 0.." << stored - 1 << " without gaps";
    expect_same(reader.traces()[static_cast<size_t>(s)], make_trace("p", s, k, 1 + s % 7));
  }
  int64_t records = 0;
  for (int64_t s = 0; s < stored; ++s) records += 1 + s % 7;
  EXPECT_EQ(fs::file_size(dir / kTopkFile), kTopkHeaderBytes + static_cast<uint64_t>(records * 8 * k));
}

}  // namespace
}  // namespace brigade::distill
