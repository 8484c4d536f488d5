// Chat templates as models ship them (tokenizer_config.json `chat_template`, GGUF
// `tokenizer.chat_template`): a Jinja2 interpreter for the subset those templates use,
// rendering byte for byte what transformers' apply_chat_template(..., tokenize=False)
// renders (tests/data/jinja_test.cpp checks it against transformers on the templates in
// tests/data/chat_templates/).
//
// The environment is transformers': trim_blocks, lstrip_blocks, one trailing newline of
// the source dropped, the loopcontrols extension (break/continue), `{% generation %}`
// blocks (AssistantTracker: their byte spans are reported), and the globals
// raise_exception(msg), strftime_now(fmt), namespace(...), dict(...), range(...), plus
// transformers' tojson filter (json.dumps with ensure_ascii=False; indent, separators,
// sort_keys). Values print as Python prints them (True, None, 1.0, {'a': [1, 'b']}).
//
// Supported:
//   statements  if/elif/else, for (`if` filter, tuple unpacking, else, loop.index/index0/
//               revindex/revindex0/first/last/length/previtem/nextitem/cycle), set (name,
//               tuple, namespace attribute, block form), macro (defaults, keywords),
//               break, continue, generation, raw, comments, whitespace control - and +.
//   expressions literals (string, int, float, list, tuple, dict with string keys,
//               true/false/none), + - * / // % ** ~, comparisons, in / not in,
//               and/or/not, `a if c else b`, subscripts and slices, attributes, calls
//               with keywords, filters, tests.
//   filters     abs attr capitalize count default/d escape/e first float indent int items
//               join last length list lower map max min reject rejectattr replace reverse
//               round safe select selectattr sort string sum title tojson trim unique
//               upper wordcount.
//   tests       defined undefined none boolean true false integer float number string
//               mapping iterable sequence callable sameas equalto/eq/== ne/!= lt/< le/<=
//               gt/> ge/>= in odd even divisibleby lower upper escaped.
//   methods     str: startswith endswith split rsplit strip lstrip rstrip replace upper
//               lower title capitalize find rfind index rindex count join splitlines
//               format ({} {0} {name}, no format specs) isdigit isalpha isalnum isspace
//               islower isupper; dict: items keys values get; list: index count.
// Undefined values behave as Jinja's default Undefined: they print as "", are false
// and iterate as empty; an attribute, item, call or arithmetic on one is an Error.
// Anything else (include/extends/import/call/filter/with blocks, other filters, dict
// keys other than strings, *args/**kwargs, printf-style `%` on strings, Markup
// escaping after `safe`) is an Error naming the template, the line and the construct.
// Strings are UTF-8; length, indexing and slicing count code points as Python does.
// upper/lower/title/capitalize map ASCII, Latin-1, Latin Extended-A, Greek and
// Cyrillic letters only (no ß -> SS).
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace brigade::data {

namespace jinja {
struct Node;
}  // namespace jinja

// What a rendering produced: the text, and the byte ranges [begin, end) of the text
// that `{% generation %}` blocks rendered (the assistant turns a loss mask keeps).
struct ChatRendering {
  std::string text;
  std::vector<std::pair<size_t, size_t>> generation_spans;
};

// The inputs of transformers' apply_chat_template besides the template.
struct ChatRequest {
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();  // [{role, content, ...}]
  nlohmann::ordered_json tools = nullptr;                             // list of JSON schemas, or null
  nlohmann::ordered_json documents = nullptr;
  bool add_generation_prompt = false;
  // Further template variables: bos_token, eos_token, enable_thinking, ...
  nlohmann::ordered_json variables = nlohmann::ordered_json::object();
};

// Parses once (a syntax error names the template, line and column); renders many times.
// Copies share the parsed template, which is immutable: render() may run on several
// threads at once.
class ChatTemplate {
 public:
  explicit ChatTemplate(const std::string& source, std::string name = "chat template");

  // Renders with `context` (a JSON object) as the template's variables, as given.
  // nlohmann::ordered_json because key order shows in tojson and in printed dicts.
  std::string render(const nlohmann::ordered_json& context) const;
  ChatRendering render_tracked(const nlohmann::ordered_json& context) const;

  // What apply_chat_template(..., tokenize=False) renders: message keys holding null are
  // dropped, reasoning given as `thinking` / `reasoning` / `reasoning_content` is copied
  // under the other names the way transformers does, and `messages`, `tools`,
  // `documents`, `add_generation_prompt` are set beside `variables`.
  ChatRendering apply(const ChatRequest& request) const;

  const std::string& name() const { return name_; }

 private:
  std::string name_;
  std::shared_ptr<const jinja::Node> root_;
};

}  // namespace brigade::data
