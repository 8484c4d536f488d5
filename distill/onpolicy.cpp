#include "distill/onpolicy.h"

#include <cmath>
#include <sstream>
#include <unordered_map>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "core/progress.h"
#include "distill/generate.h"
#include "distill/traces.h"

namespace brigade::distill {

std::vector<Prompt> round_prompts(const std::vector<Prompt>& prompts, int64_t round, int64_t count) {
  BRIGADE_CHECK(!prompts.empty(), "on-policy: no prompts");
  std::vector<Prompt> out;
  const auto n = static_cast<int64_t>(prompts.size());
  const int64_t take = std::min(count, n);
  for (int64_t i = 0; i < take; ++i) out.push_back(prompts[static_cast<size_t>((round * count + i) % n)]);
  return out;
}

std::vector<SampleToScore> samples_to_score(const data::Tokenizer& tokenizer, const std::vector<Prompt>& prompts,
                                            const TraceReader& samples, const TraceWriter& out, ScoreStats& stats) {
  std::unordered_map<std::string, const Prompt*> by_id;
  for (const Prompt& p : prompts) {
    BRIGADE_CHECK(!p.chat(), "on-policy: prompt '", p.id, "' is a chat prompt; on-policy distillation takes text ",
                  "prompts only (chat documents get no KD targets)");
    by_id.emplace(p.id, &p);
  }
  std::vector<SampleToScore> todo;
  for (const Trace& t : samples.traces()) {
    if (out.done().contains({t.prompt_id, t.sample})) {
      ++stats.already_done;
      continue;
    }
    auto it = by_id.find(t.prompt_id);
    if (t.failed() || t.finish_reason != "stop" || it == by_id.end()) {
      ++stats.skipped;
      continue;
    }
    todo.push_back({&t, prompt_tokens(tokenizer, *it->second), tokenizer.encode(t.text)});
  }
  return todo;
}

ScoreStats score_with_teacher(model::Transformer& teacher, const data::Tokenizer& tokenizer,
                              const std::vector<Prompt>& prompts, const std::filesystem::path& samples_dir, int64_t k,
                              int64_t batch_size, const std::filesystem::path& out_dir) {
  BRIGADE_CHECK(k >= 1 && batch_size >= 1, "on-policy scoring needs k >= 1 and batch_size >= 1");
  const int64_t vocab = std::min<int64_t>(tokenizer.vocab_size(), teacher->options().vocab_size);
  k = std::min(k, vocab);
  const TraceReader samples(samples_dir);
  TraceWriter out(out_dir, k);
  ScoreStats stats;
  std::vector<SampleToScore> jobs;
  for (auto& job : samples_to_score(tokenizer, prompts, samples, out, stats)) {
    if (static_cast<int64_t>(job.context.size() + job.completion.size()) > teacher->options().max_seq_len) {
      ++stats.skipped;
      continue;
    }
    jobs.push_back(std::move(job));
  }
  teacher->eval();
  torch::NoGradGuard no_grad;
  const auto device = teacher->embed_tokens->weight.device();
  Progress bar("on-policy: teacher scoring", static_cast<int64_t>(jobs.size()), stderr_is_terminal());
  for (size_t first = 0; first < jobs.size(); first += static_cast<size_t>(batch_size)) {
    const size_t last = std::min(jobs.size(), first + static_cast<size_t>(batch_size));
    size_t longest = 0;
    for (size_t j = first; j < last; ++j) longest = std::max(longest, jobs[j].context.size() + jobs[j].completion.size());
    // Right padding: causal attention keeps it out of every real position.
    torch::Tensor ids = torch::full({static_cast<int64_t>(last - first), static_cast<int64_t>(longest)},
                                    tokenizer.eos_id(), torch::kLong);
    for (size_t j = first; j < last; ++j) {
      auto row = ids[static_cast<int64_t>(j - first)];
      int64_t at = 0;
      for (int64_t id : jobs[j].context) row[at++] = id;
      for (int64_t id : jobs[j].completion) row[at++] = id;
    }
    const torch::Tensor logits = teacher->forward(ids.to(device)).to(torch::kCPU, torch::kFloat);  // [rows, T, V]
    for (size_t j = first; j < last; ++j) {
      const SampleToScore& job = jobs[j];
      const auto p = static_cast<int64_t>(job.context.size());
      const auto n = static_cast<int64_t>(job.completion.size());
      // Position p - 1 + t predicts completion token t (t < n) and, at t = n, the EOS.
      const torch::Tensor at = logits[static_cast<int64_t>(j - first)].narrow(0, p - 1, n + 1).narrow(1, 0, vocab);
      const auto [values, indices] = torch::log_softmax(at, -1).topk(k, -1);
      Trace t = *job.trace;
      t.topk_ids = indices.to(torch::kInt32).contiguous();
      t.topk_logprobs = values.contiguous();
      out.append(t);
      ++stats.scored;
    }
    out.flush();
    bar.tick(static_cast<int64_t>(last), "");
  }
  bar.finish();
  return stats;
}

int64_t write_scored_samples(const std::filesystem::path& scored_dir, const std::vector<Prompt>& prompts,
                             const std::filesystem::path& out_file) {
  std::unordered_map<std::string, const Prompt*> by_id;
  for (const Prompt& p : prompts) by_id.emplace(p.id, &p);
  const TraceReader reader(scored_dir);
  std::string lines;
  int64_t written = 0;
  for (int64_t i = 0; i < reader.size(); ++i) {
    const Trace& t = reader.traces()[static_cast<size_t>(i)];
    auto it = by_id.find(t.prompt_id);
    if (it == by_id.end() || !t.topk_ids.defined()) continue;
    const TopkRange& range = reader.topk_range(i);
    nlohmann::json line = {{"prompt_id", t.prompt_id}, {"sample", t.sample}, {"prompt", it->second->prompt},
                           {"completion", t.text},     {"answer", it->second->answer.value_or("")},
                           {"topk", {{"offset", range.offset}, {"positions", range.positions}}}};
    lines += line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
    ++written;
  }
  write_file_atomic(out_file, lines);
  return written;
}

int64_t add_teacher_samples(const std::filesystem::path& accepted, const std::vector<Prompt>& prompts,
                            const data::Tokenizer& tokenizer, const std::filesystem::path& dir) {
  std::unordered_map<std::string, const Prompt*> wanted;
  for (const Prompt& p : prompts) wanted.emplace(p.id, &p);
  TraceWriter store(dir, 0);
  int64_t added = 0;
  std::istringstream in(read_file(accepted));
  int64_t line_number = 0;
  for (std::string line; std::getline(in, line);) {
    ++line_number;
    if (line.empty()) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      BRIGADE_FAIL(accepted.string(), ":", line_number, ": not JSON: ", e.what());
    }
    Trace t;
    t.prompt_id = j.at("prompt_id").get<std::string>();
    t.sample = j.at("sample").get<int64_t>();
    auto it = wanted.find(t.prompt_id);
    if (it == wanted.end() || store.done().count({t.prompt_id, t.sample}) > 0) continue;
    t.text = j.at("completion").get<std::string>();
    t.finish_reason = "stop";
    t.prompt_tokens = static_cast<int64_t>(data::sequence_start(tokenizer).size() + tokenizer.encode(it->second->prompt).size());
    t.completion_tokens = static_cast<int64_t>(tokenizer.encode(t.text).size());
    store.append(t);
    ++added;
  }
  store.flush();
  return added;
}

}  // namespace brigade::distill
