// Byte-level BPE (data/bpe.h) against Hugging Face: tokenizers trained by HF's
// `tokenizers` (tests/data/hf_tokenizer.py, no downloads) must give brigade the same
// ids; brigade's trainer output and the byte tokenizer must load in HF and
// transformers with the same ids; chat templates must render like transformers'
// Jinja. Plus bad files, invalid UTF-8 and the byte tokenizer equivalence.
#include <gtest/gtest.h>

#include <fstream>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "data/bpe.h"
#include "tests/testing.h"

namespace brigade::data {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using testing::run_command;
using testing::TempDir;

const std::string kScript = std::string(BRIGADE_SOURCE_DIR) + "/tests/data/hf_tokenizer.py";

// Paragraphs of the training corpus: several scripts, code, emoji, whitespace runs,
// decomposed characters (NFC), digits.
std::vector<std::string> corpus_paragraphs() {
  const std::vector<std::string> seeds = {
      "The quick brown fox jumps over the lazy dog. It's what they'll say, and we've done it; I'm sure you'd agree.",
      "Training large language models requires data, compute and patience. Tokenizers split text into pieces.",
      "日本語の文章です。東京都は日本の首都であり、人口が多い。カタカナとひらがなを使います。",
      "今日は天気がいいですね。明日も晴れるでしょう。コンピューターでプログラムを書く。",
      "中文文本测试，这是一个句子。我们正在训练一个分词器，它需要处理多种语言。",
      "한국어 텍스트입니다. 안녕하세요! 오늘 날씨가 좋네요. 토크나이저를 학습합니다.",
      "def tokenize(text):\n    for piece in text.split():\n        yield piece.lower()  # comment\n",
      "int main(int argc, char** argv) {\n\tif (argc > 1) { return 1; }\n\treturn 0;\n}\n",
      "Emoji: 👨‍👩‍👧‍👦 family, 👍🏽 👍🏿 thumbs, 🇯🇵 🇫🇷 flags, ❤️ 🙂 🚀 and 👩🏻‍💻 coder.",
      "Spaces   and\ttabs\t\tand\n\n\nnewlines   \n  mixed \r\n lines    end.",
      "Combining marks: cafe\u0301, re\u0301sume\u0301, A\u030Angstro\u0308m, \u1100\u1161\u11A8 and na\u0308ive.",
      "Numbers 1234567890, 3.14159, 2024-05-17, 42 apples and 1000000 dollars; ٣٤٥ and 一二三.",
      "Deutsch: Größe, Übermaß, Straße. Français: ça, élève, où. Español: niño, ¿qué? Русский: привет мир.",
      "HTML <div class=\"x\">text</div> & JSON {\"key\": [1, 2, 3]} and URLs https://example.com/a?b=c.",
  };
  std::vector<std::string> out;
  for (int round = 0; round < 40; ++round)
    for (size_t i = 0; i < seeds.size(); ++i)
      out.push_back(seeds[(i + round) % seeds.size()] + " " + std::to_string(round * 37 + i) + " " +
                    seeds[(i * 7 + round * 3) % seeds.size()]);
  return out;
}

// Strings compared with HF (all valid UTF-8; HF matches added tokens, so brigade
// encodes these with allow_special).
std::vector<std::string> test_inputs() {
  std::vector<std::string> inputs = {
      "Hello world! How's it going? I'M FINE, you'RE great. DON'T 'S 'll 'LL",
      "  leading spaces and trailing   ",
      "tabs\tand\t\tnewlines\n\n\nmixed \n \r\n end\n",
      "日本語のテキストです。東京は大きい都市。カタカナ、ひらがな",
      "中文文本测试，这是一个句子。",
      "한국어 텍스트입니다. 안녕하세요!",
      "def foo(x):\n    return x ** 2  # comment\n\nint main() { return 0; }",
      "emoji 👨‍👩‍👧‍👦 family, 👍🏽 thumbs, 🇯🇵 flag, ❤️ 👩🏻‍💻",
      "combining: e\u0301 cafe\u0301 A\u030A \u1100\u1161\u11A8 \u304B\u3099 (NFC composes)",
      "digits 1234567890 3.14159 2024-01-01 ١٢٣ 一二三",
      "whitespace kinds:\u00a0nbsp\u3000ideographic\u0085nel\u2028ls \u2003em end",
      "<|im_start|>user\nhi there<|im_end|>\n<|endoftext|>",
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>",
      "<tool> call <tool>x",
      "",
      "a",
      "   ",
      "\n",
      std::string(300, ' ') + "x" + std::string(200, '\n'),
      std::string(150, 'a') + " " + std::string(100, '!'),
      "Ω≈ç√∫˜µ≤≥÷ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u0F00 \u00AD soft",
      "bad \uFFFD bytes",  // "bad \xff bytes" as Python's errors="replace" gives it to HF
      "x'ſ 'K mixed",
      "Grüße aus Köln: Straße, Übermaß — ¿qué? привет",
  };
  // Random mixtures of the characters where regex engines and normalisers disagree
  // most easily: every kind of white space, apostrophes, digits, combining marks.
  const std::vector<std::string> pool = {
      "a", "Z", "é", "e\u0301", "\u0301", "\u3099", "か", "語", "한", "\u1161", "\u11A8", "ß", "ſ", "K", "'", "'s",
      "'T", "'ll", "'RE", " ", "  ", "\t", "\n", "\r", "\r\n", "\u00a0", "\u0085", "\u2028", "\u3000", "\u2003",
      "\v", "\f", "1", "23", "٣", "½", "²", "!", "...", "-", "_", "\"", "(", "😀", "👍🏽", "\u200d", "👩‍💻",
      "\uFE0F", "<|im_end|>", "<|endoftext|>", "<tool>", "<", "|", "Ω", "ﬁ", "Å", "\u212B"};
  std::mt19937 rng(11);
  for (int i = 0; i < 400; ++i) {
    std::string s;
    for (int n = static_cast<int>(rng() % 12); n > 0; --n) s += pool[rng() % pool.size()];
    inputs.push_back(s);
  }
  return inputs;
}

std::vector<int64_t> ids_of(const json& array) { return array.get<std::vector<int64_t>>(); }

// HF's tokenizers, trained once for the whole suite.
class BpeHf : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    std::string corpus;
    for (const std::string& p : corpus_paragraphs()) corpus += p + "\n\n";
    write_file_atomic(*dir_ / "corpus.txt", corpus);
    write_file_atomic(*dir_ / "inputs.json", json(test_inputs()).dump());
    auto run = run_command(std::string(BRIGADE_VENV_PYTHON) + " " + kScript + " train " + dir_->path().string());
    ASSERT_EQ(run.exit_code, 0) << run.output;
    expected_ = new json(json::parse(read_file(*dir_ / "expected.json")));
  }
  static void TearDownTestSuite() {
    delete expected_;
    delete dir_;
    expected_ = nullptr;
    dir_ = nullptr;
  }
  void SetUp() override { ASSERT_NE(expected_, nullptr) << "the HF side failed to train"; }

  static fs::path json_of(const std::string& style) { return dir_->path() / style / "tokenizer.json"; }

  // brigade's ids equal HF's for every input, and decoding gives HF's text.
  static void expect_same_as_hf(const BpeTokenizer& tok, const std::string& style) {
    const json& e = (*expected_)[style];
    const auto inputs = test_inputs();
    for (size_t i = 0; i < inputs.size(); ++i) {
      std::vector<int64_t> ids = tok.encode(inputs[i], /*allow_special=*/true);
      EXPECT_EQ(ids, ids_of(e["ids"][i])) << style << " input " << i << ": '" << inputs[i] << "'";
      EXPECT_EQ(tok.decode(ids), e["decoded"][i].get<std::string>()) << style << " input " << i;
    }
  }

  static TempDir* dir_;
  static json* expected_;
};
TempDir* BpeHf::dir_ = nullptr;
json* BpeHf::expected_ = nullptr;

TEST_F(BpeHf, Qwen2StyleIdsMatchHf) {
  BpeTokenizer tok = BpeTokenizer::load(json_of("qwen2"));
  EXPECT_EQ(tok.pre_tokenizer(), "qwen2");
  const json file = json::parse(read_file(json_of("qwen2")));
  EXPECT_EQ(tok.vocab_size(), static_cast<int64_t>(file["model"]["vocab"].size()) + 1);  // + <tool>
  expect_same_as_hf(tok, "qwen2");
}

TEST_F(BpeHf, Llama3StyleIdsMatchHf) {
  BpeTokenizer tok = BpeTokenizer::load(json_of("llama3"));
  EXPECT_EQ(tok.pre_tokenizer(), "llama-bpe");
  expect_same_as_hf(tok, "llama3");
}

TEST_F(BpeHf, Gpt2ByteLevelRegexIdsMatchHf) {
  BpeTokenizer tok = BpeTokenizer::load(json_of("gpt2"));
  EXPECT_EQ(tok.pre_tokenizer(), "gpt2");
  expect_same_as_hf(tok, "gpt2");
}

TEST_F(BpeHf, MergesAsStringsOrPairsGiveTheSameIds) {
  json data = json::parse(read_file(json_of("qwen2")));
  ASSERT_FALSE(data["model"]["merges"].empty());
  const bool pairs = data["model"]["merges"][0].is_array();
  json rewritten = json::array();
  for (const json& m : data["model"]["merges"])
    rewritten.push_back(pairs ? json(m[0].get<std::string>() + " " + m[1].get<std::string>())
                              : json::array({m.get<std::string>().substr(0, m.get<std::string>().find(' ')),
                                             m.get<std::string>().substr(m.get<std::string>().find(' ') + 1)}));
  data["model"]["merges"] = rewritten;
  TempDir other;
  write_file_atomic(other / "tokenizer.json", data.dump());
  BpeTokenizer original = BpeTokenizer::load(json_of("qwen2"));
  BpeTokenizer loaded = BpeTokenizer::load(other / "tokenizer.json");
  EXPECT_EQ(loaded.merges(), original.merges());
  expect_same_as_hf(loaded, "qwen2");
}

TEST_F(BpeHf, SpecialTokensNeedAllowSpecialButAddedTokensAlwaysMatch) {
  BpeTokenizer tok = BpeTokenizer::load(json_of("qwen2"));
  const int64_t im_start = *tok.special_id(kImStartToken);
  const int64_t tool = *tok.special_id("<tool>");
  EXPECT_TRUE(tok.is_special(im_start));
  EXPECT_TRUE(tok.is_added(tool));
  EXPECT_FALSE(tok.is_special(tool));
  EXPECT_FALSE(tok.is_added(tok.encode("a").at(0)));

  const std::string text = "<|im_start|>user <tool>";
  std::vector<int64_t> with = tok.encode(text, true), without = tok.encode(text, false);
  EXPECT_EQ(with.front(), im_start);
  EXPECT_EQ(std::count(without.begin(), without.end(), im_start), 0);
  EXPECT_EQ(without.back(), tool);  // non-special added tokens match either way
  EXPECT_EQ(tok.decode(without), text);
  EXPECT_EQ(tok.decode(with), text);
  // Longest match first: "<|im_start|>" is not cut as a shorter token.
  EXPECT_EQ(tok.decode(std::vector<int64_t>{im_start}), "<|im_start|>");
}

TEST_F(BpeHf, SpecialRolesFromConfigOrWellKnownNames) {
  BpeTokenizer qwen = BpeTokenizer::load(json_of("qwen2"));
  const int64_t endoftext = *qwen.special_id("<|endoftext|>");
  EXPECT_EQ(qwen.bos_id(), endoftext);
  EXPECT_EQ(qwen.eos_id(), endoftext);
  EXPECT_EQ(qwen.pad_id(), endoftext);
  EXPECT_EQ(qwen.special_id(kImEndToken), qwen.special_id("<|im_end|>"));

  BpeTokenizer llama = BpeTokenizer::load(json_of("llama3"));
  EXPECT_EQ(llama.bos_id(), *llama.special_id("<|begin_of_text|>"));
  EXPECT_EQ(llama.eos_id(), *llama.special_id("<|end_of_text|>"));
  EXPECT_EQ(llama.special_id(kImEndToken), llama.special_id("<|eot_id|>"));
  EXPECT_EQ(llama.special_id(kImStartToken), std::nullopt);
  EXPECT_EQ(llama.special_id(kPadToken), std::nullopt);

  // tokenizer_config.json next to the file wins over the names.
  TempDir d;
  fs::copy_file(json_of("qwen2"), d / "tokenizer.json");
  write_file_atomic(d / "tokenizer_config.json",
                    R"({"bos_token": null, "eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"})");
  BpeTokenizer configured = BpeTokenizer::load(d / "tokenizer.json");
  EXPECT_EQ(configured.eos_id(), *qwen.special_id("<|im_end|>"));
  EXPECT_EQ(configured.pad_id(), endoftext);
  EXPECT_EQ(configured.bos_id(), endoftext);  // null: the well-known names decide

  write_file_atomic(d / "tokenizer_config.json", R"({"eos_token": "<nope>"})");
  EXPECT_BRIGADE_ERROR(BpeTokenizer::load(d / "tokenizer.json"), "tokenizer_config.json: field 'eos_token'");
  write_file_atomic(d / "tokenizer_config.json", R"({"eos_token": 3})");
  EXPECT_BRIGADE_ERROR(BpeTokenizer::load(d / "tokenizer.json"), "expected a string");
}

TEST_F(BpeHf, InvalidUtf8IsKeptByteForByte) {
  BpeTokenizer llama = BpeTokenizer::load(json_of("llama3"));
  BpeTokenizer qwen = BpeTokenizer::load(json_of("qwen2"));
  const std::vector<std::string> bad = {
      "\xff\xfe", "abc\xc3(def", "surrogate \xed\xa0\x80 here", "truncated 日本\xe8\xaa", "overlong \xc0\xaf",
      "\x80\x80\x80 leading continuation", "ok \xf5\x80\x80\x80 too big", "日本語\xff\xff日本語", std::string("nul\0byte", 8)};
  for (const std::string& text : bad) {
    for (const BpeTokenizer* tok : {&llama, &qwen}) {
      std::vector<int64_t> ids = tok->encode(text);
      EXPECT_EQ(tok->decode(ids), text) << tok->pre_tokenizer();
    }
  }
  // The valid runs around an invalid one get their own ids, unchanged.
  auto cat = [](std::vector<int64_t> a, const std::vector<int64_t>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  EXPECT_EQ(llama.encode("hello \xff world"),
            cat(cat(llama.encode("hello "), llama.encode("\xff")), llama.encode(" world")));
  // Random bytes: never a crash, always the same bytes back (llama3 has no normaliser).
  std::mt19937 rng(7);
  for (int i = 0; i < 300; ++i) {
    std::string text(rng() % 64, '\0');
    for (char& c : text) c = static_cast<char>(rng() % 256);
    EXPECT_EQ(llama.decode(llama.encode(text, true)), text);
  }
}

TEST_F(BpeHf, MakeTokenizerTakesAFileOrADirectory) {
  auto from_dir = make_tokenizer((dir_->path() / "qwen2").string());
  auto from_file = make_tokenizer(json_of("qwen2").string());
  EXPECT_EQ(from_dir->vocab_size(), BpeTokenizer::load(json_of("qwen2")).vocab_size());
  EXPECT_EQ(from_file->encode("hello world"), from_dir->encode("hello world"));
  EXPECT_EQ(from_file->name(), json_of("qwen2").string());
  EXPECT_BRIGADE_ERROR(make_tokenizer((dir_->path() / "nowhere").string()), "known: byte");
}

TEST_F(BpeHf, EncodeIsThreadSafe) {
  BpeTokenizer tok = BpeTokenizer::load(json_of("qwen2"));
  const auto inputs = corpus_paragraphs();
  std::vector<std::vector<int64_t>> reference;
  for (const auto& text : inputs) reference.push_back(tok.encode(text));
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      BpeTokenizer copy = tok;  // copies share the vocabulary
      for (size_t i = 0; i < inputs.size(); ++i)
        if (copy.encode(inputs[(i + t * 13) % inputs.size()]) != reference[(i + t * 13) % inputs.size()])
          ++mismatches[t];
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

// brigade's trainer output and the byte tokenizer, saved, loaded by HF's tokenizers
// and transformers: the same ids; chat templates render like transformers' Jinja.
TEST_F(BpeHf, SavedTokenizersLoadInTransformersWithTheSameIds) {
  const auto paragraphs = corpus_paragraphs();
  BpeTokenizer trained = train_bpe(paragraphs, 900, {"<|endoftext|>", "<|im_start|>", "<|im_end|>"});
  BpeTokenizer bytes = BpeTokenizer::from_byte_tokenizer();
  TempDir out;
  trained.save(out / "trained", chat_template_jinja("chatml"));
  bytes.save(out / "bytes", chat_template_jinja("llama3"));

  const std::vector<std::vector<ChatMessage>> conversations = {
      {{"user", "Hello!"}},
      {{"system", "You are terse."}, {"user", "2+2?"}, {"assistant", "4"}, {"user", "and 3+3?\n"}},
      {{"user", "日本語で 👍🏽"}, {"assistant", "  spaces  \n\n"}},
  };
  json request;
  request["dirs"] = {(out / "trained").string(), (out / "bytes").string()};
  std::vector<std::string> inputs = test_inputs();
  inputs.erase(std::remove_if(inputs.begin(), inputs.end(),
                              [](const std::string& s) { return s.find("<tool>") != std::string::npos; }),
               inputs.end());
  request["inputs"] = inputs;
  request["chat_dirs"] = {{"chatml", (out / "trained").string()}, {"llama3", (out / "bytes").string()}};
  request["conversations"] = json::array();
  for (const auto& c : conversations) {
    json conv = json::array();
    for (const auto& m : c) conv.push_back({{"role", m.role}, {"content", m.content}});
    request["conversations"].push_back(conv);
  }
  write_file_atomic(out / "request.json", request.dump());
  auto run = run_command(std::string(BRIGADE_VENV_PYTHON) + " " + kScript + " check " + out.path().string());
  ASSERT_EQ(run.exit_code, 0) << run.output;
  json response = json::parse(read_file(out / "response.json"));

  const std::pair<const BpeTokenizer*, std::string> sides[] = {{&trained, "trained"}, {&bytes, "bytes"}};
  for (const auto& [tok, name] : sides) {
    const json& r = response["dirs"][(out / name).string()];
    EXPECT_EQ(r["eos_token"], tok->tokens()[static_cast<size_t>(tok->eos_id())]) << name;
    for (size_t i = 0; i < inputs.size(); ++i) {
      std::vector<int64_t> ids = tok->encode(inputs[i], true);
      EXPECT_EQ(ids, ids_of(r["tokenizers"][i])) << name << " input '" << inputs[i] << "'";
      EXPECT_EQ(ids, ids_of(r["transformers"][i])) << name << " input '" << inputs[i] << "'";
    }
  }
  for (const std::string family : {"chatml", "llama3"}) {
    for (size_t c = 0; c < conversations.size(); ++c) {
      EXPECT_EQ(apply_chat_template(family, conversations[c], false), response["chat"][family][c][0]) << family << c;
      EXPECT_EQ(apply_chat_template(family, conversations[c], true), response["chat"][family][c][1]) << family << c;
    }
  }
}

// ---------------------------------------------------------------------------------

TEST(BpeByte, SameIdsAsTheByteTokenizer) {
  BpeTokenizer bpe = BpeTokenizer::from_byte_tokenizer();
  ByteTokenizer bytes;
  EXPECT_EQ(bpe.vocab_size(), bytes.vocab_size());
  EXPECT_TRUE(bpe.merges().empty());
  EXPECT_EQ(bpe.pre_tokenizer(), "gpt2");
  EXPECT_EQ(bpe.tokens()[' '], "Ġ");
  EXPECT_EQ(bpe.tokens()['\n'], "Ċ");
  EXPECT_EQ(bpe.tokens()['A'], "A");
  for (std::string_view name : {kBosToken, kEosToken, kPadToken, kImStartToken, kImEndToken}) {
    EXPECT_EQ(bpe.special_id(name), bytes.special_id(name)) << name;
    EXPECT_TRUE(bpe.is_special(*bpe.special_id(name)));
  }
  std::vector<std::string> texts = test_inputs();
  texts.push_back("<|bos|>doc<|eos|><|pad|><|im_start|>x<|im_end|><|bos");
  std::mt19937 rng(3);
  for (int i = 0; i < 200; ++i) {
    std::string text(rng() % 48, '\0');
    for (char& c : text) c = static_cast<char>(rng() % 256);
    texts.push_back(text);
  }
  for (const std::string& text : texts) {
    for (bool allow : {false, true}) {
      std::vector<int64_t> ids = bpe.encode(text, allow);
      EXPECT_EQ(ids, bytes.encode(text, allow)) << text;
      EXPECT_EQ(bpe.decode(ids), bytes.decode(ids));
    }
  }
  EXPECT_BRIGADE_ERROR(bpe.decode(std::vector<int64_t>{261}), "cannot decode token id 261");
}

// ---------------------------------------------------------------------------------
// Bad files: each an Error naming the file and the field.

class BpeLoad : public ::testing::Test {
 protected:
  void SetUp() override {
    BpeTokenizer::from_byte_tokenizer().save(dir_.path());
    good_ = json::parse(read_file(path()));
    // Give it one merge so merges can be broken.
    good_["model"]["vocab"]["ĠĠ"] = 261;
    good_["model"]["merges"] = json::array({"Ġ Ġ"});
    fs::remove(dir_ / "tokenizer_config.json");
  }
  fs::path path() const { return dir_ / "tokenizer.json"; }
  void write(const json& j) { write_file_atomic(path(), j.dump()); }
  void expect_error(const json& j, const std::string& field) {
    write(j);
    EXPECT_BRIGADE_ERROR(BpeTokenizer::load(path()), path().string());
    EXPECT_BRIGADE_ERROR(BpeTokenizer::load(path()), field);
  }
  TempDir dir_;
  json good_;
};

TEST_F(BpeLoad, GoodFileLoads) {
  write(good_);
  BpeTokenizer tok = BpeTokenizer::load(path());
  EXPECT_EQ(tok.vocab_size(), 262);
  // GPT-2 split: "a", "   ", " b"; the three spaces merge leftmost first.
  EXPECT_EQ(tok.encode("a    b"), (std::vector<int64_t>{'a', 261, ' ', ' ', 'b'}));
  EXPECT_EQ(tok.merges(), std::vector<std::string>{"Ġ Ġ"});
}

TEST_F(BpeLoad, TruncatedJson) {
  std::string text = good_.dump();
  write_file_atomic(path(), text.substr(0, text.size() / 2));
  EXPECT_BRIGADE_ERROR(BpeTokenizer::load(path()), path().string() + ": not valid JSON");
  write_file_atomic(path(), "");
  EXPECT_BRIGADE_ERROR(BpeTokenizer::load(path()), "not valid JSON");
  EXPECT_BRIGADE_ERROR(BpeTokenizer::load(dir_ / "missing.json"), "missing.json");
}

TEST_F(BpeLoad, MissingOrUnknownModel) {
  json j = good_;
  j.erase("model");
  expect_error(j, "field 'model': missing");
  j = good_;
  j["model"]["type"] = "WordPiece";
  expect_error(j, "field 'model.type': unsupported model 'WordPiece'");
  j = good_;
  j["model"] = 3;
  expect_error(j, "field 'model': expected an object");
  j = good_;
  j["model"].erase("vocab");
  expect_error(j, "field 'model.vocab': missing");
}

TEST_F(BpeLoad, BadMerges) {
  json j = good_;
  j["model"]["merges"] = json::array({"Ġ nope"});
  expect_error(j, "field 'model.merges[0]': unknown token 'nope'");
  j["model"]["merges"] = json::array({"a b"});
  expect_error(j, "field 'model.merges[0]': the merged token 'ab' is not in model.vocab");
  j["model"]["merges"] = json::array({"ab"});
  expect_error(j, "field 'model.merges[0]'");
  j["model"]["merges"] = json::array({json::array({"Ġ", 3})});
  expect_error(j, "field 'model.merges[0][1]'");
}

TEST_F(BpeLoad, BadVocabIds) {
  json j = good_;
  j["model"]["vocab"]["ĠĠ"] = 5000;
  expect_error(j, "field 'model.vocab['ĠĠ']': id 5000 out of range");
  j["model"]["vocab"]["ĠĠ"] = 7;
  expect_error(j, "is also used by");
  j["model"]["vocab"]["ĠĠ"] = -1;
  expect_error(j, "out of range");
  j["model"]["vocab"]["ĠĠ"] = "x";
  expect_error(j, "field 'model.vocab['ĠĠ']': expected an integer");
  j = good_;
  j["added_tokens"][0]["id"] = 3;
  expect_error(j, "field 'added_tokens[0].id'");
}

TEST_F(BpeLoad, UnsupportedPipelineParts) {
  json j = good_;
  j["normalizer"] = {{"type", "NFKC"}};
  expect_error(j, "field 'normalizer.type': unsupported normalizer 'NFKC'");
  j = good_;
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", json::array({{{"type", "NFC"}}, {{"type", "Lowercase"}}})}};
  expect_error(j, "normalizer.normalizers[1].type");
  j = good_;
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  expect_error(j, "field 'pre_tokenizer.type'");
  j = good_;
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers", json::array({{{"type", "Split"},
                                                        {"pattern", {{"Regex", "(unclosed"}}},
                                                        {"behavior", "Isolated"},
                                                        {"invert", false}},
                                                       {{"type", "ByteLevel"}, {"use_regex", false}}})}};
  expect_error(j, "bad regex '(unclosed'");
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "MergedWithNext";
  expect_error(j, "field 'pre_tokenizer.pretokenizers[0].behavior'");
  j = good_;
  j.erase("pre_tokenizer");
  expect_error(j, "field 'pre_tokenizer': missing");
  j = good_;
  j["decoder"] = {{"type", "WordPiece"}};
  expect_error(j, "field 'decoder.type'");
  j = good_;
  j["model"]["byte_fallback"] = true;
  expect_error(j, "model.byte_fallback");
}

// ---------------------------------------------------------------------------------

TEST(BpeTrainer, LearnsMergesDeterministically) {
  const auto paragraphs = corpus_paragraphs();
  BpeTokenizer a = train_bpe(paragraphs, 700, {"<|endoftext|>", "<|im_end|>"});
  BpeTokenizer b = train_bpe(paragraphs, 700, {"<|endoftext|>", "<|im_end|>"});
  EXPECT_EQ(a.vocab_size(), 700);
  EXPECT_EQ(a.merges().size(), 700u - 256 - 2);
  EXPECT_EQ(a.merges(), b.merges());
  EXPECT_EQ(a.tokens(), b.tokens());
  EXPECT_EQ(a.special_id("<|endoftext|>"), 698);
  EXPECT_EQ(a.eos_id(), 698);
  EXPECT_EQ(a.special_id(kImEndToken), 699);
  EXPECT_EQ(a.pre_tokenizer(), "qwen2");
  size_t bytes = 0, ids = 0;
  for (const auto& p : paragraphs) {
    std::vector<int64_t> enc = a.encode(p);
    // Text already in NFC comes back unchanged (the combining-marks paragraph is not).
    if (p.find("Combining") == std::string::npos) {
      EXPECT_EQ(a.decode(enc), p);
    }
    bytes += p.size();
    ids += enc.size();
  }
  EXPECT_LT(ids * 2, bytes);  // better than 2 bytes per token
  // A tiny corpus runs out of pairs: fewer merges, still valid.
  std::vector<std::string> tiny = {"abab"};
  BpeTokenizer t = train_bpe(tiny, 1000, {});
  EXPECT_EQ(t.merges(), (std::vector<std::string>{"a b", "ab ab"}));
  EXPECT_EQ(t.encode("abab"), std::vector<int64_t>{257});
}

TEST(BpeTrainer, RejectsBadArguments) {
  std::vector<std::string> corpus = {"hello"};
  EXPECT_BRIGADE_ERROR(train_bpe(corpus, 100, {}), "smaller than the 256 byte tokens");
  EXPECT_BRIGADE_ERROR(train_bpe(corpus, 300, {"<a>", "<a>"}), "given twice");
  EXPECT_BRIGADE_ERROR(train_bpe(corpus, 300, {}, "(bad"), "bad regex");
}

TEST(BpeChatTemplate, RendersChatmlAndLlama3) {
  std::vector<ChatMessage> conv = {{"system", "S"}, {"user", "U"}};
  EXPECT_EQ(apply_chat_template("chatml", conv, false), "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");
  EXPECT_EQ(apply_chat_template("chatml", conv, true),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(apply_chat_template("llama3", conv, true),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_NE(chat_template_jinja("chatml").find("add_generation_prompt"), std::string::npos);
  EXPECT_BRIGADE_ERROR(apply_chat_template("mistral", conv, false), "known: chatml, llama3");
  EXPECT_BRIGADE_ERROR(chat_template_jinja("mistral"), "unknown chat template family 'mistral'");
}

}  // namespace
}  // namespace brigade::data
