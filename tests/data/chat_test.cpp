// Conversations in a model's chat format (data/chat.h): the assistant turns a loss
// mask keeps, from the template's {% generation %} blocks or from incremental
// renderings; framing by the BOS convention; data prepare --chat end to end.
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "data/bpe.h"
#include "data/chat.h"
#include "data/prepare.h"
#include "data/shard.h"
#include "tests/testing.h"

namespace brigade::data {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

std::string template_file(const std::string& name) {
  return read_file(fs::path(BRIGADE_SOURCE_DIR) / "tests/data/chat_templates" / name);
}

BpeTokenizer qwen_style() {
  std::vector<std::string> corpus;
  for (int i = 0; i < 20; ++i) corpus.push_back("system user assistant hello there, how are you? fine " + std::to_string(i));
  return train_bpe(corpus, 320, {"<|endoftext|>", "<|im_start|>", "<|im_end|>"});
}

ChatRequest conversation(const Tokenizer& tokenizer) {
  return chat_request(nlohmann::ordered_json::parse(R"({"messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "hello"},
      {"role": "assistant", "content": "hi there"},
      {"role": "user", "content": "how are you?"},
      {"role": "assistant", "content": "fine"}]})"),
                      tokenizer, "test");
}

std::string joined(const std::vector<ChatSegment>& segments, bool trained) {
  std::string out;
  for (const auto& s : segments)
    if (s.trained == trained) out += s.text + "|";
  return out;
}

TEST(ChatData, AssistantTurnsFromIncrementalRenderings) {
  const BpeTokenizer tokenizer = qwen_style();
  const ChatTemplate qwen(template_file("Qwen-Qwen2.5-7B-Instruct.jinja"), "qwen2.5");
  const ChatRequest request = conversation(tokenizer);
  const auto segments = chat_segments(qwen, request);
  std::string all;
  for (const auto& s : segments) all += s.text;
  EXPECT_EQ(all, qwen.apply(request).text) << "the segments are the whole rendering";
  EXPECT_EQ(joined(segments, true), "hi there<|im_end|>\n|fine<|im_end|>\n|");

  // Tokens: no BOS for a Qwen-style vocabulary; the mask covers exactly the assistant turns.
  const ChatTokens t = tokenize_chat(tokenizer, segments);
  ASSERT_EQ(t.tokens.size(), t.mask.size());
  EXPECT_EQ(t.tokens.front(), *tokenizer.special_id("<|im_start|>"));
  std::vector<int64_t> trained;
  for (size_t i = 0; i < t.tokens.size(); ++i)
    if (t.mask[i]) trained.push_back(t.tokens[i]);
  EXPECT_EQ(tokenizer.decode(trained), "hi there<|im_end|>\nfine<|im_end|>\n");
  EXPECT_EQ(std::count(t.tokens.begin(), t.tokens.end(), *tokenizer.special_id("<|im_end|>")), 5)
      << "special tokens in the rendering are parsed";

  // A tokenizer with a BOS convention gets one in front, unless the template wrote it.
  const ByteTokenizer bytes;
  const ChatTokens framed = tokenize_chat(bytes, chat_segments(qwen, conversation(bytes)));
  EXPECT_EQ(framed.tokens.front(), bytes.bos_id());
  EXPECT_EQ(framed.mask.front(), 0);
  const ChatTemplate with_bos("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}", "bos");
  const ChatTokens once = tokenize_chat(bytes, chat_segments(with_bos, conversation(bytes)));
  EXPECT_EQ(std::count(once.tokens.begin(), once.tokens.end(), bytes.bos_id()), 1);
}

TEST(ChatData, GenerationBlocksAndTemplatesThatRewriteEarlierTurns) {
  const ByteTokenizer bytes;
  const ChatTemplate tracked(
      "{% for m in messages %}{% if m.role == 'assistant' %}A:{% generation %}{{ m.content }};{% endgeneration %}"
      "{% else %}U:{{ m.content }};{% endif %}{% endfor %}",
      "tracked");
  EXPECT_EQ(joined(chat_segments(tracked, conversation(bytes)), true), "hi there;|fine;|");
  // Only the last turn's reasoning is rendered: the earlier turn changes once a later one follows.
  const ChatTemplate rewriting(
      "{% for m in messages %}{{ m.role }}:{{ m.content }}{% if m.role == 'assistant' and loop.last %}"
      "[{{ m.reasoning }}]{% endif %};{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
      "rewriting");
  auto request = conversation(bytes);
  request.messages[2]["reasoning"] = "r1";
  request.messages[4]["reasoning"] = "r2";
  EXPECT_BRIGADE_ERROR(chat_segments(rewriting, request), "message 2 (assistant) cannot be located");
}

TEST(ChatData, PrepareTrainsTheAssistantTurnsOfConversations) {
  TempDir dir;
  const BpeTokenizer tokenizer = qwen_style();
  {
    std::ofstream out(dir / "chat.jsonl");
    out << R"({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"}]})" << "\n";
    out << R"({"text": "plain text line"})" << "\n";
    out << R"({"messages": [{"content": "no role"}]})" << "\n";
  }
  PrepareOptions o;
  o.inputs = {dir / "chat.jsonl"};
  o.output_dir = dir / "out";
  o.chat = true;
  EXPECT_BRIGADE_ERROR(prepare_shards(o, tokenizer), "ships no chat template; give one with --chat-template");
  o.chat_template = template_file("Qwen-Qwen2.5-7B-Instruct.jinja");
  EXPECT_BRIGADE_ERROR(prepare_shards(o, tokenizer), "chat.jsonl:3: message 0 needs a string \"role\"");
  {
    std::ofstream out(dir / "chat.jsonl");
    out << R"({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"}]})" << "\n";
    out << R"({"text": "plain text line"})" << "\n";
  }
  fs::remove_all(dir / "out");
  const auto report = prepare_shards(o, tokenizer);
  ASSERT_EQ(report.documents, 2);
  const Shard shard(report.shards.at(0));
  ASSERT_TRUE(shard.has_mask());
  std::vector<int64_t> tokens(static_cast<size_t>(shard.size()));
  std::vector<uint8_t> mask(tokens.size());
  shard.read(0, shard.size(), tokens.data(), mask.data());
  std::vector<int64_t> trained;
  for (size_t i = 0; i < tokens.size(); ++i)
    if (mask[i]) trained.push_back(tokens[i]);
  // The conversation's assistant turn, then the whole plain line and its EOS.
  EXPECT_EQ(tokenizer.decode(trained), "fine<|im_end|>\nplain text line<|endoftext|>");
}

}  // namespace
}  // namespace brigade::data
