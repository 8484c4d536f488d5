// TensorBoard event files, written without TensorFlow or protobuf.
//
// Format (what TensorBoard's event reader expects in RUN/tensorboard/*tfevents*): a
// sequence of TFRecords, each
//   uint64 length | uint32 masked_crc32c(length bytes) | data[length] | uint32 masked_crc32c(data)
// little-endian, with masked_crc(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 over the
// Castagnoli CRC-32C. Each record's data is an `Event` protobuf: wall_time (field 1,
// double), step (field 2, int64 varint), and either file_version (field 3, string;
// the first record, "brain.Event:2") or summary (field 5: a `Summary` of repeated
// `Value` (field 1) each holding tag (field 1, string) and simple_value (field 2,
// float32)). That small subset is encoded here by hand.
//
// A resumed run keeps one curve: opening with keep_until_step >= 0 rewrites the file
// (atomically) without the events of later steps, which the run is about to redo,
// as MetricsLog does for metrics.jsonl. A torn last record (a killed run) is dropped.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace brigade::trainer {

// CRC-32C (Castagnoli), and TensorBoard's masked form of it.
uint32_t crc32c(std::string_view bytes);
uint32_t masked_crc32c(std::string_view bytes);

// One framed TFRecord holding `data`.
std::string tf_record(std::string_view data);

// The scalars of a metrics.jsonl record, by TensorBoard tag: every number but
// "step"; arrays of numbers become "key/0", "key/1", ... (per MoE layer), nested
// objects "key/sub"; strings, booleans and nulls are left out.
std::vector<std::pair<std::string, double>> scalars_of(const nlohmann::json& record);

class EventWriter {
 public:
  // Writes `dir`/events.out.tfevents.brigade (creating `dir`). keep_until_step >= 0:
  // the events of later steps in an existing file are removed first.
  EventWriter(const std::filesystem::path& dir, int64_t keep_until_step);
  // One Event with the scalars at `step`, flushed.
  void scalars(int64_t step, double wall_time, const std::vector<std::pair<std::string, double>>& values);
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::ofstream out_;
};

}  // namespace brigade::trainer
