#include "distill/build.h"

#include <algorithm>
#include <fstream>
#include <memory>
#include <optional>

#include <torch/torch.h>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "data/chat.h"
#include "data/shard.h"
#include "distill/traces.h"
#include "model/safetensors.h"

namespace brigade::distill {

namespace {

// The teacher's top-k laid out along the shard (see build.h), grown row by row.
class KdLayout {
 public:
  KdLayout(const std::filesystem::path& sidecar, bool by_index) : sidecar_(sidecar), by_index_(by_index) {}
  int64_t k() const { return sidecar_.k(); }

  // A document of `context` tokens then `completion` tokens + EOS at shard position
  // `start`: places the teacher's records when they align, else counts it. The
  // records cover the completion and the EOS (a local teacher) or the completion
  // only (servers report no logprobs for the end of a sample; the EOS position then
  // has no KD target).
  void place(int64_t start, int64_t context, int64_t completion, TopkRange range) {
    if (by_index_) {
      // Another tokenizer's records (ULD): the t-th teacher token's distribution goes
      // with the student's t-th position, as far as both go.
      range.positions = std::min(range.positions, completion + 1);
    } else if (range.positions != completion + 1 && range.positions != completion) {
      ++misaligned_;
      return;
    }
    const auto [ids, logprobs] = sidecar_.read(range);
    const auto ids_c = ids.contiguous();
    const auto lp_c = logprobs.contiguous();
    const int64_t first = start + context - 1, k = sidecar_.k();
    grow(first + range.positions);
    std::copy_n(ids_c.data_ptr<int32_t>(), range.positions * k, ids_.begin() + first * k);
    std::copy_n(lp_c.data_ptr<float>(), range.positions * k, logprobs_.begin() + first * k);
    std::fill_n(valid_.begin() + first, range.positions, uint8_t{1});
    ++documents_;
  }

  // Writes the layout for a shard of `tokens` positions (atomically) and adds the
  // counts to `stats`.
  void write(const std::filesystem::path& path, int64_t tokens, nlohmann::json& stats) {
    grow(tokens);
    const int64_t k = sidecar_.k();
    auto ids = torch::from_blob(ids_.data(), {tokens, k}, torch::kInt32);
    auto logprobs = torch::from_blob(logprobs_.data(), {tokens, k}, torch::kFloat32);
    auto valid = torch::from_blob(valid_.data(), {tokens}, torch::kUInt8);
    const auto temporary = path.string() + ".tmp";
    model::save_safetensors(temporary, {{"ids", ids}, {"logprobs", logprobs}, {"valid", valid}},
                            {{"k", std::to_string(k)}, {"shard", kSftShard}});
    std::filesystem::rename(temporary, path);
    stats["kd_k"] = k;
    stats["kd_documents"] = documents_;
    stats["kd_misaligned"] = misaligned_;
    if (misaligned_ > 0) {
      log_warn("build: ", misaligned_, " documents whose completion does not re-tokenize into the teacher's ",
               "tokens get no KD targets (SFT only)");
    }
  }

 private:
  void grow(int64_t tokens) {
    const auto n = static_cast<size_t>(tokens);
    if (valid_.size() >= n) return;
    ids_.resize(n * static_cast<size_t>(sidecar_.k()), 0);
    logprobs_.resize(n * static_cast<size_t>(sidecar_.k()), 0.0f);
    valid_.resize(n, 0);
  }

  TopkSidecar sidecar_;
  bool by_index_ = false;
  std::vector<int32_t> ids_;     // [tokens, k]
  std::vector<float> logprobs_;  // [tokens, k]
  std::vector<uint8_t> valid_;   // [tokens]
  int64_t documents_ = 0, misaligned_ = 0;
};

}  // namespace

nlohmann::json build_sft_shard(const std::filesystem::path& accepted, const data::Tokenizer& tokenizer,
                               int64_t seq_len, const std::filesystem::path& out_dir,
                               const std::filesystem::path& topk_sidecar, bool align_by_index) {
  BRIGADE_CHECK(seq_len >= 2, "build: seq_len must be >= 2, got ", seq_len);
  std::ifstream in(accepted);
  BRIGADE_CHECK(in, "build: cannot read ", accepted.string());
  std::filesystem::create_directories(out_dir);
  const int64_t row_len = seq_len + 1;
  data::ShardWriter writer(out_dir / kSftShard, static_cast<uint32_t>(tokenizer.vocab_size()), /*with_mask=*/true);
  std::vector<int64_t> row;
  std::vector<uint8_t> mask;
  std::unique_ptr<KdLayout> kd;  // created at the first line that carries "topk"
  std::filesystem::remove(out_dir / kKdTargets);  // a stale one from an earlier build
  int64_t documents = 0, dropped = 0, rows = 0, trained = 0, padding = 0, line_no = 0, chat_documents = 0;
  std::optional<data::ChatTemplate> chat_template;  // the student's, at the first chat prompt
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
    std::string prompt, completion, conversation;
    std::optional<TopkRange> topk;
    try {
      j = nlohmann::json::parse(line);
      prompt = j.at("prompt").get<std::string>();
      completion = j.at("completion").get<std::string>();
      if (j.contains("conversation")) conversation = j["conversation"].get<std::string>();
      if (j.contains("topk")) topk = TopkRange{j["topk"].at("offset").get<int64_t>(), j["topk"].at("positions").get<int64_t>()};
    } catch (const nlohmann::json::exception& e) {
      BRIGADE_FAIL("build: ", accepted.string(), ":", line_no, ": ", e.what());
    }
    std::vector<int64_t> doc;
    std::vector<uint8_t> doc_mask;
    size_t context = 0;
    if (!conversation.empty()) {
      // A chat prompt: the conversation with the teacher's answer as the assistant's
      // turn, in the student's chat format; only that turn is trained. An EOS (not
      // trained) closes it, so packed rows split documents there when the tokenizer
      // adds no BOS.
      if (!chat_template) {
        BRIGADE_CHECK(!tokenizer.chat_template().empty(), "build: ", accepted.string(), ":", line_no,
                      ": a chat prompt, but the student's tokenizer ", tokenizer.name(), " ships no chat template");
        chat_template.emplace(tokenizer.chat_template(), "the chat template of " + tokenizer.name());
      }
      auto request = nlohmann::ordered_json::parse(conversation);
      request["messages"].push_back({{"role", "assistant"}, {"content", completion}});
      const data::ChatTokens chat = data::tokenize_chat(
          tokenizer, data::chat_segments(*chat_template, data::chat_request(request, tokenizer, accepted.string() + ":" +
                                                                                          std::to_string(line_no))));
      doc = chat.tokens;
      doc_mask = chat.mask;
      doc.push_back(tokenizer.eos_id());
      doc_mask.push_back(0);
      ++chat_documents;
      topk.reset();  // the teacher's records do not line up with a re-rendered turn: SFT only
    } else {
      doc = data::sequence_start(tokenizer);
      for (int64_t id : tokenizer.encode(prompt)) doc.push_back(id);
      context = doc.size();
      for (int64_t id : tokenizer.encode(completion)) doc.push_back(id);
      doc.push_back(tokenizer.eos_id());
      doc_mask.assign(context, 0);
      doc_mask.resize(doc.size(), 1);
    }
    if (static_cast<int64_t>(doc.size()) > row_len) {
      ++dropped;
      continue;
    }
    if (static_cast<int64_t>(row.size() + doc.size()) > row_len) close_row();
    if (topk && !topk_sidecar.empty()) {
      if (!kd) kd = std::make_unique<KdLayout>(topk_sidecar, align_by_index);
      kd->place(rows * row_len + static_cast<int64_t>(row.size()), static_cast<int64_t>(context),
                static_cast<int64_t>(doc.size() - context) - 1, *topk);
    }
    row.insert(row.end(), doc.begin(), doc.end());
    mask.insert(mask.end(), doc_mask.begin(), doc_mask.end());
    trained += std::count(doc_mask.begin(), doc_mask.end(), uint8_t{1});
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
                          {"padding_tokens", padding},
                          {"template", chat_documents == 0           ? "plain"
                                       : chat_documents == documents ? "chat"
                                                                     : "mixed"},
                          {"chat_documents", chat_documents}};
  if (kd) kd->write(out_dir / kKdTargets, tokens, stats);
  write_file_atomic(out_dir / "build.json", stats.dump(2) + "\n");
  if (dropped > 0) log_warn("build: ", dropped, " accepted samples longer than data.seq_len + 1 = ", row_len, " dropped");
  log_info("build: ", documents, " documents packed into ", rows, " rows of ", row_len, " tokens (",
           100.0 * static_cast<double>(padding) / static_cast<double>(tokens), "% padding)");
  return stats;
}

}  // namespace brigade::distill
