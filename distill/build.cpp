#include "distill/build.h"

#include <fstream>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "data/shard.h"

namespace brigade::distill {

nlohmann::json build_sft_shard(const std::filesystem::path& accepted, const data::Tokenizer& tokenizer,
                               int64_t seq_len, const std::filesystem::path& out_dir) {
  BRIGADE_CHECK(seq_len >= 2, "build: seq_len must be >= 2, got ", seq_len);
  std::ifstream in(accepted);
  BRIGADE_CHECK(in, "build: cannot read ", accepted.string());
  std::filesystem::create_directories(out_dir);
  const int64_t row_len = seq_len + 1;
  data::ShardWriter writer(out_dir / kSftShard, static_cast<uint32_t>(tokenizer.vocab_size()), /*with_mask=*/true);
  std::vector<int64_t> row;
  std::vector<uint8_t> mask;
  int64_t documents = 0, dropped = 0, rows = 0, trained = 0, padding = 0, line_no = 0;
  auto close_row = [&]() {
    if (row.empty()) return;
    padding += row_len - static_cast<int64_t>(row.size());
    row.resize(static_cast<size_t>(row_len), tokenizer.pad_id());
    mask.resize(static_cast<size_t>(row_len), 0);
    writer.add_document(row, mask);
    row.clear();
    mask.clear();
    ++rows;
  };
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    if (line.empty()) continue;
    nlohmann::json j;
    std::string prompt, completion;
    try {
      j = nlohmann::json::parse(line);
      prompt = j.at("prompt").get<std::string>();
      completion = j.at("completion").get<std::string>();
    } catch (const nlohmann::json::exception& e) {
      BRIGADE_FAIL("build: ", accepted.string(), ":", line_no, ": ", e.what());
    }
    std::vector<int64_t> doc{tokenizer.bos_id()};
    for (int64_t id : tokenizer.encode(prompt)) doc.push_back(id);
    const size_t context = doc.size();
    for (int64_t id : tokenizer.encode(completion)) doc.push_back(id);
    doc.push_back(tokenizer.eos_id());
    if (static_cast<int64_t>(doc.size()) > row_len) {
      ++dropped;
      continue;
    }
    if (static_cast<int64_t>(row.size() + doc.size()) > row_len) close_row();
    row.insert(row.end(), doc.begin(), doc.end());
    mask.insert(mask.end(), context, 0);
    mask.insert(mask.end(), doc.size() - context, 1);
    trained += static_cast<int64_t>(doc.size() - context);
    ++documents;
  }
  close_row();
  BRIGADE_CHECK(documents > 0, "build: no accepted sample of ", accepted.string(), " fits data.seq_len + 1 = ", row_len,
                " tokens (", dropped, " too long)");
  const int64_t tokens = rows * row_len;
  // The mask must teach something and must not teach the prompts.
  BRIGADE_CHECK(trained > 0 && trained < tokens, "build: the loss mask is all ", trained == 0 ? "zeros" : "ones",
                " over ", tokens, " tokens: the template marks no ", trained == 0 ? "completion" : "context", " token");
  writer.finish();
  nlohmann::json stats = {{"documents", documents}, {"dropped_too_long", dropped}, {"rows", rows},
                          {"seq_len", seq_len},     {"tokens", tokens},           {"trained_tokens", trained},
                          {"padding_tokens", padding}, {"template", "plain"}};
  write_file_atomic(out_dir / "build.json", stats.dump(2) + "\n");
  if (dropped > 0) log_warn("build: ", dropped, " accepted samples longer than data.seq_len + 1 = ", row_len, " dropped");
  log_info("build: ", documents, " documents packed into ", rows, " rows of ", row_len, " tokens (",
           100.0 * static_cast<double>(padding) / static_cast<double>(tokens), "% padding)");
  return stats;
}

}  // namespace brigade::distill
