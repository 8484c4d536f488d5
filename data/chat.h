// Conversations in a model's own chat format: rendered with the Jinja template it
// ships (data/jinja.h), tokenized, and cut into the context a loss mask hides and the
// assistant turns it trains.
//
// Where the assistant turns are: the template's {% generation %} blocks when it has
// them (transformers' assistant mask); otherwise, for each assistant message i, the
// text between the conversation up to i-1 rendered with add_generation_prompt and
// the conversation up to i rendered without it: the message and its end-of-turn
// marker. A template that renders earlier turns differently once later ones follow
// (Qwen3 drops the reasoning of earlier turns) cannot be cut that way; that is an
// Error naming the message, suggesting {% generation %} blocks.
//
// Framing (one rule for data prepare, serve and distillation): the rendered text is
// encoded with special tokens parsed (templates write them as text), and a tokenizer
// whose convention starts sequences with BOS gets one in front unless the template
// already rendered it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/jinja.h"
#include "data/tokenizer.h"

namespace brigade::data {

struct ChatSegment {
  std::string text;
  bool trained = false;  // an assistant turn
};

// The conversation cut into context and assistant segments (their texts joined
// are the full rendering).
std::vector<ChatSegment> chat_segments(const ChatTemplate& chat_template, const ChatRequest& request);

struct ChatTokens {
  std::vector<int64_t> tokens;
  std::vector<uint8_t> mask;  // 1: an assistant token (trained)
};
// Segments encoded one by one (special tokens parsed) and framed as above.
ChatTokens tokenize_chat(const Tokenizer& tokenizer, const std::vector<ChatSegment>& segments);

// A prompt for generation: the messages rendered with add_generation_prompt, framed.
std::vector<int64_t> chat_prompt_tokens(const Tokenizer& tokenizer, const ChatTemplate& chat_template,
                                        const ChatRequest& request);

// The variables transformers passes every template: bos_token, eos_token (and
// pad_token) as the tokenizer's texts for those roles.
nlohmann::ordered_json template_variables(const Tokenizer& tokenizer);

// A ChatRequest from a JSON object (key order kept: it shows in tojson) {"messages": [...], "tools": [...]?, plus extra
// template keywords such as "enable_thinking"}; `where` names it in errors.
ChatRequest chat_request(const nlohmann::ordered_json& conversation, const Tokenizer& tokenizer, const std::string& where);

}  // namespace brigade::data
