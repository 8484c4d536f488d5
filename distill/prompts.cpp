#include "distill/prompts.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <string_view>
#include <unordered_map>

#include "core/error.h"
#include "core/fs.h"

namespace brigade::distill {

namespace {

constexpr size_t kMaxListedLines = 10;

bool is_blank(std::string_view line) {
  return line.find_first_not_of(" \t\r\f\v") == std::string_view::npos;
}

// The id as a string, or nullopt with `reason` set when the field is unusable.
std::optional<std::string> read_id(const nlohmann::json& object, std::string& reason) {
  auto it = object.find("id");
  if (it == object.end()) {
    reason = "no \"id\"";
    return std::nullopt;
  }
  if (it->is_string()) {
    std::string id = it->get<std::string>();
    if (id.empty()) {
      reason = "empty \"id\"";
      return std::nullopt;
    }
    return id;
  }
  if (it->is_number_integer()) return it->dump();
  reason = "\"id\" is not a string or integer";
  return std::nullopt;
}

// Parses one non-blank line; on failure returns nullopt and sets `reason`.
std::optional<Prompt> parse_line(std::string_view line, std::string& reason) {
  nlohmann::json object = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (object.is_discarded()) {
    reason = "not valid JSON";
    return std::nullopt;
  }
  if (!object.is_object()) {
    reason = "not a JSON object";
    return std::nullopt;
  }
  Prompt prompt;
  std::optional<std::string> id = read_id(object, reason);
  if (!id) return std::nullopt;
  prompt.id = std::move(*id);

  auto messages = object.find("messages");
  if (messages != object.end() && object.find("prompt") == object.end()) {
    if (!messages->is_array() || messages->empty() ||
        !std::all_of(messages->begin(), messages->end(), [](const nlohmann::json& m) {
          return m.is_object() && m.contains("role") && m["role"].is_string();
        })) {
      reason = "\"messages\" is not a non-empty list of {\"role\", ...} objects";
      return std::nullopt;
    }
    // The conversation keeps the line's key order (it shows in templates' tojson).
    nlohmann::ordered_json ordered = nlohmann::ordered_json::parse(line);
    for (const char* key : {"id", "answer"}) ordered.erase(key);
    prompt.conversation = ordered.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    const auto& last = messages->back();
    prompt.prompt = last.contains("content") && last["content"].is_string() ? last["content"].get<std::string>() : "";
  } else {
    auto text = object.find("prompt");
    if (text == object.end() || !text->is_string()) {
      reason = "no \"prompt\" string (or \"messages\" list)";
      return std::nullopt;
    }
    prompt.prompt = text->get<std::string>();
    if (prompt.prompt.empty()) {
      reason = "empty \"prompt\"";
      return std::nullopt;
    }
  }

  auto answer = object.find("answer");
  if (answer != object.end() && !answer->is_null()) {
    if (!answer->is_string()) {
      reason = "\"answer\" is not a string";
      return std::nullopt;
    }
    prompt.answer = answer->get<std::string>();
  }
  return prompt;
}

}  // namespace

std::string PromptSet::describe_skipped(const std::filesystem::path& file) const {
  if (skipped.empty()) return "";
  std::string out = "skipped " + std::to_string(skipped.size()) + " malformed line" +
                    (skipped.size() == 1 ? "" : "s") + " in " + file.string() + ": ";
  const size_t listed = std::min(skipped.size(), kMaxListedLines);
  for (size_t i = 0; i < listed; ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(skipped[i].first) + " (" + skipped[i].second + ")";
  }
  if (skipped.size() > listed) out += ", ... and " + std::to_string(skipped.size() - listed) + " more";
  return out;
}

PromptSet read_prompts(const std::filesystem::path& file) {
  BRIGADE_CHECK(std::filesystem::is_regular_file(file), "prompts file not found: ", file.string());
  const std::string content = read_file(file);

  PromptSet set;
  std::unordered_map<std::string, int64_t> first_line;  // id -> line it was defined on
  int64_t line_number = 0;
  size_t begin = 0;
  while (begin < content.size()) {
    size_t end = content.find('\n', begin);
    if (end == std::string::npos) end = content.size();
    const std::string_view line(content.data() + begin, end - begin);
    begin = end + 1;
    ++line_number;
    if (is_blank(line)) continue;

    std::string reason;
    std::optional<Prompt> prompt = parse_line(line, reason);
    if (prompt) {
      auto [it, inserted] = first_line.emplace(prompt->id, line_number);
      if (!inserted) {
        reason = "duplicate id \"" + prompt->id + "\", first on line " + std::to_string(it->second);
        prompt.reset();
      }
    }
    if (prompt) {
      set.prompts.push_back(std::move(*prompt));
    } else {
      set.skipped.emplace_back(line_number, std::move(reason));
    }
  }
  return set;
}

void write_prompts(const std::filesystem::path& file, const std::vector<Prompt>& prompts) {
  std::string content;
  for (const Prompt& prompt : prompts) {
    BRIGADE_CHECK(!prompt.id.empty(), "write_prompts ", file.string(), ": a prompt has an empty id");
    nlohmann::ordered_json object = {{"id", prompt.id}};
    if (prompt.chat()) {
      const auto conversation = nlohmann::ordered_json::parse(prompt.conversation);
      for (const auto& [key, value] : conversation.items()) object[key] = value;
    } else {
      object["prompt"] = prompt.prompt;
    }
    if (prompt.answer) object["answer"] = *prompt.answer;
    content += object.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    content += '\n';
  }
  write_file_atomic(file, content);
}

}  // namespace brigade::distill
