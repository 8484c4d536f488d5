// bench_generate: decoding speed. From the same run, on one randomly initialised
// model (no stop token, so every sequence runs its full length):
//   1. one sequence of --new-tokens tokens with the KV cache (generate()) against
//      recomputing the whole sequence for every new token (forward over all
//      positions, argmax of the last);
//   2. --batch prompts decoded together (generate_batch(), prompts of different
//      lengths, left-padded) against the same prompts one after another.
// Prints the median of --reps timed runs of each side, tokens/s and the ratios.
//
//   bench_generate [--new-tokens 256] [--batch 16] [--reps 5] [--threads 2]
//                  [--d-model 256] [--layers 4] [--heads 8] [--vocab 512]
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <vector>

#include <torch/torch.h>

#include "bench/timing.h"
#include "model/generate.h"
#include "model/transformer.h"

using namespace brigade;
using bench::median_seconds;

int main(int argc, char** argv) {
  CLI::App app{"KV-cache and batched generation against their baselines"};
  int64_t new_tokens = 256, batch = 16, d_model = 256, layers = 4, heads = 8, vocab = 512;
  int reps = 5, threads = 2;
  app.add_option("--new-tokens", new_tokens)->capture_default_str();
  app.add_option("--batch", batch)->capture_default_str();
  app.add_option("--reps", reps)->capture_default_str();
  app.add_option("--threads", threads)->capture_default_str();
  app.add_option("--d-model", d_model)->capture_default_str();
  app.add_option("--layers", layers)->capture_default_str();
  app.add_option("--heads", heads)->capture_default_str();
  app.add_option("--vocab", vocab)->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  at::set_num_threads(threads);

  model::TransformerOptions o;
  o.vocab_size = vocab;
  o.d_model = d_model;
  o.n_layers = layers;
  o.n_heads = heads;
  o.n_kv_heads = heads / 2;
  o.d_ff = 3 * d_model;
  o.max_seq_len = 32 + new_tokens;
  torch::manual_seed(0);
  model::Transformer net(o);
  net->eval();
  const std::vector<int64_t> prompt = {1, 2, 3, 4, 5, 6, 7, 8};
  model::SamplingOptions greedy;
  greedy.max_new_tokens = new_tokens;

  const double cached = median_seconds(reps, [&] { model::generate(net, prompt, greedy); });
  const double recompute = median_seconds(reps, [&] {
    torch::InferenceMode inference;
    std::vector<int64_t> seq = prompt;
    for (int64_t i = 0; i < new_tokens; ++i) {
      auto logits = net->forward(torch::tensor(seq, torch::kLong).unsqueeze(0));
      seq.push_back(logits[0][-1].argmax().item<int64_t>());
    }
  });

  std::vector<std::vector<int64_t>> prompts;
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<int64_t> p;
    for (int64_t i = 0; i < 8 + b % 8; ++i) p.push_back((b * 7 + i) % vocab);  // 8..15 tokens
    prompts.push_back(p);
  }
  const std::vector<uint64_t> seeds(static_cast<size_t>(batch), 0);
  const double batched = median_seconds(reps, [&] { model::generate_batch(net, prompts, greedy, seeds); });
  const double one_by_one = median_seconds(reps, [&] {
    for (const auto& p : prompts) model::generate(net, p, greedy);
  });

  std::printf("model: d_model %lld, %lld layers, %lld heads, vocab %lld; %d threads; median of %d runs\n",
              static_cast<long long>(d_model), static_cast<long long>(layers), static_cast<long long>(heads),
              static_cast<long long>(vocab), threads, reps);
  std::printf("| case | seconds | new tokens/s | ratio |\n|---|---|---|---|\n");
  const double n = static_cast<double>(new_tokens);
  std::printf("| 1 sequence, recompute every token | %.3f | %.0f | 1.00 |\n", recompute, n / recompute);
  std::printf("| 1 sequence, KV cache | %.3f | %.0f | %.2f |\n", cached, n / cached, recompute / cached);
  const double bn = n * static_cast<double>(batch);
  std::printf("| %lld sequences one by one (KV cache) | %.3f | %.0f | 1.00 |\n", static_cast<long long>(batch),
              one_by_one, bn / one_by_one);
  std::printf("| %lld sequences batched (KV cache) | %.3f | %.0f | %.2f |\n", static_cast<long long>(batch), batched,
              bn / batched, one_by_one / batched);
  return 0;
}
