// Each model's BOS convention: a sequence starts with BOS only when the tokenizer says
// so (tokenizer_config.json add_bos_token, a TemplateProcessing post-processor, or
// brigade's own <|bos|>), and data prepare, packing and the exports follow it.
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "data/bpe.h"
#include "data/prepare.h"
#include "data/sampler.h"
#include "data/shard.h"
#include "tests/testing.h"

namespace brigade::data {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

std::vector<std::string> small_corpus() {
  std::vector<std::string> out;
  for (int i = 0; i < 30; ++i) out.push_back("hello world number " + std::to_string(i) + ", and more text.");
  return out;
}

TEST(BosConvention, TakenFromTheTokenizerFiles) {
  EXPECT_TRUE(ByteTokenizer().add_bos());
  EXPECT_EQ(sequence_start(ByteTokenizer()), std::vector<int64_t>{ByteTokenizer().bos_id()});

  const auto corpus = small_corpus();
  // brigade's own BPE (it has <|bos|>): documents have always started with it.
  const BpeTokenizer own = train_bpe(corpus, 300, {"<|bos|>", "<|eos|>", "<|pad|>"});
  EXPECT_TRUE(own.add_bos());
  // Qwen-style: <|endoftext|> plays BOS, EOS and PAD, and no BOS is added.
  const BpeTokenizer qwen = train_bpe(corpus, 300, {"<|endoftext|>", "<|im_start|>", "<|im_end|>"});
  EXPECT_FALSE(qwen.add_bos());
  EXPECT_TRUE(sequence_start(qwen).empty());

  TempDir dir;
  qwen.save(dir / "qwen", "{{ messages[0]['content'] }}");
  auto config = nlohmann::json::parse(read_file(dir / "qwen" / "tokenizer_config.json"));
  EXPECT_EQ(config["add_bos_token"], false);
  const BpeTokenizer reloaded = BpeTokenizer::load(dir / "qwen" / "tokenizer.json");
  EXPECT_FALSE(reloaded.add_bos());
  EXPECT_EQ(reloaded.chat_template(), "{{ messages[0]['content'] }}");

  // add_bos_token in the config wins; else a post-processor that starts with a special token.
  config["add_bos_token"] = true;
  write_file_atomic(dir / "qwen" / "tokenizer_config.json", config.dump());
  EXPECT_TRUE(BpeTokenizer::load(dir / "qwen" / "tokenizer.json").add_bos());
  config.erase("add_bos_token");
  config.erase("chat_template");
  write_file_atomic(dir / "qwen" / "tokenizer_config.json", config.dump());
  auto json = nlohmann::json::parse(read_file(dir / "qwen" / "tokenizer.json"));
  json["post_processor"] = {{"type", "TemplateProcessing"},
                            {"single", {{{"SpecialToken", {{"id", "<|endoftext|>"}, {"type_id", 0}}}},
                                        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
                            {"pair", nlohmann::json::array()},
                            {"special_tokens", nlohmann::json::object()}};
  write_file_atomic(dir / "qwen" / "tokenizer.json", json.dump());
  // A chat_template.jinja beside the tokenizer (transformers 4.43+) is the template.
  write_file_atomic(dir / "qwen" / "chat_template.jinja", "{{ bos_token }}");
  const BpeTokenizer templated = BpeTokenizer::load(dir / "qwen" / "tokenizer.json");
  EXPECT_TRUE(templated.add_bos());
  EXPECT_EQ(templated.chat_template(), "{{ bos_token }}");

  config["add_bos_token"] = "yes";
  write_file_atomic(dir / "qwen" / "tokenizer_config.json", config.dump());
  EXPECT_BRIGADE_ERROR(BpeTokenizer::load(dir / "qwen" / "tokenizer.json"), "add_bos_token");
}

// data prepare frames documents by the convention; packed rows of a tokenizer without
// BOS split documents after each EOS.
TEST(BosConvention, PrepareAndPackingFollowIt) {
  const BpeTokenizer qwen = train_bpe(small_corpus(), 300, {"<|endoftext|>", "<|im_start|>", "<|im_end|>"});
  TempDir dir;
  {
    std::ofstream out(dir / "chat.jsonl");
    out << R"({"prompt": "hello ", "completion": "world"})" << "\n";
  }
  PrepareOptions o;
  o.inputs = {dir / "chat.jsonl"};
  o.output_dir = dir.path();
  o.prompt_field = "prompt";
  o.completion_field = "completion";
  const auto report = prepare_shards(o, qwen);
  ASSERT_EQ(report.shards.size(), 1u);
  const Shard shard(report.shards[0]);
  const auto prompt = qwen.encode("hello "), completion = qwen.encode("world");
  ASSERT_EQ(shard.size(), static_cast<int64_t>(prompt.size() + completion.size() + 1));
  EXPECT_EQ(shard.token(0), prompt[0]) << "no BOS before a Qwen-style document";
  EXPECT_EQ(shard.token(shard.size() - 1), qwen.eos_id());
  std::vector<int64_t> tokens(static_cast<size_t>(shard.size()));
  std::vector<uint8_t> mask(tokens.size());
  shard.read(0, shard.size(), tokens.data(), mask.data());
  for (size_t i = 0; i < mask.size(); ++i) EXPECT_EQ(mask[i], i < prompt.size() ? 0 : 1) << i;

  // Packed rows [a a EOS b b EOS pad pad]: documents change after each EOS.
  const int64_t eos = 50, T = 7;
  std::vector<int64_t> rows = {1, 2, eos, 3, 4, eos, 0, 0, 5, eos, 6, eos, 7, 8, 9, eos};
  SamplerOptions s;
  s.seq_len = T;
  s.micro_batch_size = 2;
  s.document_end = eos;
  BatchSampler sampler(TokenCorpus::from_tokens(rows), s);
  const auto b = sampler.batch(0, 0);
  for (int64_t r = 0; r < 2; ++r) {
    const int64_t first = b.inputs[r][0].item<int64_t>();
    const std::vector<int64_t> expected = first == 1 ? std::vector<int64_t>{0, 0, 0, 1, 1, 1, 2}
                                                     : std::vector<int64_t>{0, 0, 1, 1, 2, 2, 2};
    for (int64_t t = 0; t < T; ++t) EXPECT_EQ(b.segments[r][t].item<int64_t>(), expected[static_cast<size_t>(t)]) << r << " " << t;
  }
}

}  // namespace
}  // namespace brigade::data
