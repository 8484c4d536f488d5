#include "distill/eval.h"

#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "distill/generate.h"
#include "distill/verify.h"
#include "model/generate.h"

namespace brigade::distill {

nlohmann::json PassAtK::to_json() const {
  return {{"problems", problems}, {"k", k}, {"pass@1", pass1}, {"pass@k", passk}};
}

PassAtK evaluate_pass_at_k(model::Transformer& model, const data::Tokenizer& tokenizer,
                           const std::vector<Prompt>& prompts, const EvalOptions& options,
                           const VerifyOptions& verify, int64_t max_new_tokens, int64_t batch_size,
                           const std::string& label) {
  for (const auto& p : prompts) {
    BRIGADE_CHECK(p.answer.has_value(), "eval: prompt '", p.id, "' has no reference answer");
  }
  PassAtK result;
  result.problems = static_cast<int64_t>(prompts.size());
  result.k = options.k;
  if (prompts.empty()) return result;
  model::SamplingOptions greedy;
  greedy.max_new_tokens = max_new_tokens;
  greedy.stop_ids = {tokenizer.eos_id()};
  greedy.vocab_limit = tokenizer.vocab_size();
  model::SamplingOptions sampled = greedy;
  sampled.temperature = options.temperature;

  // Rows: every problem once greedy, then k sampled times.
  struct Row {
    size_t prompt;
    int64_t sample;  // -1: greedy
  };
  std::vector<Row> rows;
  for (size_t p = 0; p < prompts.size(); ++p) rows.push_back({p, -1});
  for (size_t p = 0; p < prompts.size(); ++p) {
    for (int64_t s = 0; s < options.k; ++s) rows.push_back({p, s});
  }
  std::vector<bool> greedy_ok(prompts.size(), false), any_ok(prompts.size(), false);
  Progress bar("eval " + label, static_cast<int64_t>(rows.size()), stderr_is_terminal());
  for (size_t first = 0; first < rows.size();) {
    const size_t last = std::min(rows.size(), first + static_cast<size_t>(batch_size));
    // A batch never mixes greedy and sampled rows (they differ in options).
    const bool is_greedy = rows[first].sample < 0;
    size_t end = first;
    while (end < last && (rows[end].sample < 0) == is_greedy) ++end;
    std::vector<std::vector<int64_t>> batch;
    std::vector<uint64_t> seeds;
    for (size_t r = first; r < end; ++r) {
      batch.push_back(prompt_tokens(tokenizer, prompts[rows[r].prompt]));
      seeds.push_back(sample_seed(0x65766131ULL, prompts[rows[r].prompt].id, rows[r].sample));
    }
    auto out = model::generate_batch(model, batch, is_greedy ? greedy : sampled, seeds);
    for (size_t r = first; r < end; ++r) {
      auto tokens = out[r - first].tokens;
      if (out[r - first].stopped) tokens.pop_back();
      const auto answer = extract_answer(tokenizer.decode(tokens), verify);
      const auto& p = prompts[rows[r].prompt];
      const bool ok = answer && answers_match(*answer, *p.answer, verify.numeric_tolerance);
      if (rows[r].sample < 0) greedy_ok[rows[r].prompt] = ok;
      else if (ok) any_ok[rows[r].prompt] = true;
    }
    bar.tick(static_cast<int64_t>(end), "");
    first = end;
  }
  bar.finish();
  int64_t solved1 = 0, solvedk = 0;
  for (size_t p = 0; p < prompts.size(); ++p) {
    solved1 += greedy_ok[p] ? 1 : 0;
    solvedk += any_ok[p] ? 1 : 0;
  }
  result.pass1 = static_cast<double>(solved1) / static_cast<double>(prompts.size());
  result.passk = static_cast<double>(solvedk) / static_cast<double>(prompts.size());
  return result;
}

}  // namespace brigade::distill
