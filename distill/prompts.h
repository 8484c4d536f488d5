// Prompts for distillation: the questions the teacher answers.
//
// A prompts file is JSONL (UTF-8), one object per line:
//
//   {"id": "add-17", "prompt": "Problem: 47*23+5\n", "answer": "1086"}
//   {"id": 18, "prompt": "Problem: 3-9\n"}
//   {"id": 19, "messages": [{"role": "user", "content": "What is 3-9?"}], "answer": "-6"}
//
//   id      string or integer (an integer id becomes its decimal string), unique
//           and non-empty
//   prompt  string, non-empty: the text sent to the teacher as is; or
//   messages  a non-empty list of chat messages ({"role", "content", ...}): a chat
//           prompt, rendered with the model's own chat template (data/chat.h) with
//           the assistant's turn opened, or sent as is to a chat API; "tools" and
//           template keywords such as "enable_thinking" on the line go with them
//   answer  optional string (or null): the reference answer the verifier compares
//           with; without one a sample is verified by its format alone
//
// Other keys are ignored. Blank lines are ignored. A malformed line (not JSON, not
// an object, a missing or ill-typed field, a duplicate id) does not stop the run:
// it is skipped, and its line number and reason are kept so the caller can report
// them (PromptSet::describe_skipped). A missing or unreadable file is an Error.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace brigade::distill {

struct Prompt {
  std::string id;
  std::string prompt;                 // the text; for a chat prompt, its last message's content (for display)
  std::optional<std::string> answer;  // reference answer, if the file gives one
  // A chat prompt: {"messages": [...], "tools"?, keywords...} as JSON text in the
  // file's key order; empty for a text prompt.
  std::string conversation;
  bool chat() const { return !conversation.empty(); }
};

struct PromptSet {
  std::vector<Prompt> prompts;  // in file order
  // (1-based line number, reason) for every malformed line, in file order.
  std::vector<std::pair<int64_t, std::string>> skipped;

  // "skipped 3 malformed lines in FILE: 4 (not valid JSON), 9 (no \"prompt\"
  // string), ..." listing at most 10 lines; "" when nothing was skipped.
  std::string describe_skipped(const std::filesystem::path& file) const;
};

PromptSet read_prompts(const std::filesystem::path& file);

// Writes `prompts` in the format above (ids as strings, "answer" only when set),
// atomically: the file appears complete or not at all.
void write_prompts(const std::filesystem::path& file, const std::vector<Prompt>& prompts);

}  // namespace brigade::distill
