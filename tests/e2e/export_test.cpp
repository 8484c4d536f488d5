// `brigade export` and `brigade data tokenizer` end to end: a trained run exported as
// GGUF and as a Hugging Face directory, run by llama.cpp and transformers with their
// own tokenizers, must continue a prompt exactly as `brigade generate` does.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "data/bpe.h"
#include "tests/model/gguf_testing.h"
#include "tests/testing.h"

namespace brigade {
namespace {

namespace fs = std::filesystem;
using testing::run_brigade;
using testing::run_command;
using testing::TempDir;

const std::string kScript = std::string(BRIGADE_SOURCE_DIR) + "/tests/e2e/export_check.py";
const std::string kTrain = testing::kSmallModelOverrides +
                           " --set trainer.micro_batch_size=8 --set trainer.warmup_steps=5 --set trainer.eval_batches=1"
                           " --set trainer.threads=1 --set trainer.max_steps=150 --set trainer.eval_every=150"
                           " --set trainer.checkpoint_every=150 --set trainer.log_every=50";

// Runs the reference side; nullopt (and the caller skips) when the package is missing.
std::optional<nlohmann::json> reference(const std::string& args) {
  auto r = run_command(std::string(BRIGADE_VENV_PYTHON) + " " + kScript + " " + args + " 2>/dev/null");
  if (r.exit_code == 3) return std::nullopt;
  EXPECT_EQ(r.exit_code, 0) << r.output;
  if (r.exit_code != 0) return nlohmann::json();
  try {
    return model::gguf_testing::last_json_line(r.output);  // libraries may print before it
  } catch (const nlohmann::json::exception&) {
    ADD_FAILURE() << "not JSON: " << r.output;
    return nlohmann::json();
  }
}

std::string quote(const std::string& s) { return "'" + s + "'"; }

TEST(CliExport, LlamaCppAndTransformersContinueLikeBrigade) {
  TempDir dir;
  const std::string recipe = std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-dense.yaml";
  auto train = run_brigade("train " + recipe + kTrain + " --run-dir " + (dir / "run").string());
  ASSERT_EQ(train.exit_code, 0) << train.output;
  const std::string prompt = "Problem: 12+35";
  auto gen = run_brigade("generate --checkpoint " + (dir / "run").string() + " --prompt " + quote(prompt) +
                         " --max-new-tokens 24");
  ASSERT_EQ(gen.exit_code, 0) << gen.output;
  ASSERT_EQ(gen.output.rfind(prompt, 0), 0u) << gen.output;
  const std::string ours = gen.output.substr(prompt.size(), gen.output.size() - prompt.size() - 1);  // minus "\n"
  ASSERT_FALSE(ours.empty());

  for (const char* quant : {"f32", "q8_0"}) {
    const fs::path gguf = dir / (std::string("model-") + quant + ".gguf");
    auto exp = run_brigade("export --checkpoint " + (dir / "run").string() + " --format gguf --quant " + quant +
                           " --out " + gguf.string());
    ASSERT_EQ(exp.exit_code, 0) << exp.output;
    EXPECT_TRUE(fs::exists(gguf));
    auto llama = reference("llama " + gguf.string() + " " + quote(prompt) + " 24");
    if (!llama) GTEST_SKIP() << "llama-cpp-python missing from .venv";
    ASSERT_TRUE(llama->contains("ids")) << llama->dump();
    EXPECT_EQ((*llama)["ids"][0], 256) << "llama.cpp starts the prompt with <|bos|> as brigade does";
    if (std::string(quant) == "f32") EXPECT_EQ((*llama)["text"].get<std::string>(), ours) << "llama.cpp " << quant;
    else std::cout << "[ measured ] q8_0 continuation: " << (*llama)["text"] << " brigade: " << ours << "\n";
  }

  const fs::path hf = dir / "hf";
  auto exp = run_brigade("export --checkpoint " + (dir / "run").string() + " --format hf --out " + hf.string());
  ASSERT_EQ(exp.exit_code, 0) << exp.output;
  auto transformers = reference("hf " + hf.string() + " " + quote(prompt) + " 24");
  if (!transformers) GTEST_SKIP() << "transformers missing from .venv";
  ASSERT_TRUE(transformers->contains("ids")) << transformers->dump();
  EXPECT_EQ((*transformers)["ids"][0], 256) << "the tokenizer.json post-processor adds <|bos|>";
  EXPECT_EQ((*transformers)["text"].get<std::string>(), ours);
}

TEST(CliExport, RefusesWhatItCannotWrite) {
  TempDir dir;
  const std::string moe = std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-moe.yaml";
  auto train = run_brigade("train " + moe + testing::kSmallModelOverrides +
                           " --set trainer.max_steps=1 --set trainer.warmup_steps=0 --set trainer.micro_batch_size=2"
                           " --set trainer.eval_every=1 --set trainer.eval_batches=1 --run-dir " +
                           (dir / "moe").string());
  ASSERT_EQ(train.exit_code, 0) << train.output;
  const std::string ck = " --checkpoint " + (dir / "moe").string();
  auto r = run_brigade("export" + ck + " --format hf --out " + (dir / "x").string());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("has no Hugging Face equivalent: model.moe.score_function is not softmax"), std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(dir / "x"));
  r = run_brigade("export" + ck + " --format onnx --out " + (dir / "x").string());
  EXPECT_NE(r.output.find("--format must be hf or gguf"), std::string::npos) << r.output;
  r = run_brigade("export" + ck + " --format gguf --quant q5_k --out " + (dir / "x.gguf").string());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_FALSE(fs::exists(dir / "x.gguf"));
  // Nothing half-written is left beside the target.
  for (const auto& e : fs::directory_iterator(dir.path()))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
}

TEST(CliTokenizer, TrainsABpeThatPreparesDataAndTravelsInTheGguf) {
  TempDir dir;
  std::string corpus;
  const char* lines[] = {"The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
                         "東京は日本の首都です。", "こんにちは、世界！", "北京是中国的首都。", "안녕하세요 세계",
                         "Numbers 12345 and 3.14159 🙂👍🏽", "   indented\n\n\ttabs and  spaces"};
  for (int i = 0; i < 60; ++i) corpus += std::string(lines[i % 8]) + " " + std::to_string(i) + "\n\n";
  write_file_atomic(dir / "corpus.txt", corpus);
  auto tok = run_brigade("data tokenizer --input " + (dir / "corpus.txt").string() + " --vocab-size 400 --out " +
                         (dir / "tok").string());
  ASSERT_EQ(tok.exit_code, 0) << tok.output;
  EXPECT_NE(tok.output.find("trained a byte-level BPE of 400 tokens"), std::string::npos) << tok.output;
  const auto bpe = data::BpeTokenizer::load(dir / "tok" / "tokenizer.json");
  EXPECT_EQ(bpe.vocab_size(), 400);
  const std::string sample = "東京 fox 12345 🙂 안녕";
  EXPECT_LT(bpe.encode(sample).size(), sample.size());  // merges learned
  EXPECT_EQ(bpe.decode(bpe.encode(sample)), sample);
  auto again = run_brigade("data tokenizer --input " + (dir / "corpus.txt").string() + " --out " + (dir / "tok").string());
  EXPECT_NE(again.output.find("already exists"), std::string::npos) << again.output;

  auto prep = run_brigade("data prepare --input " + (dir / "corpus.txt").string() + " --out " + (dir / "shards").string() +
                          " --tokenizer " + (dir / "tok").string());
  ASSERT_EQ(prep.exit_code, 0) << prep.output;
  const std::string recipe = std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-dense.yaml";
  auto train = run_brigade("train " + recipe + testing::kSmallModelOverrides + " --set model.vocab_size=400" +
                           " --set data.tokenizer=" + (dir / "tok").string() + " --set data.source=shards" +
                           " --set data.shards=[" + (dir / "shards" / "shard_00000.bin").string() + "]" +
                           " --set data.eval_fraction=0.2 --set data.seq_len=16 --set trainer.max_steps=2" +
                           " --set trainer.warmup_steps=0 --set trainer.micro_batch_size=2 --set trainer.eval_every=2" +
                           " --set trainer.eval_batches=1 --run-dir " + (dir / "run").string());
  ASSERT_EQ(train.exit_code, 0) << train.output;
  const fs::path gguf = dir / "bpe.gguf";
  auto exp = run_brigade("export --checkpoint " + (dir / "run").string() + " --format gguf --quant f32 --out " +
                         gguf.string());
  ASSERT_EQ(exp.exit_code, 0) << exp.output;

  // llama.cpp tokenizes with the vocabulary, merges and pre-tokenizer in the file.
  std::vector<std::string> texts(std::begin(lines), std::end(lines));
  texts.push_back(sample);
  write_file_atomic(dir / "texts.json", nlohmann::json(texts).dump());
  auto ids = reference("tokenize " + gguf.string() + " " + (dir / "texts.json").string());
  if (!ids) GTEST_SKIP() << "llama-cpp-python missing from .venv";
  ASSERT_EQ(ids->size(), texts.size()) << ids->dump();
  for (size_t i = 0; i < texts.size(); ++i)
    EXPECT_EQ((*ids)[i].get<std::vector<int64_t>>(), bpe.encode(texts[i])) << texts[i];
}

}  // namespace
}  // namespace brigade
