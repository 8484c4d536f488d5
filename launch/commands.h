// The `brigade` subcommands. Each returns the process exit code; errors propagate
// as brigade::Error to run_cli(), which prints one line and returns non-zero.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "model/transformer.h"
#include "recipes/recipe.h"

namespace brigade::launch {

// Entry point of the executable.
int run_cli(int argc, char** argv);

struct TrainArgs {
  std::filesystem::path recipe;
  std::vector<std::string> overrides;
  std::filesystem::path run_dir;  // empty: runs/<recipe name>
  bool resume = false;
};
// Exit 0 at max_steps (or stop_after); kExitRequeue after SIGTERM or SIGUSR1 stopped
// the run at a step boundary with a checkpoint (docs/distributed.md, "Preemption").
int train_command(const TrainArgs& args);
// The same for a recipe already loaded (validated here again): the distillation
// pipeline trains its teacher and student through it.
int train_recipe(const recipes::Recipe& recipe, const std::filesystem::path& run_dir, bool resume);
// EX_TEMPFAIL: "try again later": a job script requeues on it.
constexpr int kExitRequeue = 75;

struct GenerateArgs {
  std::filesystem::path checkpoint;
  std::string prompt;
  std::vector<std::string> overrides;
  int64_t max_new_tokens = 128;
  double temperature = 0.0;
  int64_t top_k = 0;
  double top_p = 1.0;
  uint64_t seed = 0;
  bool raw = false;  // do not stop at the end-of-sequence token
  std::string speculative;  // "" or "mtp": draft with the model's MTP modules (greedy)
};
int generate_command(const GenerateArgs& args);

struct DemoArgs {
  std::vector<std::string> overrides;
  std::filesystem::path run_dir;
  int64_t samples = 2;         // student generations printed
  int64_t eval_problems = 0;   // > 0: held-out problems scored (distill.eval.problems)
};
int demo_command(const DemoArgs& args);

struct DistillArgs {
  std::filesystem::path recipe;
  std::vector<std::string> overrides;
  std::filesystem::path run_dir;  // empty: runs/<recipe name>
  std::string stage;              // empty: every stage in order
};
int distill_command(const DistillArgs& args);

struct EvalArgs {
  std::filesystem::path checkpoint;    // a brigade model (step, checkpoints or run directory), or:
  std::string url;                     // an OpenAI-compatible server's base URL ending in /v1
  std::string api = "completions";     // remote: completions | chat
  std::string model;                   // remote: the request's "model"
  std::string api_key_env;             // remote: variable holding the API key
  int64_t concurrency = 8;             // remote: requests in flight
  std::string tokenizer = "byte";      // remote: counts completion tokens when the server does not
  std::filesystem::path problems;      // JSONL problem set (distill/eval.h)
  std::string format = "auto";         // auto | gsm8k | math | prompt
  std::string prompt_template = "{problem}";
  std::string answer_pattern;          // empty: the format's (gsm8k, boxed, exact); or a regex
  int64_t samples = 1;                 // n per problem
  std::vector<int64_t> ks;             // pass@k reported (empty: 1 and n)
  double temperature = -1;             // < 0: 0 (greedy) for one sample, 0.6 for more
  double top_p = 1.0;
  int64_t max_new_tokens = 512;
  int64_t batch_size = 32;
  std::vector<std::string> stop;
  uint64_t seed = 1;
  int64_t limit = 0;                   // > 0: the first N problems
  std::filesystem::path out;           // empty: runs/eval-<problem file stem>
  std::vector<std::string> overrides;  // --set on the checkpoint's recipe
};
// Writes OUT/eval.json, OUT/eval.md, OUT/samples.jsonl; resumes from OUT/traces.
int eval_command(const EvalArgs& args);

struct ServeArgs {
  std::filesystem::path checkpoint;
  std::string host = "127.0.0.1";
  int port = 8000;                   // 0: any free port (see port_file)
  std::filesystem::path port_file;   // written with the port once listening
  std::string api_key_env;           // require this variable's value as a Bearer token
  std::string model_name;            // the "model" reported (default: the recipe's name)
  std::vector<std::string> overrides;  // --set on the checkpoint's recipe (trainer.device=cpu, say)
  int64_t max_batch = 32;            // requests decoded together (continuous batching)
  int64_t max_queue = 64;            // requests waiting for a batch row; more get HTTP 503
  int64_t max_tokens = 0;            // largest max_tokens accepted (0: the model's context)
  int64_t max_body_bytes = 8 << 20;  // larger request bodies get HTTP 400
};
// Runs until SIGINT or SIGTERM.
int serve_command(const ServeArgs& args);

struct ExportArgs {
  std::filesystem::path checkpoint;  // step, checkpoints or run directory
  std::vector<std::string> overrides;
  std::string format;                // hf | gguf
  std::filesystem::path out;         // a new directory (hf) or file (gguf)
  std::string quant;                 // gguf: f32 | f16 | q8_0 | q4_0 | q6_k | q5_k_m | q4_k_m (empty: f16)
  std::string dtype = "float32";     // hf: float32 | bfloat16 | float16
  int64_t max_shard_mb = 5000;       // hf: weights above this are sharded
  std::string name;                  // empty: the recipe's name
};
// Writes a dense llama/qwen2/qwen3 checkpoint for Hugging Face or llama.cpp.
int export_command(const ExportArgs& args);

struct PlanArgs {
  std::filesystem::path recipe;
  std::vector<std::string> overrides;
  int64_t gpus = 1;
  std::string gpu = "h100";
  std::string tokens;  // "" = the recipe's; a number with an optional K, M, B or T suffix
  double mfu = 0.4;
};
int plan_command(const PlanArgs& args);
// "14.8T" -> 1.48e13 (suffixes K, M, B, T; none: the number itself); an Error naming `what` otherwise.
double parse_count(const std::string& text, const std::string& what);

struct TokenizerTrainArgs {
  std::vector<std::filesystem::path> inputs;  // .txt (whole file) or .jsonl (text_field per line)
  std::filesystem::path out;                  // directory for tokenizer.json + tokenizer_config.json
  int64_t vocab_size = 8192;
  std::string text_field = "text";
};
// Trains a byte-level BPE (Qwen2 pre-tokenizer, ChatML specials and template).
int tokenizer_train_command(const TokenizerTrainArgs& args);

// runs/<recipe name>, or `requested` when given.
std::filesystem::path default_run_dir(const recipes::Recipe& recipe, const std::filesystem::path& requested);

// A checkpoint's own recipe (plus overrides) and its weights.
struct LoadedModel {
  recipes::Recipe recipe;
  model::Transformer model{nullptr};
};
// `overrides` after one that clears model.init_from: what parsing a checkpoint's
// own recipe.yaml needs.
std::vector<std::string> checkpoint_overrides(const std::vector<std::string>& overrides);
// The model is placed on the recipe's trainer.device (plan_placement's checks).
LoadedModel load_model(const std::filesystem::path& checkpoint, const std::vector<std::string>& overrides);

// Finds a shipped recipe ("recipes/tiny-dense.yaml") from the working directory or
// next to the executable (build/brigade -> ../recipes).
std::filesystem::path find_shipped_recipe(const std::string& relative);

// Keeps freed memory in the process: training frees and re-allocates the same large
// buffers every step, and glibc's default of unmapping them makes every step
// fault them back in as zeroed pages (~100k faults per small-dense step).
void configure_allocator();

// In a multi-rank job, error lines name the rank that failed.
void set_error_rank(int rank);

// Sets intra-op threads (0 = all cores) and logs the choice.
void configure_threads(int64_t threads);

}  // namespace brigade::launch
