// bench_train_step: brigade's training step, timed. The brigade half of
// bench/train_step.py, which runs the same model in PyTorch eager and prints the
// ratio; see bench/README.md.
//
//   bench_train_step --recipe recipes/tiny-dense.yaml [--threads 2] [--warmup 3]
//                    [--steps 10] [--windows 5] [--set key=value ...] [--interleave]
//                    [--profile N] [--matmul-size 2048]
//
// Alone, it measures a LibTorch matmul peak, runs --warmup steps, then --windows
// timing windows of --steps Trainer::step() calls each, and prints one JSON line.
//
// With --interleave (the driver's mode) it prints the same JSON line without the
// windows once warmed up, then serves one request per stdin line until stdin closes:
//   "<steps>" (or empty: --steps)  one timing window; answers {"window": i,
//                                  "tokens_per_sec": ..., "seconds": ..., "loss": ...}
//   "matmul"                       re-measures the peak; answers {"matmul_peak_gflops": ...}
//   "profile <steps>"              profiles that many steps per op; answers like --profile
// The driver alternates these windows with its eager windows so that noise on a
// shared machine lands on both sides.
//
// With --profile N, N more steps after the warm-up run under an OpProfile and the
// first JSON line carries brigade's per-op times under "profile".
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include <unistd.h>

#include <nlohmann/json.hpp>
#include <torch/cuda.h>
#include <torch/torch.h>

#include "bench/op_profile.h"
#include "core/device.h"
#include "core/error.h"
#include "launch/commands.h"
#include "recipes/build.h"
#include "recipes/recipe.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

struct Args {
  fs::path recipe;
  std::vector<std::string> overrides;
  int64_t threads = 2;
  int64_t warmup = 3;
  int64_t steps = 10;          // training steps per timing window
  int64_t windows = 5;         // timing windows (without --interleave)
  int64_t matmul_size = 2048;  // n of the n x n x n matmul that sets the peak
  int64_t profile = 0;         // steps profiled per op after the warm-up
  bool interleave = false;
};

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double median(std::vector<double> values) {
  BRIGADE_ASSERT(!values.empty(), "median of nothing");
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// Waits for the GPU's queued work, so a host clock brackets it (nothing on the CPU).
void sync(c10::Device device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

// GFLOP/s of an n x n x n torch::matmul: the denominator of MFU. On the CPU in
// float32 on the configured threads; on a GPU in the recipe's compute dtype there.
// Median of 5 repetitions after one untimed warm-up.
double matmul_peak_gflops(int64_t n, c10::Device device, torch::ScalarType dtype) {
  torch::NoGradGuard no_grad;
  const auto on = torch::TensorOptions().device(device).dtype(device.is_cuda() ? dtype : torch::kFloat);
  auto a = torch::randn({n, n}, on);
  auto b = torch::randn({n, n}, on);
  auto c = torch::empty({n, n}, on);
  torch::matmul_out(c, a, b);
  std::vector<double> rates;
  for (int rep = 0; rep < 5; ++rep) {
    sync(device);
    const auto start = Clock::now();
    torch::matmul_out(c, a, b);
    sync(device);
    rates.push_back(2.0 * static_cast<double>(n * n * n) / seconds_since(start) / 1e9);
  }
  return median(rates);
}

struct Window {
  double tokens_per_sec = 0.0;
  double seconds = 0.0;
  double last_loss = 0.0;
};

Window run_window(brigade::trainer::Trainer& trainer, int64_t steps) {
  Window w;
  int64_t tokens = 0;
  const auto device = trainer.context().device;
  sync(device);
  const auto start = Clock::now();
  for (int64_t i = 0; i < steps; ++i) {
    const auto result = trainer.step();
    tokens += result.tokens;
    w.last_loss = result.loss;
  }
  sync(device);
  w.seconds = seconds_since(start);
  w.tokens_per_sec = static_cast<double>(tokens) / w.seconds;
  return w;
}

// What the driver needs to build the same model and optimizer in PyTorch eager.
json describe(const brigade::recipes::Recipe& r, brigade::model::Transformer& model, const Args& args,
              double peak_gflops, c10::Device device) {
  const auto& m = r.model;
  const auto& t = r.trainer;
  const auto count = model->parameter_count();
  return json{
      {"recipe", r.name},
      {"threads", args.threads},
      {"device", device.str()},
      {"gpu", device.is_cuda() ? brigade::cuda_device_name(device.index()) : std::string()},
      {"warmup_steps", args.warmup},
      {"steps_per_window", args.steps},
      {"compute_dtype", brigade::precision::to_string(r.precision.compute_dtype)},
      {"data", "real sampler over the recipe's corpus"},
      {"model",
       {{"vocab_size", m.vocab_size},
        {"d_model", m.d_model},
        {"n_layers", m.n_layers},
        {"n_heads", m.n_heads},
        {"n_kv_heads", m.kv_heads()},
        {"head_dim", m.head_size()},
        {"d_ff", m.ff_size()},
        {"max_seq_len", m.max_seq_len},
        {"rope_theta", m.rope_theta},
        {"norm_eps", m.norm_eps},
        {"tie_embeddings", m.tie_embeddings},
        {"qkv_bias", m.qkv_bias},
        {"qk_norm", m.qk_norm},
        {"init_std", m.init_std}}},
      {"trainer",
       {{"seq_len", r.data.seq_len},
        {"micro_batch_size", t.micro_batch_size},
        {"grad_accum_steps", t.grad_accum_steps},
        {"lr", t.lr},
        {"min_lr", t.min_lr},
        {"warmup_steps", t.warmup_steps},
        {"max_steps", t.max_steps},
        {"weight_decay", t.weight_decay},
        {"beta1", t.beta1},
        {"beta2", t.beta2},
        {"eps", t.eps},
        {"grad_clip", t.grad_clip},
        {"decay_norms_and_biases", t.decay_norms_and_biases},
        {"decay_embeddings", t.decay_embeddings},
        {"seed", t.seed}}},
      {"tokens_per_step", t.micro_batch_size * t.grad_accum_steps * r.data.seq_len},
      {"params_total", count.total},
      {"params_embedding", count.embedding},
      {"params_matmul", count.matmul},
      {"flops_per_token", count.train_flops_per_token(m, r.data.seq_len)},
      {"matmul_size", args.matmul_size},
      {"matmul_peak_gflops", peak_gflops},
  };
}

// Per-op times per step over `steps` profiled steps, plus their wall time.
json profile_steps(brigade::trainer::Trainer& trainer, int64_t steps) {
  std::vector<brigade::bench::OpStats> ops;
  double seconds = 0.0;
  {
    brigade::bench::OpProfile profile;
    const auto start = Clock::now();
    for (int64_t i = 0; i < steps; ++i) trainer.step();
    seconds = seconds_since(start);
    ops = profile.ops();
  }
  const double n = static_cast<double>(steps);
  json rows = json::array();
  for (const auto& op : ops) {
    rows.push_back({{"name", op.name}, {"calls", static_cast<double>(op.calls) / n},
                    {"self_ms", 1e3 * op.self_seconds / n}, {"total_ms", 1e3 * op.total_seconds / n}});
  }
  return json{{"steps", steps}, {"step_ms", 1e3 * seconds / n}, {"ops", rows}};
}

double mfu(double tokens_per_sec, const json& info) {
  return tokens_per_sec * info["flops_per_token"].get<double>() / (info["matmul_peak_gflops"].get<double>() * 1e9);
}

int run(const Args& args) {
  const auto recipe = brigade::recipes::load_recipe(args.recipe, args.overrides);
  brigade::launch::configure_allocator();  // as the brigade binary does
  brigade::launch::configure_threads(args.threads);

  // The trainer writes nothing unless a hook or checkpoint asks; the directory is
  // only a place for it to point at.
  const fs::path run_dir = fs::temp_directory_path() / ("brigade-bench-" + std::to_string(::getpid()));
  auto trainer = brigade::recipes::build_trainer(recipe, run_dir);
  trainer->model()->train();
  const c10::Device device = trainer->context().device;
  const auto dtype = brigade::precision::to_scalar_type(recipe.precision.compute_dtype);
  const double peak = matmul_peak_gflops(args.matmul_size, device, dtype);
  json info = describe(recipe, trainer->model(), args, peak, device);

  for (int64_t i = 0; i < args.warmup; ++i) trainer->step();
  if (args.profile > 0) info["profile"] = profile_steps(*trainer, args.profile);

  if (args.interleave) {
    std::cout << info.dump() << std::endl;
    std::string line;
    for (int64_t i = 0; std::getline(std::cin, line);) {
      if (line == "matmul") {  // the driver re-measures the peak every round
        std::cout << json{{"matmul_peak_gflops", matmul_peak_gflops(args.matmul_size, device, dtype)}}.dump() << std::endl;
        continue;
      }
      if (line.rfind("profile ", 0) == 0) {
        std::cout << profile_steps(*trainer, std::stoll(line.substr(8))).dump() << std::endl;
        continue;
      }
      const int64_t steps = line.empty() ? args.steps : std::stoll(line);
      BRIGADE_CHECK(steps > 0, "window ", i, ": step count must be positive, got '", line, "'");
      const Window w = run_window(*trainer, steps);
      std::cout << json{{"window", i}, {"steps", steps}, {"tokens_per_sec", w.tokens_per_sec},
                        {"seconds", w.seconds}, {"loss", w.last_loss}}.dump()
                << std::endl;
      ++i;
    }
  } else {
    std::vector<double> rates;
    for (int64_t i = 0; i < args.windows; ++i) rates.push_back(run_window(*trainer, args.steps).tokens_per_sec);
    info["tokens_per_sec"] = rates;
    info["median_tokens_per_sec"] = median(rates);
    info["mfu"] = mfu(median(rates), info);
    std::cout << info.dump() << std::endl;
  }
  std::error_code ignored;
  fs::remove_all(run_dir, ignored);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Time brigade's training step on a recipe (bench/README.md)"};
  Args args;
  app.add_option("--recipe", args.recipe, "Recipe YAML file")->required();
  app.add_option("--threads", args.threads, "Intra-op CPU threads")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--warmup", args.warmup, "Untimed steps before timing")->capture_default_str()->check(CLI::NonNegativeNumber);
  app.add_option("--steps", args.steps, "Training steps per timing window")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--windows", args.windows, "Timing windows (without --interleave)")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--matmul-size", args.matmul_size, "n of the n^3 fp32 matmul that measures the peak")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--set", args.overrides, "Override a recipe key: --set trainer.micro_batch_size=8 (repeatable)")
      ->type_name("KEY=VALUE")
      ->allow_extra_args(false);
  app.add_option("--profile", args.profile, "Steps to profile per op after the warm-up (0 = none)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--interleave", args.interleave, "Run one window per stdin line (driven by bench/train_step.py)");
  CLI11_PARSE(app, argc, argv);
  try {
    return run(args);
  } catch (const std::exception& e) {
    std::cerr << "bench_train_step: " << e.what() << std::endl;
    return 1;
  }
}
