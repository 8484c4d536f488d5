#include "trainer/tensorboard.h"

#include <array>
#include <chrono>
#include <cstring>
#include <optional>

#include "core/error.h"
#include "core/fs.h"

namespace brigade::trainer {
namespace {

constexpr uint32_t kCastagnoli = 0x82f63b78u;  // CRC-32C, reflected

const std::array<uint32_t, 256>& crc_table() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ kCastagnoli : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  return table;
}

void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xffu));
}

uint64_t get_le(std::string_view in, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(static_cast<uint8_t>(in[at + i])) << (8 * i);
  return v;
}

// Protobuf wire format: varints, and fields by (number << 3 | wire type).
void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void put_tag(std::string& out, int field, int wire) { put_varint(out, static_cast<uint64_t>(field << 3 | wire)); }
void put_bytes(std::string& out, int field, std::string_view bytes) {
  put_tag(out, field, 2);
  put_varint(out, bytes.size());
  out.append(bytes);
}
void put_double(std::string& out, int field, double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  put_tag(out, field, 1);
  put_le(out, bits, 8);
}
void put_float(std::string& out, int field, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  put_tag(out, field, 5);
  put_le(out, bits, 4);
}

std::string event(double wall_time, int64_t step, const std::string& file_version, const std::string& summary) {
  std::string e;
  put_double(e, 1, wall_time);
  put_tag(e, 2, 0);
  put_varint(e, static_cast<uint64_t>(step));
  if (!file_version.empty()) put_bytes(e, 3, file_version);
  if (!summary.empty()) put_bytes(e, 5, summary);
  return e;
}

// The step of one of our own Events (field 2); nullopt if it has none or is malformed.
std::optional<int64_t> event_step(std::string_view e) {
  size_t i = 0;
  auto varint = [&]() -> std::optional<uint64_t> {
    uint64_t v = 0;
    for (int shift = 0; shift < 64 && i < e.size(); shift += 7) {
      const auto b = static_cast<uint8_t>(e[i++]);
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    return std::nullopt;
  };
  while (i < e.size()) {
    const auto key = varint();
    if (!key) return std::nullopt;
    const int wire = static_cast<int>(*key & 7), field = static_cast<int>(*key >> 3);
    if (field == 2 && wire == 0) {
      const auto v = varint();
      return v ? std::optional<int64_t>(static_cast<int64_t>(*v)) : std::nullopt;
    }
    if (wire == 0) {
      if (!varint()) return std::nullopt;
    } else if (wire == 1) {
      i += 8;
    } else if (wire == 5) {
      i += 4;
    } else if (wire == 2) {
      const auto n = varint();
      if (!n) return std::nullopt;
      i += *n;
    } else {
      return std::nullopt;
    }
  }
  return std::nullopt;
}

void flatten(const std::string& prefix, const nlohmann::json& value, std::vector<std::pair<std::string, double>>& out) {
  if (value.is_number()) {
    out.emplace_back(prefix, value.get<double>());
  } else if (value.is_array()) {
    for (size_t i = 0; i < value.size(); ++i) flatten(prefix + "/" + std::to_string(i), value[i], out);
  } else if (value.is_object()) {
    for (const auto& [k, v] : value.items()) flatten(prefix + "/" + k, v, out);
  }
}

}  // namespace

uint32_t crc32c(std::string_view bytes) {
  uint32_t c = 0xffffffffu;
  for (char ch : bytes) c = crc_table()[(c ^ static_cast<uint8_t>(ch)) & 0xffu] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

uint32_t masked_crc32c(std::string_view bytes) {
  const uint32_t c = crc32c(bytes);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

std::string tf_record(std::string_view data) {
  std::string length;
  put_le(length, data.size(), 8);
  std::string out = length;
  put_le(out, masked_crc32c(length), 4);
  out.append(data);
  put_le(out, masked_crc32c(data), 4);
  return out;
}

std::vector<std::pair<std::string, double>> scalars_of(const nlohmann::json& record) {
  std::vector<std::pair<std::string, double>> out;
  if (!record.is_object()) return out;
  for (const auto& [k, v] : record.items())
    if (k != "step") flatten(k, v, out);
  return out;
}

EventWriter::EventWriter(const std::filesystem::path& dir, int64_t keep_until_step)
    : path_(dir / "events.out.tfevents.brigade") {
  std::filesystem::create_directories(dir);
  const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  std::string kept;
  if (std::filesystem::exists(path_)) {
    const std::string bytes = read_file(path_);
    for (size_t at = 0; at + 12 <= bytes.size();) {
      const uint64_t length = get_le(bytes, at, 8);
      if (length > bytes.size() - at - 16) break;  // a torn record: the rest goes
      const std::string_view data(bytes.data() + at + 12, length);
      const auto step = event_step(data);
      if (masked_crc32c(data) != get_le(bytes, at + 12 + length, 4)) break;
      // The file_version event (step 0) stays; later steps than the resumed one go.
      if (keep_until_step < 0 || (step && *step <= keep_until_step)) kept.append(bytes, at, 16 + length);
      at += 16 + length;
    }
  }
  if (kept.empty()) kept = tf_record(event(now, 0, "brain.Event:2", ""));
  write_file_atomic(path_, kept);
  out_.open(path_, std::ios::binary | std::ios::app);
  BRIGADE_CHECK(out_.good(), "cannot open ", path_.string(), " for writing");
}

void EventWriter::scalars(int64_t step, double wall_time, const std::vector<std::pair<std::string, double>>& values) {
  std::string summary;
  for (const auto& [tag, v] : values) {
    std::string value;
    put_bytes(value, 1, tag);
    put_float(value, 2, static_cast<float>(v));
    put_bytes(summary, 1, value);
  }
  const std::string record = tf_record(event(wall_time, step, "", summary));
  out_.write(record.data(), static_cast<std::streamsize>(record.size()));
  out_.flush();
  BRIGADE_CHECK(out_.good(), "failed writing ", path_.string());
}

}  // namespace brigade::trainer
