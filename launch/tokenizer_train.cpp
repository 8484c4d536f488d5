// `brigade data tokenizer`: trains a byte-level BPE vocabulary on text files and
// writes it as a Hugging Face tokenizer.json (data/bpe.h).
#include <fstream>
#include <iostream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "data/bpe.h"
#include "launch/commands.h"

namespace brigade::launch {
namespace fs = std::filesystem;

int tokenizer_train_command(const TokenizerTrainArgs& args) {
  BRIGADE_CHECK(!args.inputs.empty(), "data tokenizer: --input names no files");
  BRIGADE_CHECK(!fs::exists(args.out / "tokenizer.json"), "data tokenizer: ", (args.out / "tokenizer.json").string(),
                " already exists (brigade does not overwrite it)");
  std::vector<std::string> corpus;
  for (const auto& path : args.inputs) {
    const std::string ext = path.extension().string();
    BRIGADE_CHECK(ext == ".txt" || ext == ".jsonl", "data tokenizer: ", path.string(), ": unknown extension '", ext,
                  "' (expected .txt or .jsonl)");
    if (ext == ".txt") {
      corpus.push_back(read_file(path));
      continue;
    }
    std::ifstream in(path, std::ios::binary);
    BRIGADE_CHECK(in.good(), "data tokenizer: cannot open ", path.string());
    std::string line;
    for (int64_t number = 1; std::getline(in, line); ++number) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        BRIGADE_FAIL("data tokenizer: ", path.string(), ":", number, ": not valid JSON: ", e.what());
      }
      BRIGADE_CHECK(j.is_object() && j.contains(args.text_field) && j[args.text_field].is_string(), "data tokenizer: ",
                    path.string(), ":", number, ": no string field '", args.text_field, "'");
      corpus.push_back(j[args.text_field].get<std::string>());
    }
  }
  const std::vector<std::string> specials = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
  const data::BpeTokenizer tokenizer = data::train_bpe(corpus, args.vocab_size, specials);
  fs::create_directories(args.out);
  tokenizer.save(args.out, data::chat_template_jinja("chatml"));
  std::cout << "trained a byte-level BPE of " << tokenizer.vocab_size() << " tokens (" << tokenizer.merges().size()
            << " merges) on " << corpus.size() << " documents: " << (args.out / "tokenizer.json").string() << "\n";
  return 0;
}

}  // namespace brigade::launch
