#include "data/chat.h"

#include "core/error.h"

namespace brigade::data {

namespace {

ChatRequest prefix(const ChatRequest& request, size_t messages, bool add_generation_prompt) {
  ChatRequest out = request;
  out.messages = nlohmann::ordered_json::array();
  for (size_t i = 0; i < messages; ++i) out.messages.push_back(request.messages[i]);
  out.add_generation_prompt = add_generation_prompt;
  return out;
}

std::vector<int64_t> frame(const Tokenizer& tokenizer, std::vector<int64_t> tokens) {
  if (tokenizer.add_bos()) {
    const int64_t bos = tokenizer.bos_id();
    if (tokens.empty() || tokens.front() != bos) tokens.insert(tokens.begin(), bos);
  }
  return tokens;
}

}  // namespace

std::vector<ChatSegment> chat_segments(const ChatTemplate& chat_template, const ChatRequest& request) {
  BRIGADE_CHECK(request.messages.is_array() && !request.messages.empty(), "a conversation needs a non-empty \"messages\" list");
  const ChatRendering full = chat_template.apply(request);
  std::vector<std::pair<size_t, size_t>> spans = full.generation_spans;
  if (spans.empty()) {
    for (size_t i = 0; i < request.messages.size(); ++i) {
      const auto& m = request.messages[i];
      if (!m.is_object() || m.value("role", "") != "assistant") continue;
      const std::string before = chat_template.apply(prefix(request, i, true)).text;
      const std::string through = chat_template.apply(prefix(request, i + 1, false)).text;
      BRIGADE_CHECK(through.starts_with(before) && full.text.starts_with(through), chat_template.name(),
                    ": message ", i, " (assistant) cannot be located: the template renders the conversation before "
                    "it differently once it follows (it rewrites earlier turns); mark the assistant turns with "
                    "{% generation %} ... {% endgeneration %} to train on it");
      spans.emplace_back(before.size(), through.size());
    }
  }
  std::vector<ChatSegment> out;
  size_t at = 0;
  for (const auto& [begin, end] : spans) {
    BRIGADE_ASSERT(begin >= at && end >= begin && end <= full.text.size(), "assistant spans out of order");
    if (begin > at) out.push_back({full.text.substr(at, begin - at), false});
    if (end > begin) out.push_back({full.text.substr(begin, end - begin), true});
    at = end;
  }
  if (at < full.text.size()) out.push_back({full.text.substr(at), false});
  return out;
}

ChatTokens tokenize_chat(const Tokenizer& tokenizer, const std::vector<ChatSegment>& segments) {
  ChatTokens out;
  for (const ChatSegment& s : segments) {
    const std::vector<int64_t> ids = tokenizer.encode(s.text, /*allow_special=*/true);
    out.tokens.insert(out.tokens.end(), ids.begin(), ids.end());
    out.mask.insert(out.mask.end(), ids.size(), s.trained ? 1 : 0);
  }
  const size_t before = out.tokens.size();
  out.tokens = frame(tokenizer, std::move(out.tokens));
  if (out.tokens.size() > before) out.mask.insert(out.mask.begin(), 0);
  return out;
}

std::vector<int64_t> chat_prompt_tokens(const Tokenizer& tokenizer, const ChatTemplate& chat_template,
                                        const ChatRequest& request) {
  ChatRequest r = request;
  r.add_generation_prompt = true;
  return frame(tokenizer, tokenizer.encode(chat_template.apply(r).text, /*allow_special=*/true));
}

nlohmann::ordered_json template_variables(const Tokenizer& tokenizer) {
  nlohmann::ordered_json v = nlohmann::ordered_json::object();
  for (const auto& [role, key] : {std::pair{kBosToken, "bos_token"}, {kEosToken, "eos_token"}, {kPadToken, "pad_token"}}) {
    if (const auto id = tokenizer.special_id(role)) v[key] = tokenizer.decode(std::vector<int64_t>{*id});
  }
  return v;
}

ChatRequest chat_request(const nlohmann::ordered_json& conversation, const Tokenizer& tokenizer, const std::string& where) {
  BRIGADE_CHECK(conversation.is_object(), where, ": a conversation is a JSON object with \"messages\"");
  auto messages = conversation.find("messages");
  BRIGADE_CHECK(messages != conversation.end() && messages->is_array() && !messages->empty(), where,
                ": \"messages\" must be a non-empty list");
  ChatRequest request;
  request.variables = template_variables(tokenizer);
  for (size_t i = 0; i < messages->size(); ++i) {
    const auto& m = (*messages)[i];
    BRIGADE_CHECK(m.is_object() && m.contains("role") && m["role"].is_string(), where, ": message ", i,
                  " needs a string \"role\"");
    request.messages.push_back(m);
  }
  for (const auto& [key, value] : conversation.items()) {
    if (key == "messages") continue;
    if (key == "tools") request.tools = value;
    else if (key == "documents") request.documents = value;
    else request.variables[key] = value;
  }
  return request;
}

}  // namespace brigade::data
