#include "distill/generate.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "core/error.h"
#include "core/hash.h"
#include "core/log.h"
#include "core/progress.h"
#include "data/chat.h"
#include "distill/traces.h"
#include "model/generate.h"

namespace brigade::distill {

std::vector<int64_t> prompt_tokens(const data::Tokenizer& tokenizer, const Prompt& prompt) {
  if (prompt.chat()) {
    BRIGADE_CHECK(!tokenizer.chat_template().empty(), "prompt '", prompt.id, "' is a chat prompt, but the tokenizer ",
                  tokenizer.name(), " ships no chat template to render it with");
    const data::ChatTemplate chat_template(tokenizer.chat_template(), "the chat template of " + tokenizer.name());
    return data::chat_prompt_tokens(
        tokenizer, chat_template,
        data::chat_request(nlohmann::ordered_json::parse(prompt.conversation), tokenizer, "prompt '" + prompt.id + "'"));
  }
  std::vector<int64_t> ids = data::sequence_start(tokenizer);
  for (int64_t id : tokenizer.encode(prompt.prompt)) ids.push_back(id);
  return ids;
}

uint64_t sample_seed(uint64_t seed, const std::string& prompt_id, int64_t sample) {
  // 31 bits: what every OpenAI-compatible server accepts as "seed".
  return hash_combine(hash_combine(seed, fnv1a(prompt_id)), static_cast<uint64_t>(sample)) & 0x7fffffffULL;
}

std::vector<MissingSample> missing_samples(const TraceWriter& store, const std::vector<Prompt>& prompts,
                                           int64_t samples, GenerateStats& stats) {
  std::vector<MissingSample> missing;
  for (size_t p = 0; p < prompts.size(); ++p) {
    for (int64_t s = 0; s < samples; ++s) {
      ++stats.requested;
      if (store.done().contains({prompts[p].id, s})) ++stats.already_done;
      else missing.push_back({p, s});
    }
  }
  if (stats.already_done > 0) {
    log_info("generate: ", stats.already_done, " of ", stats.requested, " samples already in ",
             store.dir().string());
  }
  return missing;
}

bool apply_stop_strings(std::string& text, const std::vector<std::string>& stop) {
  size_t cut = std::string::npos;
  for (const auto& s : stop) {
    if (!s.empty()) cut = std::min(cut, text.find(s));
  }
  if (cut == std::string::npos) return false;
  text.resize(cut);
  return true;
}

std::optional<int64_t> cut_at_stop(const data::Tokenizer& tokenizer, const std::vector<int64_t>& ids,
                                   std::string& text, const std::vector<std::string>& stop) {
  if (!apply_stop_strings(text, stop)) return std::nullopt;
  int64_t kept = 0;
  while (kept < static_cast<int64_t>(ids.size()) &&
         tokenizer.decode(std::span(ids).first(static_cast<size_t>(kept))).size() < text.size())
    ++kept;
  return kept;
}

std::string read_api_key(const std::string& name, const std::string& option) {
  const char* value = std::getenv(name.c_str());
  BRIGADE_CHECK(value != nullptr && *value != '\0', option, " names ", name,
                ", which is not set (or empty) in the environment");
  return value;
}

GenerateStats generate_traces(model::Transformer& teacher, const data::Tokenizer& tokenizer,
                              const std::vector<Prompt>& prompts, const GenerateOptions& options,
                              const std::filesystem::path& dir, bool progress) {
  TraceWriter store(dir, options.logprobs);
  GenerateStats stats;
  const std::vector<MissingSample> jobs = missing_samples(store, prompts, options.samples, stats);
  model::SamplingOptions sampling;
  sampling.max_new_tokens = options.max_new_tokens;
  sampling.temperature = options.temperature;
  sampling.top_p = options.top_p;
  sampling.logprobs = options.logprobs;
  sampling.stop_ids = {tokenizer.eos_id()};
  sampling.vocab_limit = tokenizer.vocab_size();
  const int64_t context = teacher->options().max_seq_len;

  Progress bar("generate", static_cast<int64_t>(jobs.size()), stderr_is_terminal());
  const auto start = std::chrono::steady_clock::now();
  int64_t new_tokens = 0;
  for (size_t first = 0; first < jobs.size(); first += static_cast<size_t>(options.batch_size)) {
    const size_t last = std::min(jobs.size(), first + static_cast<size_t>(options.batch_size));
    std::vector<std::vector<int64_t>> batch;
    std::vector<uint64_t> seeds;
    for (size_t j = first; j < last; ++j) {
      const auto& prompt = prompts[jobs[j].prompt];
      batch.push_back(prompt_tokens(tokenizer, prompt));
      BRIGADE_CHECK(static_cast<int64_t>(batch.back().size()) < context, "prompt '", prompt.id, "' has ",
                    batch.back().size(), " tokens: no room left in the teacher's context of ", context);
      seeds.push_back(sample_seed(options.seed, prompt.id, jobs[j].sample));
    }
    auto results = model::generate_batch(teacher, batch, sampling, seeds);
    for (size_t j = first; j < last; ++j) {
      auto& g = results[j - first];
      Trace t;
      t.prompt_id = prompts[jobs[j].prompt].id;
      t.sample = jobs[j].sample;
      t.finish_reason = g.stopped ? "stop" : "length";
      t.prompt_tokens = static_cast<int64_t>(batch[j - first].size());
      t.completion_tokens = static_cast<int64_t>(g.tokens.size());
      std::vector<int64_t> text_ids = g.tokens;
      if (g.stopped) text_ids.pop_back();  // the EOS is not text
      t.text = tokenizer.decode(text_ids);
      int64_t kept = static_cast<int64_t>(g.tokens.size());  // positions the text came from
      if (auto cut = cut_at_stop(tokenizer, text_ids, t.text, options.stop)) {
        t.finish_reason = "stop";  // the stop string is not text
        kept = t.completion_tokens = *cut;
      }
      if (options.logprobs > 0) {
        t.topk_ids = g.topk_ids.slice(0, 0, kept);
        t.topk_logprobs = g.topk_logprobs.slice(0, 0, kept);
      }
      store.append(t);
      new_tokens += t.completion_tokens;
      stats.generated += 1;
      if (t.finish_reason == "length") stats.truncated += 1;
    }
    store.flush();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    char status[64];
    std::snprintf(status, sizeof status, "%s tok/s", human_count(static_cast<double>(new_tokens) / seconds).c_str());
    if (progress) bar.tick(static_cast<int64_t>(last), status);
  }
  if (progress) bar.finish();
  return stats;
}

}  // namespace brigade::distill
