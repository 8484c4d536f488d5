// bench_cross_entropy: the trainer's chunked cross-entropy (trainer/cross_entropy.h)
// against the plain form it replaced, cross_entropy(logits.float(), targets), on the
// same bfloat16 [tokens, vocab] logits: median forward + backward time, and the peak
// memory of each side measured in a fresh process of its own (this binary run again
// with --side), so one side's freed memory cannot hide the other's peak. Peak memory
// is the process's maximum resident set on the CPU, the caching allocator's peak on
// a GPU; "logits only" is the same process stopping after it made the logits and
// their gradient's room, the baseline both sides share.
//
//   bench_cross_entropy [--tokens 8192] [--vocab 32768] [--reps 5] [--threads 2] [--device cpu|cuda]
#include <CLI/CLI.hpp>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "core/device.h"
#include "trainer/cross_entropy.h"

namespace {

using namespace brigade;

struct Settings {
  int64_t tokens = 8192, vocab = 32768;
  int reps = 5, threads = 2;
  std::string device = "cpu";
};

// One side in this process: the median seconds of forward + backward; prints the
// peak bytes (GPU) for the parent to read.
double run_side(const Settings& s, const std::string& side) {
  at::set_num_threads(s.threads);
  const c10::Device device(s.device);
  torch::manual_seed(1);
  // Made in bfloat16 directly: a float32 temporary would set the baseline's peak.
  auto logits = torch::randn({s.tokens, s.vocab}, torch::TensorOptions().dtype(torch::kBFloat16).device(device))
                    .mul_(2)
                    .requires_grad_(true);
  auto targets = torch::randint(0, s.vocab, {s.tokens}, torch::TensorOptions().dtype(torch::kLong).device(device));
  logits.mutable_grad() = torch::zeros_like(logits);  // the gradient's room, in both sides and the baseline
  if (side == "baseline") return 0.0;
  auto once = [&] {
    torch::Tensor loss;
    if (side == "plain") {
      loss = torch::nn::functional::cross_entropy(
          logits.to(torch::kFloat), targets,
          torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum));
    } else {
      loss = trainer::chunked_cross_entropy_sum(logits, targets, -100);
    }
    loss.backward();
    if (device.is_cuda()) loss.item<float>();  // waits for the device
  };
  once();  // warm-up
  std::vector<double> times;
  for (int i = 0; i < s.reps; ++i) {
    const auto start = std::chrono::steady_clock::now();
    once();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

struct Measured {
  double seconds = 0.0;
  double peak_mib = 0.0;
};

// Runs `side` in a child process (this binary) and reads its time and peak memory.
Measured measure(const Settings& s, const std::string& side) {
  int out[2];
  if (pipe(out) != 0) std::perror("pipe");
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(out[1], STDOUT_FILENO);
    close(out[0]);
    const std::vector<std::string> args = {"/proc/self/exe", "--side", side, "--tokens", std::to_string(s.tokens),
                                           "--vocab", std::to_string(s.vocab), "--reps", std::to_string(s.reps),
                                           "--threads", std::to_string(s.threads), "--device", s.device};
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv("/proc/self/exe", argv.data());
    _exit(127);
  }
  close(out[1]);
  std::string text;
  char buf[256];
  for (ssize_t n; (n = read(out[0], buf, sizeof buf)) > 0;) text.append(buf, static_cast<size_t>(n));
  close(out[0]);
  int status = 0;
  rusage usage{};
  wait4(pid, &status, 0, &usage);
  Measured m;
  double gpu_peak = 0.0;
  std::sscanf(text.c_str(), "%lf %lf", &m.seconds, &gpu_peak);
  m.peak_mib = s.device == "cpu" ? static_cast<double>(usage.ru_maxrss) / 1024.0 : gpu_peak / (1 << 20);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) std::fprintf(stderr, "side %s failed\n", side.c_str());
  return m;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"chunked cross-entropy against cross_entropy(logits.float())"};
  Settings s;
  std::string side;
  app.add_option("--tokens", s.tokens)->capture_default_str();
  app.add_option("--vocab", s.vocab)->capture_default_str();
  app.add_option("--reps", s.reps)->capture_default_str();
  app.add_option("--threads", s.threads)->capture_default_str();
  app.add_option("--device", s.device)->capture_default_str();
  app.add_option("--side", side, "internal: run one side in this process");
  CLI11_PARSE(app, argc, argv);
  if (!side.empty()) {
    const double seconds = run_side(s, side);
    const double peak = s.device == "cpu" ? 0.0 : static_cast<double>(cuda_memory(0).peak_allocated_bytes);
    std::printf("%.9f %.0f\n", seconds, peak);
    return 0;
  }
  const auto base = measure(s, "baseline");
  const auto plain = measure(s, "plain");
  const auto chunked = measure(s, "chunked");
  std::printf("cross-entropy on %s, bfloat16 logits [%lld, %lld], %d threads, median of %d\n", s.device.c_str(),
              static_cast<long long>(s.tokens), static_cast<long long>(s.vocab), s.threads, s.reps);
  std::printf("%-28s %12s %14s %16s\n", "side", "fwd+bwd ms", "peak MiB", "above logits MiB");
  std::printf("%-28s %12s %14.0f %16s\n", "logits + grad only", "-", base.peak_mib, "-");
  std::printf("%-28s %12.1f %14.0f %16.0f\n", "plain (logits.float())", plain.seconds * 1e3, plain.peak_mib,
              plain.peak_mib - base.peak_mib);
  std::printf("%-28s %12.1f %14.0f %16.0f\n", "chunked (brigade)", chunked.seconds * 1e3, chunked.peak_mib,
              chunked.peak_mib - base.peak_mib);
  std::printf("time chunked / plain: %.2fx; memory above logits, plain / chunked: %.1fx\n",
              chunked.seconds / plain.seconds,
              (plain.peak_mib - base.peak_mib) / std::max(1.0, chunked.peak_mib - base.peak_mib));
  return 0;
}
