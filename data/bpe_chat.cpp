// Chat templates: brigade's C++ rendering and the equivalent Jinja for
// tokenizer_config.json. The two must agree (tests/data/bpe_test.cpp renders the
// Jinja with transformers).
#include <utility>

#include "core/error.h"
#include "data/bpe.h"

namespace brigade::data {

namespace {
struct ChatFormat {
  const char* family;
  const char* begin;        // once, before the first message
  const char* turn_start;   // then role
  const char* role_end;     // then content
  const char* turn_end;
  const char* jinja;
};

// Jinja string literals: '\n' is an escape inside them, so the C++ strings below
// hold a backslash and an n.
const ChatFormat kFormats[] = {
    {"chatml", "", "<|im_start|>", "\n", "<|im_end|>\n",
     "{% for message in messages %}"
     "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
     "{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"},
    {"llama3", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>",
     "{{ '<|begin_of_text|>' }}"
     "{% for message in messages %}"
     "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
     "{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"},
};

const ChatFormat& format(const std::string& family) {
  for (const ChatFormat& f : kFormats)
    if (family == f.family) return f;
  BRIGADE_FAIL("unknown chat template family '", family, "' (known: chatml, llama3)");
}
}  // namespace

std::string apply_chat_template(const std::string& family, std::span<const ChatMessage> messages,
                                bool add_generation_prompt) {
  const ChatFormat& f = format(family);
  std::string text = f.begin;
  for (const ChatMessage& m : messages) text += f.turn_start + m.role + f.role_end + m.content + f.turn_end;
  if (add_generation_prompt) text += std::string(f.turn_start) + "assistant" + f.role_end;
  return text;
}

std::string chat_template_jinja(const std::string& family) { return format(family).jinja; }

}  // namespace brigade::data
