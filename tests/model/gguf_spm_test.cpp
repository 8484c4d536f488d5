// SentencePiece vocabularies in GGUF files (tokenizer.ggml.model "llama"): a
// SentencePiece BPE model trained with byte fallback, written as llama.cpp's
// converter writes it, encodes multilingual text to llama.cpp's ids; brigade's GGUF
// export writes it back so llama.cpp reads the same vocabulary.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "data/spm.h"
#include "model/gguf.h"
#include "model/gguf_export.h"
#include "model/gguf_import.h"
#include "recipes/build.h"
#include "tests/model/gguf_testing.h"
#include "tests/testing.h"

namespace brigade::model {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

const std::vector<std::string> kCorpus = {
    "The quick brown fox jumps over the lazy dog. It's 2026, isn't it?",
    "Über die Brücke gehen Müller und Schäfer; naïve café déjà vu.",
    "深度求索发布了新的模型。机器学习很有趣！", "日本語のテキストも少し。カタカナとひらがな。",
    "Привет, мир! Это тест токенизатора.", "def f(x):\n    return x ** 2  # comment\n\n\tdone",
    "Numbers 12345 and 3.14159 and 1,000,000; emoji 🚀🔥 ok", "  leading spaces\nand\r\nline endings   "};

std::vector<std::string> texts() {
  std::vector<std::string> t = kCorpus;
  for (const char* extra : {"<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n",
                            "unseen: ŽŽŽ ☃ 𝄞 zebra", "", " ", "a  b   c", "<s>not a control token here</s>"})
    t.emplace_back(extra);
  return t;
}

TEST(GgufSentencePiece, EncodesAsLlamaCppAndExportsBack) {
  if (!gguf_testing::have_llama_cpp()) GTEST_SKIP() << "llama-cpp-python missing from .venv (scripts/setup.sh)";
  TempDir dir;
  std::vector<std::string> corpus;
  for (int i = 0; i < 30; ++i) corpus.insert(corpus.end(), kCorpus.begin(), kCorpus.end());
  const auto all = texts();
  write_file_atomic(dir / "request.json", nlohmann::json{{"corpus", corpus}, {"texts", all}, {"vocab_size", 500}}.dump());
  auto run = testing::run_command(std::string(BRIGADE_VENV_PYTHON) + " " + BRIGADE_SOURCE_DIR +
                                  "/tests/model/spm_oracle.py " + dir.path().string());
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const auto theirs = nlohmann::json::parse(read_file(dir / "response.json"));

  const data::SpmTokenizer spm = read_gguf_spm_tokenizer(dir / "spm.gguf");
  EXPECT_EQ(spm.vocab_size(), 500);
  int agree_sentencepiece = 0;
  for (size_t i = 0; i < all.size(); ++i) {
    const auto ids = spm.encode(all[i]);
    EXPECT_EQ(ids, theirs["llama_cpp"][i].get<std::vector<int64_t>>()) << "'" << all[i] << "'";
    EXPECT_EQ(spm.encode(all[i], true), theirs["llama_cpp_special"][i].get<std::vector<int64_t>>())
        << "with special tokens: '" << all[i] << "'";
    agree_sentencepiece += ids == theirs["sentencepiece"][i].get<std::vector<int64_t>>() ? 1 : 0;
    if (all[i].find('<') == std::string::npos) {
      EXPECT_EQ(spm.decode(ids), all[i].empty() ? "" : " " + all[i]) << "the space prefix is kept, the rest round-trips";
    }
  }
  std::cout << "[ measured ] SentencePiece itself gives the same ids on " << agree_sentencepiece << " of "
            << all.size() << " texts (it treats user-defined tokens' surroundings otherwise)\n";
  // Characters the vocabulary lacks fall back to byte tokens.
  const auto snowman = spm.encode("☃");
  ASSERT_GE(snowman.size(), 3u);
  EXPECT_EQ(spm.vocabulary().tokens[static_cast<size_t>(snowman.back())], "<0x83>");
  EXPECT_EQ(spm.special_id("<|bos|>"), 1);
  EXPECT_EQ(spm.special_id("<|eos|>"), 2);
  EXPECT_TRUE(spm.special_id("<|im_end|>").has_value());

  // A recipe's tokenizer may be the .gguf; export writes the vocabulary back.
  const auto via_recipe = recipes::make_tokenizer((dir / "spm.gguf").string());
  EXPECT_EQ(via_recipe->encode(kCorpus[2]), spm.encode(kCorpus[2]));
  TransformerOptions o;
  o.vocab_size = 504;  // padded rows become unused tokens
  o.d_model = 32;
  o.n_layers = 1;
  o.n_heads = 4;
  o.n_kv_heads = 4;
  o.d_ff = 64;
  o.max_seq_len = 64;
  const Transformer model = gguf_testing::make_model(o, 5);
  export_gguf(model, HfFamily::kLlama, spm, GgufQuant::kF32, dir / "export.gguf", "spm");
  const data::SpmTokenizer back = read_gguf_spm_tokenizer(dir / "export.gguf");
  EXPECT_EQ(back.vocab_size(), 504);
  EXPECT_EQ(back.vocabulary().tokens[503], "[PAD503]");
  for (const auto& t : all) EXPECT_EQ(back.encode(t, true), spm.encode(t, true)) << t;
  write_file_atomic(dir / "job.json", nlohmann::json::array({{{"path", (dir / "export.gguf").string()}, {"texts", all}}}).dump());
  auto tok = gguf_testing::run_check("tokenize", dir / "job.json");
  ASSERT_EQ(tok.exit_code, 0) << tok.output;
  const auto exported = gguf_testing::last_json_line(tok.output);
  for (size_t i = 0; i < all.size(); ++i)
    EXPECT_EQ(exported[0][i].get<std::vector<int64_t>>(), theirs["llama_cpp"][i].get<std::vector<int64_t>>()) << all[i];
}

TEST(GgufSentencePiece, BadVocabulariesNameTheProblem) {
  data::SpmVocabulary v;
  v.tokens = {"<unk>", "a"};
  v.scores = {0.0f};
  v.types = {2, 1};
  EXPECT_BRIGADE_ERROR(data::SpmTokenizer(v, "f.gguf"), "f.gguf: 2 tokens but 1 scores and 2 token types");
  v.scores = {0.0f, -1.0f};
  EXPECT_BRIGADE_ERROR(data::SpmTokenizer(v, "f.gguf"), "no byte token <0x00>");
  for (int b = 0; b < 256; ++b) {
    char hex[8];
    std::snprintf(hex, sizeof hex, "<0x%02X>", b);
    v.tokens.emplace_back(hex);
    v.scores.push_back(0.0f);
    v.types.push_back(6);
  }
  v.types[1] = 9;
  EXPECT_BRIGADE_ERROR(data::SpmTokenizer(v, "f.gguf"), "token 1 has token type 9");
  v.types[1] = 1;
  v.bos = 9999;
  EXPECT_BRIGADE_ERROR(data::SpmTokenizer(v, "f.gguf"), "the bos token id 9999 is not a token id");
  v.bos.reset();
  const data::SpmTokenizer ok(v, "f.gguf");
  // "a" is a token; "b" falls back to its byte.
  EXPECT_EQ(ok.encode("ab"), (std::vector<int64_t>{2 + 0xE2, 2 + 0x96, 2 + 0x81, 1, 2 + 'b'}));
}

}  // namespace
}  // namespace brigade::model
