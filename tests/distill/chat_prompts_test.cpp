// Chat prompts in distillation ({"messages": [...]} lines): parsed with their key
// order, rendered with the model's chat template for a local teacher, sent as is to a
// chat API, and built into SFT documents that train only the assistant's turn.
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "data/bpe.h"
#include "data/chat.h"
#include "data/shard.h"
#include "distill/build.h"
#include "distill/generate.h"
#include "distill/prompts.h"
#include "distill/remote.h"
#include "tests/testing.h"

namespace brigade::distill {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

const char* kChatMl =
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

data::BpeTokenizer chat_tokenizer(const TempDir& dir) {
  std::vector<std::string> corpus;
  for (int i = 0; i < 20; ++i) corpus.push_back("user assistant what is 3 - 9 ? think answer " + std::to_string(i));
  data::train_bpe(corpus, 320, {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}).save(dir / "tok", kChatMl);
  return data::BpeTokenizer::load(dir / "tok" / "tokenizer.json");
}

TEST(DistillChatPrompts, ParsedRenderedSentAndBuilt) {
  TempDir dir;
  std::ofstream(dir / "prompts.jsonl")
      << R"({"id": 7, "messages": [{"role": "user", "content": "what is 3 - 9 ?", "name": "x"}], "enable_thinking": false, "answer": "-6"})"
      << "\n"
      << R"({"id": 8, "messages": [{"content": "no role"}]})" << "\n"
      << R"({"id": 9, "prompt": "plain"})" << "\n";
  const PromptSet set = read_prompts(dir / "prompts.jsonl");
  ASSERT_EQ(set.prompts.size(), 2u);
  ASSERT_EQ(set.skipped.size(), 1u);
  EXPECT_NE(set.skipped[0].second.find("\"messages\" is not a non-empty list"), std::string::npos);
  const Prompt& chat = set.prompts[0];
  EXPECT_TRUE(chat.chat());
  EXPECT_FALSE(set.prompts[1].chat());
  EXPECT_EQ(chat.prompt, "what is 3 - 9 ?");
  EXPECT_EQ(chat.answer, "-6");
  // The conversation keeps the line's key order, without id and answer.
  EXPECT_EQ(chat.conversation,
            R"({"messages":[{"role":"user","content":"what is 3 - 9 ?","name":"x"}],"enable_thinking":false})");
  write_prompts(dir / "again.jsonl", set.prompts);
  EXPECT_EQ(read_prompts(dir / "again.jsonl").prompts[0].conversation, chat.conversation);

  // A chat API gets the messages (and keywords); a completions API refuses a chat prompt.
  TeacherOptions teacher;
  teacher.api = "chat";
  const auto body = remote_request(teacher, GenerateOptions{}, chat, 1);
  EXPECT_EQ(body["messages"][0]["content"], "what is 3 - 9 ?");
  EXPECT_EQ(body["enable_thinking"], false);
  teacher.api = "completions";
  EXPECT_BRIGADE_ERROR(remote_request(teacher, GenerateOptions{}, chat, 1), "needs distill.teacher.api: chat");

  // A local teacher renders it with the tokenizer's template, the assistant's turn opened.
  const data::BpeTokenizer tokenizer = chat_tokenizer(dir);
  EXPECT_EQ(tokenizer.decode(prompt_tokens(tokenizer, chat)),
            "<|im_start|>user\nwhat is 3 - 9 ?<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_BRIGADE_ERROR(prompt_tokens(data::ByteTokenizer(), chat), "ships no chat template");

  // build: the answer as the assistant's turn, trained alone; an untrained EOS closes it.
  {
    std::ofstream out(dir / "accepted.jsonl");
    nlohmann::json line = {{"prompt_id", "7"}, {"sample", 0}, {"prompt", chat.prompt},
                           {"completion", "<think>3 - 9</think> -6"}, {"answer", "-6"},
                           {"conversation", chat.conversation}};
    out << line.dump() << "\n";
    line = {{"prompt_id", "9"}, {"sample", 0}, {"prompt", "plain"}, {"completion", " text"}, {"answer", "x"}};
    out << line.dump() << "\n";
  }
  const auto stats = build_sft_shard(dir / "accepted.jsonl", tokenizer, 64, dir / "build");
  EXPECT_EQ(stats["template"], "mixed");
  EXPECT_EQ(stats["chat_documents"], 1);
  const data::Shard shard(dir / "build" / kSftShard);
  std::vector<int64_t> tokens(static_cast<size_t>(shard.size()));
  std::vector<uint8_t> mask(tokens.size());
  shard.read(0, shard.size(), tokens.data(), mask.data());
  std::vector<int64_t> trained;
  for (size_t i = 0; i < tokens.size(); ++i)
    if (mask[i]) trained.push_back(tokens[i]);
  EXPECT_EQ(tokenizer.decode(trained), "<think>3 - 9</think> -6<|im_end|>\n text<|endoftext|>");
  EXPECT_EQ(tokens[0], *tokenizer.special_id("<|im_start|>")) << "no BOS for this vocabulary: the template starts it";
}

}  // namespace
}  // namespace brigade::distill
