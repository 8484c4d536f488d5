// `brigade eval`: pass@k of a checkpoint or a remote OpenAI-compatible model on a
// JSONL problem set. Parses and calls: the samples go through the distillation
// generate stage's trace store (local or remote), so an interrupted evaluation
// resumes where it stopped, and distill/eval.h grades them.
//
//   OUT/config.json    what the samples were drawn with (model, sampling, problems)
//   OUT/traces/        the trace store (prompt, sample) -> completion
//   OUT/samples.jsonl  one line per sample: answer, reference, correct
//   OUT/eval.json      the scores; OUT/eval.md the Markdown table (also printed)
#include <cstdio>
#include <filesystem>
#include <iostream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/hash.h"
#include "core/log.h"
#include "distill/eval.h"
#include "distill/remote.h"
#include "launch/commands.h"
#include "recipes/build.h"
#include "trainer/checkpoint.h"

namespace brigade::launch {

namespace fs = std::filesystem;

namespace {

// What the model is: a checkpoint's resolved directory and the time its weights
// were written, or a remote server's URL, API and model name.
nlohmann::json model_identity(const EvalArgs& args) {
  if (!args.url.empty()) return {{"url", args.url}, {"api", args.api}, {"model", args.model}};
  const fs::path dir = fs::absolute(trainer::resolve_checkpoint(args.checkpoint));
  std::error_code ec;
  const auto written = fs::last_write_time(dir, ec);
  return {{"checkpoint", dir.string()},
          {"written", ec ? 0 : static_cast<int64_t>(written.time_since_epoch().count())},
          {"overrides", args.overrides}};
}

std::vector<int64_t> pass_ks(const EvalArgs& args) {
  if (!args.ks.empty()) return args.ks;
  std::vector<int64_t> ks{1};
  if (args.samples > 1) ks.push_back(args.samples);
  return ks;
}

}  // namespace

int eval_command(const EvalArgs& args) {
  BRIGADE_CHECK(args.checkpoint.empty() != args.url.empty(),
                "eval: give exactly one of --checkpoint (a brigade model) and --url (an OpenAI-compatible server)");
  BRIGADE_CHECK(args.samples >= 1, "eval: --samples must be >= 1, got ", args.samples);
  const double temperature = args.temperature >= 0 ? args.temperature : (args.samples > 1 ? 0.6 : 0.0);
  BRIGADE_CHECK(temperature > 0 || args.samples == 1, "eval: --samples ", args.samples,
                " with --temperature 0 would draw the same greedy completion ", args.samples,
                " times; give a temperature > 0");
  distill::ProblemSet set = distill::read_problem_set(args.problems, args.format, args.prompt_template);
  if (args.limit > 0 && static_cast<int64_t>(set.problems.size()) > args.limit) set.problems.resize(args.limit);
  distill::VerifyOptions grading;
  grading.answer_pattern = args.answer_pattern.empty() ? distill::default_answer_pattern(set.format) : args.answer_pattern;
  distill::validate(grading);
  const std::vector<int64_t> ks = pass_ks(args);
  for (int64_t k : ks) {
    BRIGADE_CHECK(k >= 1 && k <= args.samples, "eval: --k ", k, " needs 1 <= k <= --samples (", args.samples, ")");
  }

  distill::GenerateOptions gen;
  gen.samples = args.samples;
  gen.temperature = temperature;
  gen.top_p = args.top_p;
  gen.max_new_tokens = args.max_new_tokens;
  gen.batch_size = args.batch_size;
  gen.stop = args.stop;
  gen.seed = args.seed;

  // The trace store is a cache keyed by (problem id, sample): reusing it for another
  // model or other sampling settings would score the wrong completions.
  const fs::path out = args.out.empty() ? fs::path("runs") / ("eval-" + args.problems.stem().string()) : args.out;
  std::error_code ec;
  fs::create_directories(out, ec);
  BRIGADE_CHECK(!ec, "eval: cannot create ", out.string(), ": ", ec.message());
  const nlohmann::json config = {
      {"model", model_identity(args)},
      {"problems", fs::absolute(args.problems).string()},
      {"problems_hash", fnv1a(read_file(args.problems))},
      {"format", set.format},
      {"template", args.prompt_template},
      {"sampling", {{"temperature", gen.temperature}, {"top_p", gen.top_p}, {"max_new_tokens", gen.max_new_tokens},
                    {"stop", gen.stop}, {"seed", gen.seed}}},
  };
  const fs::path config_path = out / "config.json";
  if (fs::exists(config_path)) {
    const auto previous = nlohmann::json::parse(read_file(config_path), nullptr, false);
    BRIGADE_CHECK(previous == config, "eval: ", out.string(),
                  " holds samples drawn with another model, problem set or sampling settings (",
                  config_path.string(), "); give another --out or remove that directory");
  } else {
    write_file_atomic(config_path, config.dump(2) + "\n");
  }

  const fs::path traces = out / "traces";
  std::string label;
  if (!args.url.empty()) {
    distill::TeacherOptions remote;
    remote.url = args.url;
    remote.api = args.api;
    remote.model = args.model;
    remote.api_key_env = args.api_key_env;
    remote.concurrency = args.concurrency;
    auto tokenizer = recipes::make_tokenizer(args.tokenizer);
    const auto stats = distill::generate_traces_remote(remote, *tokenizer, set.problems, gen, traces);
    label = args.model.empty() ? args.url : args.model;
    if (stats.failed > 0) log_warn("eval: ", stats.failed, " samples failed after every retry; they count as wrong");
  } else {
    auto loaded = load_model(args.checkpoint, args.overrides);
    auto tokenizer = recipes::make_tokenizer(loaded.recipe.data.tokenizer);
    distill::generate_traces(loaded.model, *tokenizer, set.problems, gen, traces);
    label = loaded.recipe.name;
  }

  const auto score = distill::score_trace_store(traces, set.problems, args.samples, ks, grading, out / "samples.jsonl");
  nlohmann::json result = score.to_json();
  result["model"] = label;
  result["format"] = set.format;
  result["answer_pattern"] = grading.answer_pattern;
  result["temperature"] = gen.temperature;
  write_file_atomic(out / "eval.json", result.dump(2) + "\n");
  const std::string table = score.markdown(label);
  write_file_atomic(out / "eval.md", table);
  std::cout << table;
  if (score.no_answer + score.truncated + score.failed > 0) {
    std::cout << "\n" << score.no_answer << " samples without an answer, " << score.truncated
              << " cut at --max-new-tokens, " << score.failed << " failed\n";
  }
  std::cout << "results: " << (out / "eval.json").string() << ", per sample: " << (out / "samples.jsonl").string()
            << "\n";
  return 0;
}

}  // namespace brigade::launch
