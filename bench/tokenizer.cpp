// bench_tokenizer: brigade's byte-level BPE encode speed, one thread. Reads a
// tokenizer.json and a JSON list of documents, encodes every document in turn, and
// prints one JSON line: bytes, tokens, an id checksum (for bench/tokenizer.py to
// compare with Hugging Face), and MB/s per repetition, warm (the word cache filled by
// the previous repetition) and cold (a freshly loaded tokenizer, empty cache; the
// load itself is not timed), with their medians.
//
// With --train VOCAB it also times train_bpe on the documents (train_seconds).
//
//   bench_tokenizer TOKENIZER_JSON DOCS_JSON [--reps 5] [--train 16000]
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "data/bpe.h"

namespace {

using brigade::data::BpeTokenizer;

struct Pass {
  double seconds = 0;
  uint64_t tokens = 0;
  uint64_t checksum = 0;
};

Pass encode_all(const BpeTokenizer& tok, const std::vector<std::string>& docs) {
  Pass p;
  const auto start = std::chrono::steady_clock::now();
  for (const std::string& doc : docs) {
    std::vector<int64_t> ids = tok.encode(doc);
    p.tokens += ids.size();
    for (int64_t id : ids) p.checksum = p.checksum * 1000003u + static_cast<uint64_t>(id);
  }
  p.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return p;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"brigade BPE tokenizer encode benchmark"};
  std::string tokenizer_json, docs_json;
  int reps = 5;
  int64_t train_vocab = 0;
  app.add_option("tokenizer", tokenizer_json, "tokenizer.json")->required();
  app.add_option("docs", docs_json, "JSON list of documents")->required();
  app.add_option("--reps", reps, "timed repetitions")->check(CLI::PositiveNumber);
  app.add_option("--train", train_vocab, "also time train_bpe to this vocabulary size");
  CLI11_PARSE(app, argc, argv);

  try {
    const auto docs = nlohmann::json::parse(brigade::read_file(docs_json)).get<std::vector<std::string>>();
    uint64_t bytes = 0;
    for (const auto& d : docs) bytes += d.size();

    std::vector<double> cold, warm;
    Pass last;
    for (int r = 0; r < reps; ++r) {
      BpeTokenizer fresh = BpeTokenizer::load(tokenizer_json);
      Pass c = encode_all(fresh, docs);
      Pass w = encode_all(fresh, docs);
      cold.push_back(static_cast<double>(bytes) / 1e6 / c.seconds);
      warm.push_back(static_cast<double>(bytes) / 1e6 / w.seconds);
      last = w;
    }
    nlohmann::json out = {{"bytes", bytes},          {"documents", docs.size()},   {"tokens", last.tokens},
                          {"checksum", last.checksum}, {"cold_mb_s", cold},          {"warm_mb_s", warm},
                          {"cold_mb_s_median", median(cold)}, {"warm_mb_s_median", median(warm)}};
    if (train_vocab > 0) {
      const auto start = std::chrono::steady_clock::now();
      BpeTokenizer trained = brigade::data::train_bpe(docs, train_vocab, {"<|endoftext|>"});
      out["train_seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      out["train_vocab"] = trained.vocab_size();
    }
    std::printf("%s\n", out.dump().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_tokenizer: %s\n", e.what());
    return 1;
  }
  return 0;
}
