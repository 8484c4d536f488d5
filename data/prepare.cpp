#include "data/prepare.h"

#include <cstdio>
#include <fstream>
#include <optional>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "data/chat.h"
#include "data/shard.h"

namespace brigade::data {

namespace {

namespace fs = std::filesystem;

enum class InputKind { kText, kJsonl };

InputKind input_kind(const fs::path& path) {
  const std::string ext = path.extension().string();
  if (ext == ".txt") return InputKind::kText;
  if (ext == ".jsonl") return InputKind::kJsonl;
  BRIGADE_FAIL("data prepare: ", path.string(), ": unknown extension '", ext,
               "' (expected .txt or .jsonl)");
}

// One document before tokenization. A chat document's BOS and prompt are not trained
// on; a plain document trains on every token, as in a shard without a mask.
struct RawDocument {
  bool chat = false;
  std::string prompt;
  std::string body;
  // A conversation in the model's chat format: its own framing and mask (data/chat.h).
  std::vector<ChatSegment> conversation;
};

// Rolls documents into shard_00000.bin, shard_00001.bin, ... of at most
// tokens_per_shard tokens (a longer document gets a shard of its own).
class ShardSequence {
 public:
  ShardSequence(const PrepareOptions& options, const Tokenizer& tokenizer, bool with_mask)
      : options_(options), tokenizer_(tokenizer), with_mask_(with_mask) {}

  void add(const RawDocument& doc) {
    tokens_.clear();
    mask_.clear();
    if (!doc.conversation.empty()) {
      ChatTokens chat = tokenize_chat(tokenizer_, doc.conversation);
      tokens_ = std::move(chat.tokens);
      mask_ = std::move(chat.mask);
      write();
      return;
    }
    // The model's convention: BOS first or not (Tokenizer::add_bos).
    tokens_ = sequence_start(tokenizer_);
    const size_t start = tokens_.size();
    // Specials are not parsed from raw data: text that merely looks like "<|eos|>"
    // must not end a document.
    std::vector<int64_t> prompt = tokenizer_.encode(doc.prompt);
    std::vector<int64_t> body = tokenizer_.encode(doc.body);
    tokens_.insert(tokens_.end(), prompt.begin(), prompt.end());
    tokens_.insert(tokens_.end(), body.begin(), body.end());
    tokens_.push_back(tokenizer_.eos_id());
    if (with_mask_) {
      mask_.assign(doc.chat ? start + prompt.size() : 0, 0);
      mask_.resize(tokens_.size(), 1);
    }
    write();
  }

  void write() {
    if (!with_mask_) mask_.clear();
    const auto n = static_cast<int64_t>(tokens_.size());
    if (writer_ && shard_tokens_ > 0 && shard_tokens_ + n > options_.tokens_per_shard) close();
    if (!writer_) open();
    writer_->add_document(tokens_, mask_);
    shard_tokens_ += n;
    report_.documents += 1;
    report_.tokens += n;
  }

  PrepareReport finish() {
    if (writer_) close();
    return report_;
  }

  // Removes the shards this run wrote (the directory held none before it started).
  void discard() {
    writer_.reset();
    std::error_code ec;
    for (const auto& path : report_.shards) fs::remove(path, ec);
    report_.shards.clear();
  }

 private:
  void open() {
    char name[32];
    std::snprintf(name, sizeof name, "shard_%05zu.bin", report_.shards.size());
    current_ = options_.output_dir / name;
    writer_ = std::make_unique<ShardWriter>(current_, static_cast<uint32_t>(tokenizer_.vocab_size()),
                                            with_mask_);
    shard_tokens_ = 0;
  }

  void close() {
    ShardHeader header = writer_->finish();
    writer_.reset();
    report_.shards.push_back(current_);
    log_info("data prepare: wrote ", current_.string(), " (", header.doc_count, " documents, ",
             header.token_count, " tokens)");
  }

  const PrepareOptions& options_;
  const Tokenizer& tokenizer_;
  bool with_mask_;
  std::unique_ptr<ShardWriter> writer_;
  fs::path current_;
  int64_t shard_tokens_ = 0;
  PrepareReport report_;
  std::vector<int64_t> tokens_;
  std::vector<uint8_t> mask_;
};

std::string strip_cr(std::string line) {
  if (!line.empty() && line.back() == '\r') line.pop_back();
  return line;
}

// Bytes of input read so far, shown as a bar on a terminal (lines otherwise).
class InputProgress {
 public:
  explicit InputProgress(int64_t total) : bar_("prepare (input bytes)", total, stderr_is_terminal(), /*quiet_seconds=*/2.0) {}
  void line(size_t bytes) {
    done_ += static_cast<int64_t>(bytes) + 1;
    if (++lines_ % 4096 == 0) bar_.tick(done_, std::to_string(lines_) + " lines");
  }
  void finish(int64_t total) {
    bar_.tick(total, std::to_string(lines_) + " lines");
    bar_.finish();
  }

 private:
  Progress bar_;
  int64_t done_ = 0, lines_ = 0;
};

// Documents are blocks of lines separated by empty lines.
void read_text(const fs::path& path, ShardSequence& out, InputProgress& progress) {
  std::ifstream in(path, std::ios::binary);
  BRIGADE_CHECK(in.good(), "data prepare: cannot open ", path.string());
  std::string line;
  RawDocument doc;
  bool open = false;
  while (std::getline(in, line)) {
    progress.line(line.size());
    line = strip_cr(std::move(line));
    if (line.empty()) {
      if (open) out.add(doc);
      doc.body.clear();
      open = false;
      continue;
    }
    if (open) doc.body += '\n';
    doc.body += line;
    open = true;
  }
  BRIGADE_CHECK(in.eof(), "data prepare: error reading ", path.string());
  if (open) out.add(doc);
}

std::optional<std::string> string_field(const nlohmann::json& object, const std::string& field) {
  auto it = object.find(field);
  if (it == object.end() || !it->is_string()) return std::nullopt;
  return it->get<std::string>();
}

void read_jsonl(const fs::path& path, const PrepareOptions& options, const Tokenizer& tokenizer,
                const ChatTemplate* chat_template, ShardSequence& out, InputProgress& progress) {
  std::ifstream in(path, std::ios::binary);
  BRIGADE_CHECK(in.good(), "data prepare: cannot open ", path.string());
  const bool chat = !options.prompt_field.empty() && !options.completion_field.empty();
  std::string line;
  int64_t number = 0;
  while (std::getline(in, line)) {
    ++number;
    progress.line(line.size());
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path.string() + ":" + std::to_string(number);
    if (chat_template != nullptr) {
      nlohmann::ordered_json ordered;
      try {
        ordered = nlohmann::ordered_json::parse(line);
      } catch (const nlohmann::json::parse_error& e) {
        BRIGADE_FAIL(where, ": invalid JSON: ", e.what());
      }
      if (ordered.is_object() && ordered.contains(options.messages_field)) {
        if (options.messages_field != "messages") {
          ordered["messages"] = ordered[options.messages_field];
          ordered.erase(options.messages_field);
        }
        RawDocument doc;
        const ChatRequest request = chat_request(ordered, tokenizer, where);
        try {
          doc.conversation = chat_segments(*chat_template, request);
        } catch (const Error& e) {
          BRIGADE_FAIL(where, ": ", e.message());
        }
        out.add(doc);
        continue;
      }
    }
    nlohmann::json object;
    try {
      object = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      BRIGADE_FAIL(where, ": invalid JSON: ", e.what());
    }
    BRIGADE_CHECK(object.is_object(), where, ": expected a JSON object, got ", object.type_name());
    RawDocument doc;
    if (chat) {
      auto prompt = string_field(object, options.prompt_field);
      auto completion = string_field(object, options.completion_field);
      if (prompt && completion) {
        doc.chat = true;
        doc.prompt = std::move(*prompt);
        doc.body = std::move(*completion);
        out.add(doc);
        continue;
      }
      auto text = string_field(object, options.text_field);
      BRIGADE_CHECK(text.has_value(), where, ": no string fields '", options.prompt_field, "' and '",
                    options.completion_field, "' (nor '", options.text_field, "')");
      doc.body = std::move(*text);
    } else {
      auto text = string_field(object, options.text_field);
      BRIGADE_CHECK(text.has_value(), where, ": no string field '", options.text_field, "'");
      doc.body = std::move(*text);
    }
    out.add(doc);
  }
  BRIGADE_CHECK(in.eof(), "data prepare: error reading ", path.string());
}

bool has_shards(const fs::path& dir) {
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.starts_with("shard_") && name.ends_with(".bin")) return true;
  }
  return false;
}

}  // namespace

PrepareReport prepare_shards(const PrepareOptions& options, const Tokenizer& tokenizer) {
  BRIGADE_CHECK(!options.inputs.empty(), "data prepare: no input files given");
  BRIGADE_CHECK(!options.output_dir.empty(), "data prepare: no output directory given");
  BRIGADE_CHECK(options.tokens_per_shard >= 1, "data prepare: tokens_per_shard must be >= 1, got ",
                options.tokens_per_shard);
  BRIGADE_CHECK(tokenizer.vocab_size() <= int64_t{UINT32_MAX},
                "data prepare: vocabulary of ", tokenizer.vocab_size(),
                " does not fit a token shard's uint32 vocab_size");
  // Check every input before writing anything.
  for (const auto& input : options.inputs) {
    BRIGADE_CHECK(fs::exists(input), "data prepare: input file not found: ", input.string());
    BRIGADE_CHECK(fs::is_regular_file(input), "data prepare: input is not a file: ", input.string());
    input_kind(input);
  }
  if (fs::exists(options.output_dir)) {
    BRIGADE_CHECK(fs::is_directory(options.output_dir), "data prepare: output ",
                  options.output_dir.string(), " exists and is not a directory");
    BRIGADE_CHECK(!has_shards(options.output_dir), "data prepare: ", options.output_dir.string(),
                  " already holds shard_*.bin files; refusing to overwrite data (choose an empty "
                  "directory)");
  } else {
    fs::create_directories(options.output_dir);
  }

  const bool with_mask = options.chat || (!options.prompt_field.empty() && !options.completion_field.empty());
  std::optional<ChatTemplate> chat_template;
  if (options.chat) {
    const std::string& source = options.chat_template.empty() ? tokenizer.chat_template() : options.chat_template;
    BRIGADE_CHECK(!source.empty(), "data prepare: the tokenizer ", tokenizer.name(),
                  " ships no chat template; give one with --chat-template FILE");
    chat_template.emplace(source, options.chat_template.empty() ? "the chat template of " + tokenizer.name()
                                                                : std::string("--chat-template"));
  }
  ShardSequence shards(options, tokenizer, with_mask);
  int64_t total_bytes = 0;
  for (const auto& input : options.inputs) total_bytes += static_cast<int64_t>(fs::file_size(input));
  InputProgress progress(total_bytes);
  try {
    for (const auto& input : options.inputs) {
      if (input_kind(input) == InputKind::kText)
        read_text(input, shards, progress);
      else
        read_jsonl(input, options, tokenizer, chat_template ? &*chat_template : nullptr, shards, progress);
    }
    progress.finish(total_bytes);
    PrepareReport report = shards.finish();
    BRIGADE_CHECK(report.documents > 0, "data prepare: the inputs hold no documents");
    return report;
  } catch (...) {
    // All or nothing: a later bad input must not leave a half-prepared dataset.
    shards.discard();
    throw;
  }
}

}  // namespace brigade::data
