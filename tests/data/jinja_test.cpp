// The Jinja2 subset of data/jinja.h: the language on small templates, errors that name
// the line, and the oracle: the chat templates of real models (tests/data/chat_templates)
// and a set of language snippets must render byte for byte what transformers'
// apply_chat_template renders (tests/data/jinja_oracle.py, one Python process).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "data/jinja.h"
#include "tests/testing.h"

namespace brigade::data {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

std::string render(const std::string& source, const ojson& context = ojson::object()) {
  return ChatTemplate(source, "t").render(context);
}

// ---------------------------------------------------------------------------------
// The language, with expectations written from Python's Jinja2.

TEST(JinjaWhitespace, TrimBlocksAndLstripBlocks) {
  EXPECT_EQ(render("{% if true %}\n  yes\n{% endif %}\nend"), "  yes\nend");
  EXPECT_EQ(render("  {% if true %}\nA\n  {% endif %}\nB"), "A\nB");
  // lstrip_blocks only strips white space that starts the line; {{ }} is never stripped.
  EXPECT_EQ(render("x  {% if true %}y{% endif %}"), "x  y");
  EXPECT_EQ(render("  {{ 'v' }}\n"), "  v");  // and one trailing newline of the source is dropped
  EXPECT_EQ(render("{# note #}\nA"), "A");
  EXPECT_EQ(render("a\r\nb"), "a\nb");
}

TEST(JinjaWhitespace, StripMarkers) {
  EXPECT_EQ(render("a \n {{- 'b' -}} \n c"), "abc");
  EXPECT_EQ(render("a\n  {%- if true -%}\n  b\n{%- endif %}"), "ab");
  EXPECT_EQ(render("  {%+ if true %}x{% endif %}"), "  x");
  EXPECT_EQ(render("{% if true +%}\nx{% endif %}"), "\nx");
  EXPECT_EQ(render("a {#- c -#} b"), "ab");
  EXPECT_EQ(render("{% raw %}{{ x }}{% endraw %}"), "{{ x }}");
}

TEST(JinjaLoops, LoopVariables) {
  EXPECT_EQ(render("{% for x in 'abc' %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ x }}"
                   "{% if loop.first %}F{% endif %}{% if loop.last %}L{% endif %};{% endfor %}"),
            "103aF;212b;321cL;");
  EXPECT_EQ(render("{% for x in [1, 2, 3] %}{{ loop.previtem }}-{{ loop.nextitem }}|{{ loop.length }} {% endfor %}"),
            "-2|3 1-3|3 2-|3 ");
  EXPECT_EQ(render("{% for x in range(10) if x is odd %}{{ x }}{% endfor %}"), "13579");
  EXPECT_EQ(render("{% for x in [] %}x{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(render("{% for x in range(9) %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}"
                   "{% endif %}{{ x }}{% endfor %}"),
            "013");
  EXPECT_EQ(render("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}", {{"d", {{"b", 1}, {"a", 2}}}}),
            "b=1;a=2;");
  EXPECT_EQ(render("{% for a, b in [[1, 2], (3, 4)] %}{{ a + b }}{% endfor %}"), "37");
  // A for's else block runs outside that loop: break there leaves the enclosing loop.
  EXPECT_EQ(render("{% for i in [1, 2] %}{{ i }}{% for j in [] %}{% else %}{% break %}{% endfor %}{% endfor %}"),
            "1");
}

TEST(JinjaScoping, LoopSetsStayInsideNamespacesDoNot) {
  EXPECT_EQ(render("{% set x = 1 %}{% for i in [1] %}{% set x = 2 %}{{ x }}{% endfor %}{{ x }}"), "21");
  EXPECT_EQ(render("{% set ns = namespace(x=1) %}{% for i in [1, 2] %}{% set ns.x = ns.x + i %}{% endfor %}"
                   "{{ ns.x }}"),
            "4");
  EXPECT_EQ(render("{% if true %}{% set y = 'if' %}{% endif %}{{ y }}"), "if");
  EXPECT_EQ(render("{% set a, b = 1, 'two' %}{{ b }}{{ a }}"), "two1");
  EXPECT_EQ(render("{% set block %}a{{ 1 + 1 }}{% endset %}[{{ block }}]"), "[a2]");
}

TEST(JinjaMacros, DefaultsAndKeywords) {
  const std::string m = "{% macro tag(name, body='-', close=true) %}<{{ name }}>{{ body }}"
                        "{% if close %}</{{ name }}>{% endif %}{% endmacro %}";
  EXPECT_EQ(render(m + "{{ tag('a') }}{{ tag('b', 'x', close=false) }}{{ tag(body=1, name='c') }}"),
            "<a>-</a><b>x<c>1</c>");
}

TEST(JinjaValues, PrintLikePython) {
  EXPECT_EQ(
      render("{{ none }} {{ true }} {{ 1 / 2 }} {{ 4 / 2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 2 ** 10 }}"),
      "None True 0.5 2.0 3 -4 2 1024");
  EXPECT_EQ(render("{{ [1, 'a', none, 1.5, {'k': [true]}] }} {{ (1,) }}"), "[1, 'a', None, 1.5, {'k': [True]}] (1,)");
  EXPECT_EQ(render("{{ x }}", {{"x", {1e16, 1e-5, 0.1, 100.0, 123456789.125}}}),
            "[1e+16, 1e-05, 0.1, 100.0, 123456789.125]");
  EXPECT_EQ(render("{{ [\"it's\", 'a\\nb', '\\\\'] }}"), "[\"it's\", 'a\\nb', '\\\\']");
  EXPECT_EQ(render("{{ 'a' ~ 1 ~ none }} {{ 'ab' * 2 }} {{ [1] + [2] }}"), "a1None abab [1, 2]");
  EXPECT_EQ(render("{{ missing }}|{{ missing is defined }}|{{ d.nope is defined }}|{{ d['nope'] is none }}",
                   {{"d", ojson::object()}}),
            "|False|False|False");
}

TEST(JinjaValues, OperatorsAndTests) {
  EXPECT_EQ(render("{{ 1 < 2 < 3 }} {{ 'b' in 'abc' }} {{ 3 not in [1, 2] }} {{ 'k' in {'k': 1} }}"),
            "True True True True");
  EXPECT_EQ(render("{{ 0 or 'x' }} {{ 1 and [] }} {{ not none }} {{ 'y' if 0 else 'n' }}"), "x [] True n");
  EXPECT_EQ(render("{{ 'abc'[::-1] }} {{ [1, 2, 3][1:] }} {{ 'héllo'[1:3] }} {{ [1, 2, 3][-1] }}"),
            "cba [2, 3] él 3");
  EXPECT_EQ(render("{{ 'x' is string }}{{ 1 is number }}{{ {} is mapping }}{{ 'x' is iterable }}{{ 1 is iterable }}"
                   "{{ none is none }}{{ true is true }}{{ 1 is true }}{{ 6 is divisibleby 3 }}{{ 2 is even }}"),
            "TrueTrueTrueTrueFalseTrueTrueFalseTrueTrue");
}

TEST(JinjaFilters, Strings) {
  EXPECT_EQ(render("[{{ '  a b \\n' | trim }}] {{ 'abc' | upper }} {{ 'ABC' | lower }} {{ 'hello world' | title }}"
                   " {{ 'hELLO' | capitalize }} {{ 'aXbX' | replace('X', '-') }} {{ 'héllo' | length }}"),
            "[a b] ABC abc Hello World Hello a-b- 5");
  EXPECT_EQ(render("{{ 'a,b,,c'.split(',') }} {{ ' a  b '.split() }} {{ 'a-b-c'.rsplit('-', 1) }}"
                   " {{ 'xxaxx'.strip('x') }} {{ 'abc'.startswith('ab') }} {{ 'abc'.endswith(('x', 'c')) }}"
                   " {{ 'abc'.find('c') }} {{ '{} is {name}'.format(1, name='one') }}"),
            "['a', 'b', '', 'c'] ['a', 'b'] ['a-b', 'c'] a True True 2 1 is one");
  EXPECT_EQ(render("{{ 'a\\nb' | indent(2) }}|{{ 'a\\n\\nb' | indent(2, first=true) }}"), "a\n  b|  a\n\n  b");
  EXPECT_EQ(render("{{ '<a href=\"x\">' | e }} {{ 'one two  three' | wordcount }}"),
            "&lt;a href=&#34;x&#34;&gt; 3");
}

TEST(JinjaFilters, Sequences) {
  const ojson ctx = {{"users", {{{"name", "b"}, {"age", 3}}, {{"name", "A"}, {"age", 1}}, {{"name", "c"}}}}};
  EXPECT_EQ(render("{{ users | map(attribute='name') | join(', ') }}", ctx), "b, A, c");
  EXPECT_EQ(render("{{ users | selectattr('age', 'defined') | map(attribute='name') | list }}", ctx), "['b', 'A']");
  EXPECT_EQ(render("{{ users | rejectattr('name', 'equalto', 'b') | length }}", ctx), "2");
  EXPECT_EQ(render("{{ users | sort(attribute='name') | map(attribute='name') | join }}", ctx), "Abc");
  EXPECT_EQ(render("{{ [3, 1, 2] | sort(reverse=true) }} {{ ['a', 'A', 'b'] | unique | list }} {{ [1, 2] | first }}"
                   " {{ [1, 2] | last }} {{ [1, 2] | reverse | list }} {{ [1, 2, 3] | sum }} {{ [2, 1] | min }}"),
            "[3, 2, 1] ['a', 'b'] 1 2 [2, 1] 6 1");
  EXPECT_EQ(
      render("{{ none | default('d') }} {{ missing | default('d') }} {{ '' | d('e', true) }} {{ '3' | int + 1 }}"
             " {{ '2.5' | float }} {{ 2.5 | round }} {{ -3 | abs }} {{ 'ab' | list }} {{ {'a': 1} | items | list }}"),
      "None d e 4 2.5 2.0 3 ['a', 'b'] [('a', 1)]");
}

TEST(JinjaFilters, ToJsonLikeTransformers) {
  const ojson ctx = ojson::parse(R"({"v": {"b": [1, 2.5, null, true], "a": "é\"\n", "e": []}})");
  EXPECT_EQ(render("{{ v | tojson }}", ctx), "{\"b\": [1, 2.5, null, true], \"a\": \"é\\\"\\n\", \"e\": []}");
  EXPECT_EQ(render("{{ v | tojson(indent=2, sort_keys=true) }}", ctx),
            "{\n  \"a\": \"é\\\"\\n\",\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"e\": []\n}");
  EXPECT_EQ(render("{{ v.a | tojson(ensure_ascii=true) }} {{ v.b | tojson(separators=(',', ':')) }}", ctx),
            "\"\\u00e9\\\"\\n\" [1,2.5,null,true]");
}

TEST(JinjaGeneration, SpansCoverTheBlocks) {
  ChatTemplate t("a{% generation %}bc{% endgeneration %}d{% generation %}é{% endgeneration %}");
  const ChatRendering r = t.render_tracked(ojson::object());
  EXPECT_EQ(r.text, "abcdé");
  ASSERT_EQ(r.generation_spans.size(), 2u);
  EXPECT_EQ(r.generation_spans[0], std::make_pair(size_t{1}, size_t{3}));
  EXPECT_EQ(r.generation_spans[1], std::make_pair(size_t{4}, size_t{6}));
}

TEST(JinjaErrors, NameTheLine) {
  EXPECT_BRIGADE_ERROR(render("{% if x %}\n{{ y | xmlattr }}\n{% endif %}", {{"x", true}}),
                       "t line 2: filter 'xmlattr' is not supported");
  EXPECT_BRIGADE_ERROR(render("line1\n{% include 'other.jinja' %}"),
                       "t line 2, column 4: tag 'include' is not supported");
  EXPECT_BRIGADE_ERROR(render("{% for x in %}{% endfor %}"), "t line 1, column 13: expected an expression");
  EXPECT_BRIGADE_ERROR(render("{% for x in y %}\nno end"), "expected 'endfor'");
  EXPECT_BRIGADE_ERROR(render("{{ 'a' ~ }}"), "t line 1");
  EXPECT_BRIGADE_ERROR(render("a\nb\n{{ raise_exception('roles must alternate') }}"), "t line 3: roles must alternate");
  EXPECT_BRIGADE_ERROR(render("{{ x is frobnicated }}"), "test 'frobnicated' is not supported");
  EXPECT_BRIGADE_ERROR(render("\n{{ missing.attr }}"), "t line 2: 'missing' is undefined");
  EXPECT_BRIGADE_ERROR(render("{{ 'a' + 1 }}"), "unsupported operand");
  EXPECT_BRIGADE_ERROR(render("{% break %}"), "'break' outside of a loop");
  EXPECT_BRIGADE_ERROR(render("{% if x %}{% endfor %}"), "t line 1, column 14: unexpected 'endfor'");
  EXPECT_BRIGADE_ERROR(render("{% set x = [] %}{{ x.append(1) }}"), "unsafe");
  EXPECT_BRIGADE_ERROR(render("{{ 1 }", ojson::object()), "t line 1, column 6: unexpected '}'");
  EXPECT_BRIGADE_ERROR(render("{{ 1 "), "missing end of variable tag");
}

// ---------------------------------------------------------------------------------
// The oracle: transformers renders the same requests.

const fs::path kTemplates = fs::path(BRIGADE_SOURCE_DIR) / "tests/data/chat_templates";

const ojson kSpecialTokens = {{"bos_token", "<s>"}, {"eos_token", "</s>"}, {"unk_token", "<unk>"}};

const ojson kTools = ojson::parse(R"([
  {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
   "parameters": {"type": "object", "properties": {
     "location": {"type": "string", "description": "City name, e.g. Paris"},
     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["location"]}}},
  {"type": "function", "function": {"name": "add", "description": "Adds two numbers.",
   "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
    "required": ["a", "b"]}, "return": {"type": "number"}}}
])");

// Conversations covering what the templates branch on.
std::vector<std::pair<std::string, ojson>> conversations() {
  auto tool_call = [](const ojson& arguments) {
    const ojson call = {{"id", "call12345"},
                        {"type", "function"},
                        {"function", {{"name", "get_weather"}, {"arguments", arguments}}}};
    return ojson{{"role", "assistant"}, {"content", nullptr}, {"tool_calls", ojson::array({call})}};
  };
  const ojson args_object = {{"location", "Paris"}, {"unit", "celsius"}};
  const ojson tool_result = {{"role", "tool"}, {"tool_call_id", "call12345"}, {"content", "22 degrees, sunny"}};
  std::vector<std::pair<std::string, ojson>> out = {
      {"single_user", ojson::parse(R"([{"role": "user", "content": "Hello!"}])")},
      {"system_multi_turn", ojson::parse(R"([
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"}])")},
      {"multi_turn_ends_assistant", ojson::parse(R"([
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "No."}])")},
      {"unicode_and_whitespace", ojson::parse(R"([
        {"role": "system", "content": "  Réponds en français. 日本語 🙂 \"quotes\" 'single' \\ back\n"},
        {"role": "user", "content": "\n  Ça va?\t\n"}])")},
      {"reasoning_in_content", ojson::parse(R"([
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\nIt is 4."},
        {"role": "user", "content": "Sure?"}])")},
      {"reasoning_field", ojson::parse(R"([
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4.", "reasoning_content": "Two and two make four."}])")},
      {"roles_do_not_alternate", ojson::parse(R"([
        {"role": "user", "content": "one"}, {"role": "user", "content": "two"}])")},
      {"two_system_messages", ojson::parse(R"([
        {"role": "system", "content": "First."}, {"role": "system", "content": "Second."},
        {"role": "user", "content": "Hi"}])")},
  };
  ojson with_object_args = ojson::parse(R"([{"role": "system", "content": "Use tools."},
                                            {"role": "user", "content": "Weather in Paris?"}])");
  with_object_args.push_back(tool_call(args_object));
  with_object_args.push_back(tool_result);
  with_object_args.push_back({{"role", "assistant"}, {"content", "It is 22 degrees and sunny."}});
  out.emplace_back("tool_call_object_arguments", with_object_args);
  ojson with_string_args = ojson::parse(R"([{"role": "user", "content": "Weather in Paris?"}])");
  with_string_args.push_back(tool_call(args_object.dump()));
  with_string_args.push_back(tool_result);
  out.emplace_back("tool_call_string_arguments", with_string_args);
  // transformers drops null-valued keys, so content: null above leaves `message.content`
  // undefined, which most templates reject; empty content is what they expect.
  for (auto [name, messages] : {std::pair{"tool_call_object_arguments_empty_content", with_object_args},
                                std::pair{"tool_call_string_arguments_empty_content", with_string_args}}) {
    for (ojson& m : messages)
      if (m.contains("tool_calls")) m["content"] = "";
    out.emplace_back(name, messages);
  }
  return out;
}

// Extra template keywords; the templates ignore the ones they do not read.
std::vector<ojson> keyword_sets() {
  return {ojson::object(),
          {{"enable_thinking", false}},
          {{"enable_thinking", true}, {"thinking", true}},
          {{"xml_tools", kTools}, {"tools_in_user_message", false}, {"date_string", "01 Jan 2025"},
           {"builtin_tools", {"brave_search", "code_interpreter"}}}};
}

// Language snippets for the oracle, rendered with kSnippetKeywords.
const std::vector<std::string> kSnippets = {
    "{{ data }}|{{ data | string }}|{{ data | tojson }}|{{ data | tojson(indent=4) }}",
    "{{ data.floats }} {{ data.floats | tojson }} {{ data.floats | sum }} {{ 10 / 4 }} {{ 1e300 * 1e10 }}",
    "{{ data.text | trim }}|{{ data.text.strip() }}|{{ data.text.split() }}|{{ data.text | length }}|"
    "{{ data.text | upper }}|{{ data.text | title }}|{{ data.text[2:9] }}|{{ data.text[::-2] }}",
    "{{ data.text | tojson }} {{ data.text | tojson(ensure_ascii=true) }} {{ data.text | e }} {{ [data.text] }}",
    "{% for k, v in data | items if k != 'floats' %}{{ loop.index }}:{{ k }}={{ v | tojson }}\n{% endfor %}",
    "{{ data.keys() | list }} {{ data.values() | list | length }} {{ data.get('missing', 'd') }} "
    "{{ data.get('nested').deep }} {{ data | dictsort if false else 'x' }}",
    "{%- macro show(x, sep=', ') -%}\n  {%- for i in x %}{{ i }}{{ sep if not loop.last }}{% endfor -%}\n"
    "{%- endmacro %}\n  {{ show([1, 2, 3]) }}\n  {{- show('ab', sep='+') }}\n",
    "{% set ns = namespace(total=0, seen=[]) %}{% for x in data.floats %}{% set ns.total = ns.total + x %}"
    "{% set ns.seen = ns.seen + [x | round(1)] %}{% endfor %}{{ ns.total }} {{ ns.seen }}",
    "{{ data.nested | tojson(separators=(',', ':'), sort_keys=true) }} {{ 'a' if data.nested.deep is mapping else 'b' "
    "}}"
    " {{ data.nested.deep is string }} {{ data.nested.list | selectattr('v') | list }}",
    "  {% if true %}\n    kept {{- ' tight' }}\n  {%- endif %}\n{# comment #}\n   {% for x in [1] %}\n{{ x }}\n"
    "   {% endfor %}\ntail\n",
    "{{ 'Hello %s' if true }} {{ '%d items' | replace('%d', '3') }} {{ '{}-{}'.format('a', 2) }} "
    "{{ ['b', 'a', 'C'] | sort }} {{ ['b', 'a', 'C'] | sort(case_sensitive=true) }} {{ 'x,y' | list | join('|') }}",
};
const ojson kSnippetKeywords = {
    {"data",
     {{"name", "brigade"},
      {"floats", {0.1, 0.2, 1e-7, 3.0, -2.5, 123456789012345678.0}},
      {"text", "  Héllo, wörld — it's \"quoted\"\t\n"},
      {"nested", {{"deep", {{"z", 1}, {"a", {true, false, nullptr}}}}, {"list", {{{"v", 0}}, {{"v", 2}}}}}},
      {"flag", false}}}};

class JinjaOracle : public ::testing::Test {
 protected:
  struct Case {
    std::string label;
    std::string template_name;
    ChatRequest request;
    bool spans = false;
  };

  static void SetUpTestSuite() {
    templates_ = new std::map<std::string, std::string>();
    cases_ = new std::vector<Case>();
    for (const auto& entry : fs::directory_iterator(kTemplates))
      if (entry.path().extension() == ".jinja") (*templates_)[entry.path().stem().string()] = read_file(entry.path());
    for (const auto& [name, source] : *templates_)
      for (const auto& [conversation, messages] : conversations())
        for (bool generation_prompt : {false, true})
          for (const ojson& keywords : keyword_sets()) {
            const bool uses_tools = conversation.rfind("tool_call", 0) == 0;
            const std::vector<bool> tool_options =
                uses_tools ? std::vector<bool>{true}
                           : conversation == "single_user" ? std::vector<bool>{false, true} : std::vector<bool>{false};
            for (bool with_tools : tool_options) {
              Case c;
              c.label = name + " / " + conversation + (with_tools ? " +tools" : "") +
                        (generation_prompt ? " +generation_prompt" : "") + " " + keywords.dump();
              c.template_name = name;
              c.request.messages = messages;
              if (with_tools) c.request.tools = kTools;
              c.request.add_generation_prompt = generation_prompt;
              c.request.variables = kSpecialTokens;
              c.request.variables.update(keywords);
              c.spans = name.find("SmolLM3") != std::string::npos;
              cases_->push_back(std::move(c));
            }
          }
    for (size_t i = 0; i < kSnippets.size(); ++i) {
      const std::string name = "snippet" + std::to_string(i);
      (*templates_)[name] = kSnippets[i];
      Case c;
      c.label = name + ": " + kSnippets[i];
      c.template_name = name;
      c.request.messages = ojson::parse(R"([{"role": "user", "content": "x"}])");
      c.request.variables = kSpecialTokens;
      c.request.variables.update(kSnippetKeywords);
      cases_->push_back(std::move(c));
    }

    dir_ = new testing::TempDir();
    ojson request = {{"special_tokens", kSpecialTokens}, {"templates", *templates_}, {"cases", ojson::array()}};
    for (const Case& c : *cases_)
      request["cases"].push_back({{"template", c.template_name},
                                  {"messages", c.request.messages},
                                  {"tools", c.request.tools},
                                  {"add_generation_prompt", c.request.add_generation_prompt},
                                  {"kwargs", keyword_arguments(c.request.variables)},
                                  {"spans", c.spans}});
    write_file_atomic(*dir_ / "request.json", request.dump());
    auto run = testing::run_command(std::string(BRIGADE_VENV_PYTHON) + " " + BRIGADE_SOURCE_DIR +
                                    "/tests/data/jinja_oracle.py " + dir_->path().string());
    ASSERT_EQ(run.exit_code, 0) << run.output;
    expected_ = new ojson(ojson::parse(read_file(*dir_ / "response.json")));
    ASSERT_EQ(expected_->size(), cases_->size());
  }

  static void TearDownTestSuite() {
    delete expected_;
    delete dir_;
    delete cases_;
    delete templates_;
    expected_ = nullptr;
    dir_ = nullptr;
    cases_ = nullptr;
    templates_ = nullptr;
  }

  // The variables beyond the special tokens, which apply_chat_template adds itself.
  static ojson keyword_arguments(const ojson& variables) {
    ojson kwargs = ojson::object();
    for (auto it = variables.begin(); it != variables.end(); ++it)
      if (!kSpecialTokens.contains(it.key())) kwargs[it.key()] = it.value();
    return kwargs;
  }

  static std::map<std::string, std::string>* templates_;
  static std::vector<Case>* cases_;
  static testing::TempDir* dir_;
  static ojson* expected_;
};

std::map<std::string, std::string>* JinjaOracle::templates_ = nullptr;
std::vector<JinjaOracle::Case>* JinjaOracle::cases_ = nullptr;
testing::TempDir* JinjaOracle::dir_ = nullptr;
ojson* JinjaOracle::expected_ = nullptr;

TEST_F(JinjaOracle, TheExpectedTemplatesAreThere) {
  for (const char* name : {"meta-llama-Llama-3.1-8B-Instruct", "Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B",
                           "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "deepseek-ai-DeepSeek-V3.1",
                           "HuggingFaceTB-SmolLM2-1.7B-Instruct", "HuggingFaceTB-SmolLM3-3B", "google-gemma-3-it",
                           "mistralai-Mistral-Nemo-Instruct-2407"})
    EXPECT_TRUE(templates_->count(name)) << name;
}

TEST_F(JinjaOracle, RendersLikeTransformers) {
  std::map<std::string, ChatTemplate> compiled;
  for (const auto& [name, source] : *templates_) compiled.emplace(name, ChatTemplate(source, name));
  size_t identical = 0, errors_agreed = 0;
  std::map<std::string, size_t> identical_per_template;
  for (size_t i = 0; i < cases_->size(); ++i) {
    const Case& c = (*cases_)[i];
    const ojson& want = (*expected_)[i];
    SCOPED_TRACE(c.label);
    std::optional<ChatRendering> got;
    std::string error;
    try {
      got = compiled.at(c.template_name).apply(c.request);
    } catch (const Error& e) {
      error = e.what();
    }
    if (want.contains("error")) {
      EXPECT_FALSE(got) << "transformers failed with " << want["error"] << " but brigade rendered:\n" << got->text;
      // raise_exception's message comes through; other failures only need to agree that it fails.
      const std::string message = want["error"].get<std::string>();
      if (message.rfind("TemplateError: ", 0) == 0) {
        EXPECT_NE(error.find(message.substr(15)), std::string::npos) << error << "\nvs " << message;
      }
      errors_agreed += !got;
      continue;
    }
    if (!got) {
      ADD_FAILURE() << "brigade failed: " << error << "\ntransformers rendered:\n" << want["text"];
      continue;
    }
    EXPECT_EQ(got->text, want["text"].get<std::string>());
    identical += got->text == want["text"].get<std::string>();
    identical_per_template[c.template_name] += got->text == want["text"].get<std::string>();
    if (c.spans) {
      std::vector<std::pair<size_t, size_t>> spans;
      for (const auto& s : want["spans"]) spans.emplace_back(s[0].get<size_t>(), s[1].get<size_t>());
      EXPECT_EQ(got->generation_spans, spans);
    }
  }
  std::printf("[ oracle   ] %zu of %zu cases byte-identical, %zu errors agreed (%zu templates)\n", identical,
              cases_->size(), errors_agreed, templates_->size());
  // Every template renders some conversations (not only errors that happen to agree).
  for (const auto& [name, source] : *templates_) EXPECT_GT(identical_per_template[name], 0u) << name;
}

}  // namespace
}  // namespace brigade::data
