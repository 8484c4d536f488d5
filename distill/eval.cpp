#include "distill/eval.h"

#include <algorithm>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/fs.h"
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
      const bool ok = grade_completion(tokenizer.decode(tokens), *prompts[rows[r].prompt].answer, verify).correct;
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

// ---------------------------------------------------------------- brigade eval

double pass_at_k(int64_t n, int64_t c, int64_t k) {
  BRIGADE_CHECK(n >= 1 && k >= 1 && k <= n && c >= 0 && c <= n, "pass@k needs 1 <= k <= n and 0 <= c <= n, got n=",
                n, " c=", c, " k=", k);
  if (n - c < k) return 1.0;
  // C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
  double all_wrong = 1.0;
  for (int64_t i = n - c + 1; i <= n; ++i) all_wrong *= 1.0 - static_cast<double>(k) / static_cast<double>(i);
  return 1.0 - all_wrong;
}

std::string default_answer_pattern(const std::string& format) {
  if (format == "gsm8k") return "gsm8k";
  if (format == "math") return "boxed";
  if (format == "prompt") return "exact";
  BRIGADE_FAIL("unknown problem format '", format, "' (known: gsm8k, math, prompt)");
}

namespace {

std::string format_of(const nlohmann::json& line) {
  if (line.contains("question")) return "gsm8k";
  if (line.contains("problem")) return "math";
  if (line.contains("prompt")) return "prompt";
  return "";
}

// A string field of a problem line; an Error naming file, line and key otherwise.
std::string text_field(const nlohmann::json& line, const char* key, const std::string& where) {
  auto it = line.find(key);
  BRIGADE_CHECK(it != line.end(), where, ": no \"", key, "\"");
  BRIGADE_CHECK(it->is_string() || it->is_number(), where, ": \"", key, "\" must be a string");
  return it->is_string() ? it->get<std::string>() : it->dump();
}

std::string fill_template(const std::string& prompt_template, const std::string& problem) {
  std::string out = prompt_template;
  const std::string key = "{problem}";
  for (size_t at = out.find(key); at != std::string::npos; at = out.find(key, at + problem.size())) {
    out.replace(at, key.size(), problem);
  }
  return out;
}

}  // namespace

ProblemSet read_problem_set(const std::filesystem::path& file, const std::string& format,
                            const std::string& prompt_template) {
  BRIGADE_CHECK(format == "auto" || format == "gsm8k" || format == "math" || format == "prompt",
                "unknown problem format '", format, "' (known: auto, gsm8k, math, prompt)");
  BRIGADE_CHECK(prompt_template.find("{problem}") != std::string::npos, "the prompt template \"", prompt_template,
                "\" has no {problem}");
  std::ifstream in(file, std::ios::binary);
  BRIGADE_CHECK(in.good(), "cannot read the problem set ", file.string());
  ProblemSet set;
  set.format = format == "auto" ? "" : format;
  std::set<std::string> ids;
  std::string text;
  for (int64_t number = 1; std::getline(in, text); ++number) {
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = file.string() + ":" + std::to_string(number);
    nlohmann::json line;
    try {
      line = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      BRIGADE_FAIL(where, ": not valid JSON (", e.what(), ")");
    }
    BRIGADE_CHECK(line.is_object(), where, ": a problem is a JSON object");
    const std::string found = format_of(line);
    BRIGADE_CHECK(!found.empty(), where, ": no \"question\" (gsm8k), \"problem\" (math) or \"prompt\" key");
    if (set.format.empty()) set.format = found;
    BRIGADE_CHECK(found == set.format, where, ": a ", found, " problem in a ", set.format,
                  " problem set (formats are told apart by the question key: question, problem, prompt)");
    Prompt p;
    if (auto id = line.find("id"); id != line.end() && !id->is_null()) {
      BRIGADE_CHECK(id->is_string() || id->is_number_integer(), where, ": \"id\" must be a string or an integer");
      p.id = id->is_string() ? id->get<std::string>() : id->dump();
    } else {
      p.id = std::to_string(number);
    }
    BRIGADE_CHECK(!p.id.empty() && ids.insert(p.id).second, where, ": id \"", p.id, "\" is empty or repeated");
    std::string question, reference;
    if (set.format == "gsm8k") {
      question = text_field(line, "question", where);
      const std::string answer = text_field(line, "answer", where);
      const auto ref = extract_answer(answer, VerifyOptions{.answer_pattern = "gsm8k"});
      BRIGADE_CHECK(ref.has_value(), where, ": the answer has no \"####\" and no number");
      reference = *ref;
    } else if (set.format == "math") {
      question = text_field(line, "problem", where);
      if (line.contains("answer")) {
        reference = text_field(line, "answer", where);
      } else {
        const auto ref = extract_answer(text_field(line, "solution", where), VerifyOptions{});
        BRIGADE_CHECK(ref.has_value(), where, ": the solution has no \\boxed{} answer (or give \"answer\")");
        reference = *ref;
      }
    } else {
      question = text_field(line, "prompt", where);
      reference = text_field(line, "answer", where);
    }
    BRIGADE_CHECK(!question.empty(), where, ": the question is empty");
    p.prompt = fill_template(prompt_template, question);
    p.answer = reference;
    set.problems.push_back(std::move(p));
  }
  BRIGADE_CHECK(!set.problems.empty(), "the problem set ", file.string(), " has no problems");
  return set;
}

nlohmann::json ProblemSetScore::to_json() const {
  nlohmann::json pass_json = nlohmann::json::object();
  for (const auto& [k, value] : pass) pass_json["pass@" + std::to_string(k)] = value;
  return {{"problems", problems}, {"samples_per_problem", samples}, {"pass", pass_json},
          {"no_answer", no_answer}, {"truncated", truncated}, {"failed", failed}};
}

std::string ProblemSetScore::markdown(const std::string& label) const {
  std::ostringstream out;
  out << "| model | problems | samples |";
  for (const auto& [k, value] : pass) out << " pass@" << k << " |";
  out << "\n|---|---|---|";
  for (size_t i = 0; i < pass.size(); ++i) out << "---|";
  out << "\n| " << label << " | " << problems << " | " << samples << " |";
  out.setf(std::ios::fixed);
  out.precision(1);
  for (const auto& [k, value] : pass) out << " " << 100.0 * value << "% |";
  out << "\n";
  return out.str();
}

ProblemSetScore score_trace_store(const std::filesystem::path& traces_dir, const std::vector<Prompt>& problems,
                                  int64_t n, const std::vector<int64_t>& ks, const VerifyOptions& grading,
                                  const std::filesystem::path& samples_out) {
  BRIGADE_CHECK(n >= 1, "eval: samples per problem must be >= 1, got ", n);
  validate(grading);
  std::vector<int64_t> sorted_ks = ks;
  std::sort(sorted_ks.begin(), sorted_ks.end());
  sorted_ks.erase(std::unique(sorted_ks.begin(), sorted_ks.end()), sorted_ks.end());
  for (int64_t k : sorted_ks) {
    BRIGADE_CHECK(k >= 1 && k <= n, "eval: pass@", k, " needs 1 <= k <= ", n, " (the samples per problem)");
  }
  const TraceReader reader(traces_dir);
  std::map<std::pair<std::string, int64_t>, const Trace*> by_key;
  for (const Trace& t : reader.traces()) by_key[{t.prompt_id, t.sample}] = &t;

  ProblemSetScore score;
  score.problems = static_cast<int64_t>(problems.size());
  score.samples = n;
  std::string lines;
  for (const Prompt& p : problems) {
    BRIGADE_CHECK(p.answer.has_value(), "eval: problem '", p.id, "' has no reference answer");
    int64_t correct = 0;
    for (int64_t s = 0; s < n; ++s) {
      auto it = by_key.find({p.id, s});
      const Trace* trace = it == by_key.end() ? nullptr : it->second;
      Grade grade;
      if (trace == nullptr || trace->failed()) {
        ++score.failed;
      } else {
        grade = grade_completion(trace->text, *p.answer, grading);
        if (trace->finish_reason == "length") ++score.truncated;
        if (!grade.answer) ++score.no_answer;
      }
      correct += grade.correct ? 1 : 0;
      if (!samples_out.empty()) {
        nlohmann::json line = {{"prompt_id", p.id}, {"sample", s}, {"reference", *p.answer},
                               {"answer", grade.answer ? nlohmann::json(*grade.answer) : nlohmann::json(nullptr)},
                               {"correct", grade.correct},
                               {"finish_reason", trace ? trace->finish_reason : std::string("missing")}};
        lines += line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
      }
    }
    score.correct.push_back(correct);
  }
  for (int64_t k : sorted_ks) {
    double sum = 0;
    for (int64_t c : score.correct) sum += pass_at_k(n, c, k);
    score.pass.emplace_back(k, problems.empty() ? 0.0 : sum / static_cast<double>(problems.size()));
  }
  if (!samples_out.empty()) write_file_atomic(samples_out, lines);
  return score;
}

}  // namespace brigade::distill
