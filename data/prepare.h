// `brigade data prepare`: text or JSONL files into token shards.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace brigade::data {

struct PrepareOptions {
  std::vector<std::filesystem::path> inputs;  // .txt (one document per blank-line-separated block) or .jsonl
  std::filesystem::path output_dir;
  std::string text_field = "text";            // JSONL: field with the document text
  // JSONL chat style: when both are set and present, the prompt is masked out of the
  // loss and the completion trained on (writes a loss-mask stream).
  std::string prompt_field;
  std::string completion_field;
  // Conversations: a JSONL line with `messages_field` ({"messages": [{role, content},
  // ...], "tools"?: [...], plus template keywords such as "enable_thinking"}) is
  // rendered with the chat template (the tokenizer's own unless `chat_template`, a
  // Jinja source, is given) and trained on its assistant turns only (data/chat.h);
  // writes a loss-mask stream. Other lines are read as without it.
  bool chat = false;
  std::string messages_field = "messages";
  std::string chat_template;
  int64_t tokens_per_shard = 64 * 1024 * 1024;
};

struct PrepareReport {
  std::vector<std::filesystem::path> shards;
  int64_t documents = 0;
  int64_t tokens = 0;
};

// Bad input (missing file, invalid JSON, missing field) is an Error naming file and
// line; shards are written atomically, so a failure leaves no partial shard.
PrepareReport prepare_shards(const PrepareOptions& options, const Tokenizer& tokenizer);

}  // namespace brigade::data
