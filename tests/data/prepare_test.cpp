#include <gtest/gtest.h>

#include <fstream>

#include "data/corpus.h"
#include "data/prepare.h"
#include "data/shard.h"
#include "tests/testing.h"

namespace brigade::data {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

std::vector<int64_t> doc_tokens(const Tokenizer& tok, const std::string& text) {
  std::vector<int64_t> out = {tok.bos_id()};
  for (int64_t id : tok.encode(text)) out.push_back(id);
  out.push_back(tok.eos_id());
  return out;
}

std::vector<int64_t> read_all(const Shard& shard, std::vector<uint8_t>* mask = nullptr) {
  std::vector<int64_t> tokens(static_cast<size_t>(shard.size()));
  std::vector<uint8_t> m(tokens.size());
  shard.read(0, shard.size(), tokens.data(), m.data());
  if (mask) *mask = m;
  return tokens;
}

std::vector<int64_t> concat(std::initializer_list<std::vector<int64_t>> parts) {
  std::vector<int64_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

TEST(Prepare, TextFileBlankLinesSeparateDocuments) {
  TempDir dir;
  ByteTokenizer tok;
  write_text(dir / "in.txt", "first line\nsecond line\n\n\nsecond doc\r\n\r\nthird <|eos|> doc\n");
  PrepareOptions o;
  o.inputs = {dir / "in.txt"};
  o.output_dir = dir / "out" / "nested";  // created when missing
  PrepareReport report = prepare_shards(o, tok);
  EXPECT_EQ(report.documents, 3);
  ASSERT_EQ(report.shards.size(), 1u);
  EXPECT_EQ(report.shards[0], dir / "out" / "nested" / "shard_00000.bin");

  Shard shard(report.shards[0]);
  std::vector<int64_t> expected = concat({doc_tokens(tok, "first line\nsecond line"),
                                          doc_tokens(tok, "second doc"),
                                          doc_tokens(tok, "third <|eos|> doc")});
  EXPECT_EQ(read_all(shard), expected);
  EXPECT_EQ(report.tokens, static_cast<int64_t>(expected.size()));
  EXPECT_EQ(shard.header().doc_count, 3u);
  EXPECT_EQ(shard.header().vocab_size, 261u);
  EXPECT_FALSE(shard.has_mask());
}

TEST(Prepare, JsonlTextField) {
  TempDir dir;
  ByteTokenizer tok;
  write_text(dir / "in.jsonl",
             "{\"text\": \"héllo\", \"id\": 1}\n\n{\"body\": \"x\", \"text\": \"two\\nlines\"}\n");
  PrepareOptions o;
  o.inputs = {dir / "in.jsonl"};
  o.output_dir = dir / "out";
  PrepareReport report = prepare_shards(o, tok);
  EXPECT_EQ(report.documents, 2);
  Shard shard(report.shards.at(0));
  EXPECT_EQ(read_all(shard), concat({doc_tokens(tok, "héllo"), doc_tokens(tok, "two\nlines")}));

  TempDir other;
  o.text_field = "body";
  write_text(dir / "body.jsonl", "{\"body\": \"x\"}\n");
  o.inputs = {dir / "body.jsonl"};
  o.output_dir = other.path();
  report = prepare_shards(o, tok);
  EXPECT_EQ(read_all(Shard(report.shards.at(0))), doc_tokens(tok, "x"));
}

TEST(Prepare, PromptCompletionMasksThePrompt) {
  TempDir dir;
  ByteTokenizer tok;
  write_text(dir / "chat.jsonl",
             "{\"prompt\": \"Q?\", \"completion\": \"A.\"}\n"
             "{\"text\": \"plain\"}\n");
  PrepareOptions o;
  o.inputs = {dir / "chat.jsonl"};
  o.output_dir = dir / "out";
  o.prompt_field = "prompt";
  o.completion_field = "completion";
  PrepareReport report = prepare_shards(o, tok);
  EXPECT_EQ(report.documents, 2);
  Shard shard(report.shards.at(0));
  EXPECT_TRUE(shard.has_mask());
  std::vector<uint8_t> mask;
  std::vector<int64_t> tokens = read_all(shard, &mask);
  std::vector<int64_t> expected = concat({{256, 'Q', '?', 'A', '.', 257}, doc_tokens(tok, "plain")});
  EXPECT_EQ(tokens, expected);
  // BOS + prompt untrained; completion + EOS trained; a text-only line trains fully.
  std::vector<uint8_t> expected_mask = {0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  EXPECT_EQ(mask, expected_mask);

  // Through the corpus and sampler-facing read, the mask survives.
  TokenCorpus corpus = TokenCorpus::from_shards(report.shards);
  std::vector<int64_t> t(3);
  std::vector<uint8_t> m(3);
  corpus.read(2, 3, t.data(), m.data());
  EXPECT_EQ(m, (std::vector<uint8_t>{0, 1, 1}));
}

TEST(Prepare, RollsOverShards) {
  TempDir dir;
  ByteTokenizer tok;
  // Documents of 2+4 = 6 tokens each; 10 per shard holds one, 12 holds two.
  write_text(dir / "a.txt", "aaaa\n\nbbbb\n\ncccc\n");
  write_text(dir / "b.jsonl", "{\"text\": \"dddd\"}\n");
  PrepareOptions o;
  o.inputs = {dir / "a.txt", dir / "b.jsonl"};
  o.output_dir = dir / "out";
  o.tokens_per_shard = 12;
  PrepareReport report = prepare_shards(o, tok);
  EXPECT_EQ(report.documents, 4);
  EXPECT_EQ(report.tokens, 24);
  ASSERT_EQ(report.shards.size(), 2u);
  EXPECT_EQ(report.shards[1].filename(), "shard_00001.bin");
  Shard first(report.shards[0]);
  Shard second(report.shards[1]);
  EXPECT_EQ(first.header().doc_count, 2u);
  EXPECT_EQ(read_all(first), concat({doc_tokens(tok, "aaaa"), doc_tokens(tok, "bbbb")}));
  EXPECT_EQ(read_all(second), concat({doc_tokens(tok, "cccc"), doc_tokens(tok, "dddd")}));

  // A document longer than tokens_per_shard gets a shard of its own.
  TempDir other;
  o.output_dir = other.path();
  o.tokens_per_shard = 4;
  report = prepare_shards(o, tok);
  EXPECT_EQ(report.shards.size(), 4u);
  EXPECT_EQ(TokenCorpus::from_shards(report.shards).size(), 24);
}

TEST(PrepareErrors, MissingInputAndUnknownExtension) {
  TempDir dir;
  ByteTokenizer tok;
  PrepareOptions o;
  o.output_dir = dir / "out";
  EXPECT_BRIGADE_ERROR(prepare_shards(o, tok), "no input files given");
  o.inputs = {dir / "missing.txt"};
  EXPECT_BRIGADE_ERROR(prepare_shards(o, tok), "input file not found: " + (dir / "missing.txt").string());
  write_text(dir / "data.csv", "a,b\n");
  o.inputs = {dir / "data.csv"};
  EXPECT_BRIGADE_ERROR(prepare_shards(o, tok), "data.csv: unknown extension '.csv'");
}

TEST(PrepareErrors, InvalidJsonNamesLine) {
  TempDir dir;
  ByteTokenizer tok;
  write_text(dir / "input.jsonl", "{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n{\"text\": \"c\"}\n"
                                  "{\"text\": \"d\"}\n{\"text\": \"e\"}\n{\"text\": oops}\n");
  PrepareOptions o;
  o.inputs = {dir / "input.jsonl"};
  o.output_dir = dir / "out";
  EXPECT_BRIGADE_ERROR(prepare_shards(o, tok), "input.jsonl:7: invalid JSON: ");
  // Nothing half-done is left behind, so a fixed rerun is not refused.
  EXPECT_TRUE(fs::is_empty(dir / "out"));

  write_text(dir / "array.jsonl", "[1, 2]\n");
  o.inputs = {dir / "array.jsonl"};
  EXPECT_BRIGADE_ERROR(prepare_shards(o, tok), "array.jsonl:1: expected a JSON object, got array");
}

TEST(PrepareErrors, MissingFieldNamesLine) {
  TempDir dir;
  ByteTokenizer tok;
  write_text(dir / "input.jsonl", "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"txt\": \"c\"}\n");
  PrepareOptions o;
  o.inputs = {dir / "input.jsonl"};
  o.output_dir = dir / "out";
  EXPECT_BRIGADE_ERROR(prepare_shards(o, tok), "input.jsonl:3: no string field 'text'");

  write_text(dir / "number.jsonl", "{\"text\": 5}\n");
  o.inputs = {dir / "number.jsonl"};
  EXPECT_BRIGADE_ERROR(prepare_shards(o, tok), "number.jsonl:1: no string field 'text'");

  write_text(dir / "chat.jsonl", "{\"prompt\": \"q\"}\n");
  o.inputs = {dir / "chat.jsonl"};
  o.prompt_field = "prompt";
  o.completion_field = "completion";
  EXPECT_BRIGADE_ERROR(prepare_shards(o, tok),
                       "chat.jsonl:1: no string fields 'prompt' and 'completion' (nor 'text')");
}

TEST(PrepareErrors, FailureInLaterInputRemovesEarlierShards) {
  TempDir dir;
  ByteTokenizer tok;
  write_text(dir / "good.txt", "aaaa\n\nbbbb\n");
  write_text(dir / "bad.jsonl", "{\"text\": \"x\"}\nnot json\n");
  PrepareOptions o;
  o.inputs = {dir / "good.txt", dir / "bad.jsonl"};
  o.output_dir = dir / "out";
  o.tokens_per_shard = 6;  // good.txt alone finishes a shard before the error
  EXPECT_BRIGADE_ERROR(prepare_shards(o, tok), "bad.jsonl:2: invalid JSON");
  EXPECT_TRUE(fs::is_empty(dir / "out"));
}

TEST(PrepareErrors, RefusesToOverwriteShards) {
  TempDir dir;
  ByteTokenizer tok;
  write_text(dir / "in.txt", "hello\n");
  PrepareOptions o;
  o.inputs = {dir / "in.txt"};
  o.output_dir = dir / "out";
  PrepareReport first = prepare_shards(o, tok);
  const auto size = fs::file_size(first.shards.at(0));
  EXPECT_BRIGADE_ERROR(prepare_shards(o, tok), "already holds shard_*.bin files");
  EXPECT_EQ(fs::file_size(first.shards.at(0)), size);

  // Other files in the directory are fine.
  TempDir other;
  write_text(other / "README", "notes");
  o.output_dir = other.path();
  EXPECT_EQ(prepare_shards(o, tok).documents, 1);

  write_text(dir / "file", "x");
  o.output_dir = dir / "file";
  EXPECT_BRIGADE_ERROR(prepare_shards(o, tok), "exists and is not a directory");
}

TEST(PrepareErrors, NoDocuments) {
  TempDir dir;
  ByteTokenizer tok;
  write_text(dir / "blank.txt", "\n\n\n");
  PrepareOptions o;
  o.inputs = {dir / "blank.txt"};
  o.output_dir = dir / "out";
  EXPECT_BRIGADE_ERROR(prepare_shards(o, tok), "the inputs hold no documents");
  EXPECT_TRUE(fs::is_empty(dir / "out"));
}

}  // namespace
}  // namespace brigade::data
