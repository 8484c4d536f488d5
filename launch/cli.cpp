#include <CLI/CLI.hpp>

#include <c10/util/Exception.h>

#include <cstdio>
#include <iostream>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "data/prepare.h"
#include "data/tokenizer.h"
#include "launch/commands.h"
#include "launch/report.h"
#include "recipes/build.h"
#include "launch/launcher.h"
#include "parallel/communicator.h"
#include "recipes/recipe.h"

namespace brigade::launch {
namespace {

int g_error_rank = -1;

// Prints the error as one line (naming the rank in a multi-rank job). A rank that
// fails alone must not leave the others waiting in a collective: with MPI up, it
// takes the whole job down (MPI_Abort), so they exit too.
int fail(const std::string& message) {
  std::fflush(stdout);
  if (g_error_rank >= 0) std::fprintf(stderr, "\nbrigade: error (rank %d): %s\n", g_error_rank, message.c_str());
  else std::fprintf(stderr, "\nbrigade: error: %s\n", message.c_str());
  std::fflush(stderr);
  if (parallel::mpi_initialized()) parallel::mpi_abort(1);
  return 1;
}

std::string first_line(const std::string& text) {
  auto nl = text.find('\n');
  return nl == std::string::npos ? text : text.substr(0, nl);
}

void add_set_option(CLI::App* app, std::vector<std::string>& overrides) {
  app->add_option("--set", overrides, "Override a recipe key: --set trainer.lr=1e-3 (repeatable)")
      ->type_name("KEY=VALUE")
      ->allow_extra_args(false);
}

}  // namespace

void set_error_rank(int rank) { g_error_rank = rank; }

int run_cli(int argc, char** argv) {
  CLI::App app{"brigade: train and distil language models from YAML recipes"};
  app.require_subcommand(1);
  bool verbose = false;
  app.add_flag("-v,--verbose", verbose, "Debug logging");

  TrainArgs train;
  auto* train_cmd = app.add_subcommand("train", "Train a model from a recipe");
  train_cmd->add_option("recipe", train.recipe, "Recipe YAML file")->required();
  add_set_option(train_cmd, train.overrides);
  train_cmd->add_option("--run-dir", train.run_dir, "Run directory (default runs/<recipe name>)");
  train_cmd->add_flag("--resume", train.resume, "Continue from the run directory's latest checkpoint");

  GenerateArgs gen;
  auto* gen_cmd = app.add_subcommand("generate", "Generate text from a checkpoint");
  gen_cmd->add_option("--checkpoint", gen.checkpoint, "Step directory, checkpoints directory or run directory")->required();
  gen_cmd->add_option("--prompt", gen.prompt, "Prompt text")->required();
  gen_cmd->add_option("--max-new-tokens", gen.max_new_tokens, "Tokens to generate")->capture_default_str();
  gen_cmd->add_option("--temperature", gen.temperature, "0 = greedy")->capture_default_str();
  gen_cmd->add_option("--top-k", gen.top_k, "Keep the k most likely tokens (0 = off)")->capture_default_str();
  gen_cmd->add_option("--top-p", gen.top_p, "Nucleus sampling mass (1 = off)")->capture_default_str();
  gen_cmd->add_option("--seed", gen.seed, "Sampling seed")->capture_default_str();
  gen_cmd->add_flag("--raw", gen.raw, "Do not stop at the end-of-sequence token");
  gen_cmd->add_option("--speculative", gen.speculative,
                      "mtp: speculative decoding drafted by the model's MTP modules (greedy; same tokens, fewer forwards)")
      ->check(CLI::IsMember({"mtp"}));
  add_set_option(gen_cmd, gen.overrides);

  DemoArgs demo;
  auto* demo_cmd = app.add_subcommand(
      "demo", "The built-in default: distil an MoE teacher into a dense student (recipes/distill-arith.yaml), end to end");
  add_set_option(demo_cmd, demo.overrides);
  demo_cmd->add_option("--run-dir", demo.run_dir, "Run directory (default runs/distill-arith)");
  demo_cmd->add_option("--samples", demo.samples, "Student generations to print at the end")->capture_default_str();
  demo_cmd->add_option("--eval-problems", demo.eval_problems, "Held-out problems to score (default: the recipe's distill.eval.problems)");

  DistillArgs distill;
  auto* distill_cmd = app.add_subcommand("distill", "Distil a teacher into a student: generate, verify, build, train, eval");
  distill_cmd->add_option("recipe", distill.recipe, "Distillation recipe YAML file")->required();
  add_set_option(distill_cmd, distill.overrides);
  distill_cmd->add_option("--run-dir", distill.run_dir, "Run directory (default runs/<recipe name>)");
  distill_cmd->add_option("--stage", distill.stage, "Run one stage: teacher, generate, verify, build, train, onpolicy or eval");

  EvalArgs eval;
  auto* eval_cmd = app.add_subcommand(
      "eval", "pass@k of a checkpoint or an OpenAI-compatible server on a JSONL problem set (GSM8K, MATH, exact)");
  eval_cmd->add_option("--checkpoint", eval.checkpoint, "A brigade model: step, checkpoints or run directory");
  eval_cmd->add_option("--url", eval.url, "Or an OpenAI-compatible server's base URL ending in /v1");
  eval_cmd->add_option("--api", eval.api, "Remote: completions or chat")
      ->check(CLI::IsMember({"completions", "chat"}))->capture_default_str();
  eval_cmd->add_option("--model", eval.model, "Remote: the model name sent in requests");
  eval_cmd->add_option("--api-key-env", eval.api_key_env, "Remote: environment variable holding the API key");
  eval_cmd->add_option("--concurrency", eval.concurrency, "Remote: requests in flight")->capture_default_str();
  eval_cmd->add_option("--tokenizer", eval.tokenizer, "Remote: tokenizer counting completion tokens (byte, tokenizer.json, .gguf)")
      ->capture_default_str();
  eval_cmd->add_option("--problems", eval.problems, "JSONL problem set: gsm8k {question, answer}, math {problem, solution|answer} or {prompt, answer}")
      ->required();
  eval_cmd->add_option("--format", eval.format, "auto, gsm8k, math or prompt")
      ->check(CLI::IsMember({"auto", "gsm8k", "math", "prompt"}))->capture_default_str();
  eval_cmd->add_option("--template", eval.prompt_template, "The prompt sent, {problem} replaced by the question")
      ->capture_default_str();
  eval_cmd->add_option("--answer", eval.answer_pattern, "How answers are found: boxed, gsm8k, exact or a regex with a group (default: the format's)");
  eval_cmd->add_option("--samples,-n", eval.samples, "Samples per problem (n)")->capture_default_str();
  eval_cmd->add_option("--k", eval.ks, "pass@k to report, each <= n (default: 1 and n)")->delimiter(',');
  eval_cmd->add_option("--temperature", eval.temperature, "Sampling temperature (default: 0 for one sample, 0.6 for more)");
  eval_cmd->add_option("--top-p", eval.top_p, "Nucleus sampling mass")->capture_default_str();
  eval_cmd->add_option("--max-new-tokens", eval.max_new_tokens, "Tokens per completion")->capture_default_str();
  eval_cmd->add_option("--batch-size", eval.batch_size, "Local: sequences decoded together")->capture_default_str();
  eval_cmd->add_option("--stop", eval.stop, "Stop string (repeatable)");
  eval_cmd->add_option("--seed", eval.seed, "Sampling seed")->capture_default_str();
  eval_cmd->add_option("--limit", eval.limit, "Score only the first N problems");
  eval_cmd->add_option("--out", eval.out, "Output directory (default runs/eval-<problem file stem>)");
  add_set_option(eval_cmd, eval.overrides);

  ServeArgs serve;
  auto* serve_cmd = app.add_subcommand("serve", "Serve a checkpoint over the OpenAI completions/chat API (a remote teacher)");
  serve_cmd->add_option("--checkpoint", serve.checkpoint, "Step directory, checkpoints directory or run directory")->required();
  serve_cmd->add_option("--host", serve.host, "IPv4 address to listen on")->capture_default_str();
  serve_cmd->add_option("--port", serve.port, "TCP port (0: any free port)")->capture_default_str();
  serve_cmd->add_option("--port-file", serve.port_file, "Write the port here once listening");
  serve_cmd->add_option("--api-key-env", serve.api_key_env, "Require the key in this environment variable (Bearer token)");
  serve_cmd->add_option("--model-name", serve.model_name, "The model name reported (default: the recipe's name)");
  serve_cmd->add_option("--max-batch", serve.max_batch, "Requests decoded together (continuous batching)")->capture_default_str();
  serve_cmd->add_option("--max-queue", serve.max_queue, "Requests waiting for a batch row; more get HTTP 503")->capture_default_str();
  serve_cmd->add_option("--max-tokens", serve.max_tokens, "Largest max_tokens accepted (0: the model's context)")->capture_default_str();
  serve_cmd->add_option("--max-body-bytes", serve.max_body_bytes, "Larger request bodies get HTTP 400")->capture_default_str();
  add_set_option(serve_cmd, serve.overrides);

  ExportArgs exp;
  auto* export_cmd = app.add_subcommand("export", "Export a checkpoint as a Hugging Face directory or a GGUF file (llama.cpp, Ollama)");
  export_cmd->add_option("--checkpoint", exp.checkpoint, "Step directory, checkpoints directory or run directory")->required();
  export_cmd->add_option("--format", exp.format, "hf or gguf")->required();
  export_cmd->add_option("--out", exp.out, "The new directory (hf) or file (gguf)")->required();
  export_cmd->add_option("--quant", exp.quant, "gguf: f32, f16 (default), q8_0, q6_k, q5_k_m, q4_k_m (llama.cpp's mixes) or q4_0");
  export_cmd->add_option("--dtype", exp.dtype, "hf: float32, bfloat16 or float16")->capture_default_str();
  export_cmd->add_option("--max-shard-mb", exp.max_shard_mb, "hf: shard the weights above this many MiB")->capture_default_str();
  export_cmd->add_option("--name", exp.name, "Model name in the metadata (default: the recipe's name)");
  add_set_option(export_cmd, exp.overrides);

  ReportArgs report;
  auto* report_cmd = app.add_subcommand(
      "report", "One self-contained HTML page of runs: curves overlaid, MoE balance, distillation tables");
  report_cmd->add_option("runs", report.runs, "Run directories (training or distillation)")->required();
  report_cmd->add_option("--out", report.out, "The HTML file to write")->capture_default_str();

  PlanArgs plan;
  auto* plan_cmd = app.add_subcommand(
      "plan", "Parameters, FLOPs per token, memory per GPU and GPU-hours of a recipe, without running it");
  plan_cmd->add_option("recipe", plan.recipe, "Recipe YAML file")->required();
  add_set_option(plan_cmd, plan.overrides);
  plan_cmd->add_option("--gpus", plan.gpus, "GPUs in the job (data parallel over all of them)")->capture_default_str();
  plan_cmd->add_option("--gpu", plan.gpu, "h100, h200 or h800")->capture_default_str();
  plan_cmd->add_option("--tokens", plan.tokens, "Training tokens, e.g. 14.8T (default: max_steps x global batch)");
  plan_cmd->add_option("--mfu", plan.mfu, "Model FLOPs utilisation for the GPU-hours")->capture_default_str();

  LaunchArgs launch;
  auto* launch_cmd = app.add_subcommand("launch", "Start N ranks through mpirun: brigade launch -n 2 -- train RECIPE");
  launch_cmd->add_option("-n", launch.ranks, "Number of ranks")->required();
  launch_cmd->add_option("--hostfile", launch.hostfile, "Open MPI hostfile (default: all ranks on this machine)");
  launch_cmd->add_option("command", launch.command, "The brigade subcommand and its arguments, after --")->required();

  auto* recipe_cmd = app.add_subcommand("recipe", "Inspect recipes");
  recipe_cmd->require_subcommand(1);
  std::filesystem::path show_path;
  std::vector<std::string> show_overrides;
  auto* show_cmd = recipe_cmd->add_subcommand("show", "Print the effective recipe (defaults + file + --set)");
  show_cmd->add_option("recipe", show_path, "Recipe YAML file")->required();
  add_set_option(show_cmd, show_overrides);
  auto* keys_cmd = recipe_cmd->add_subcommand("keys", "Print every recipe key as a Markdown table");
  std::vector<std::string> keys_overrides;
  add_set_option(keys_cmd, keys_overrides);

  auto* data_cmd = app.add_subcommand("data", "Prepare training data");
  data_cmd->require_subcommand(1);
  data::PrepareOptions prep;
  std::string prep_tokenizer = "byte";
  std::vector<std::string> prep_overrides;
  auto* prep_cmd = data_cmd->add_subcommand("prepare", "Tokenize text or JSONL files into token shards");
  prep_cmd->add_option("--input", prep.inputs, "Input .txt or .jsonl files")->required();
  prep_cmd->add_option("--out", prep.output_dir, "Output directory for shard_XXXXX.bin")->required();
  prep_cmd->add_option("--tokenizer", prep_tokenizer, "byte, a tokenizer.json (or its directory), or a .gguf")->capture_default_str();
  prep_cmd->add_option("--text-field", prep.text_field, "JSONL field with the document text")->capture_default_str();
  prep_cmd->add_option("--prompt-field", prep.prompt_field, "JSONL prompt field (masked out of the loss)");
  prep_cmd->add_option("--completion-field", prep.completion_field, "JSONL completion field (trained on)");
  prep_cmd->add_flag("--chat", prep.chat,
                     "JSONL lines with \"messages\" are conversations: rendered with the chat template, loss on the assistant turns");
  prep_cmd->add_option("--messages-field", prep.messages_field, "--chat: JSONL field with the messages")->capture_default_str();
  std::filesystem::path prep_chat_template;
  prep_cmd->add_option("--chat-template", prep_chat_template, "--chat: a Jinja template file (default: the tokenizer's own)");
  prep_cmd->add_option("--tokens-per-shard", prep.tokens_per_shard, "Tokens per shard file")->capture_default_str();
  add_set_option(prep_cmd, prep_overrides);
  TokenizerTrainArgs tok;
  auto* tok_cmd = data_cmd->add_subcommand("tokenizer", "Train a byte-level BPE tokenizer (Hugging Face tokenizer.json) on text");
  tok_cmd->add_option("--input", tok.inputs, "Input .txt or .jsonl files")->required();
  tok_cmd->add_option("--out", tok.out, "Output directory (tokenizer.json, tokenizer_config.json)")->required();
  tok_cmd->add_option("--vocab-size", tok.vocab_size, "Tokens in all: 256 bytes + merges + 3 specials")->capture_default_str();
  tok_cmd->add_option("--text-field", tok.text_field, "JSONL field with the text")->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (verbose) set_log_level(LogLevel::kDebug);
  configure_allocator();

  try {
    if (*train_cmd) {
      const int rc = train_command(train);
      parallel::mpi_finalize();
      return rc;
    }
    if (*gen_cmd) return generate_command(gen);
    if (*distill_cmd) return distill_command(distill);
    if (*serve_cmd) return serve_command(serve);
    if (*eval_cmd) return eval_command(eval);
    if (*export_cmd) return export_command(exp);
    if (*launch_cmd) return launch_command(launch);
    if (*plan_cmd) return plan_command(plan);
    if (*report_cmd) return report_command(report);
    if (*demo_cmd) return demo_command(demo);
    if (*show_cmd) {
      std::cout << recipes::dump_recipe(recipes::load_recipe(show_path, show_overrides));
      return 0;
    }
    if (*keys_cmd) {
      std::cout << recipes::schema_markdown();
      return 0;
    }
    if (*tok_cmd) return tokenizer_train_command(tok);
    if (*prep_cmd) {
      BRIGADE_CHECK(prep_overrides.empty(), "data prepare takes no recipe, so --set has nothing to override");
      BRIGADE_CHECK(prep.tokens_per_shard > 0, "--tokens-per-shard must be positive");
      if (!prep_chat_template.empty()) prep.chat_template = read_file(prep_chat_template);
      auto tokenizer = recipes::make_tokenizer(prep_tokenizer);
      auto report = data::prepare_shards(prep, *tokenizer);
      std::cout << "wrote " << report.shards.size() << " shard(s), " << report.documents << " documents, "
                << report.tokens << " tokens to " << prep.output_dir.string() << "\n";
      return 0;
    }
  } catch (const Error& e) {
    return fail(first_line(e.message()));
  } catch (const c10::Error& e) {
    return fail(first_line(e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return fail(first_line(e.what()));
  }
  return 0;
}

}  // namespace brigade::launch
