// bench_mtp_speculative: speculative decoding drafted by a trained model's MTP
// modules (model/speculative.h) against plain greedy decoding, from the same run.
// On held-out problems of the run's synthetic arithmetic task, one sequence at a
// time, each side decodes every prompt to its end-of-sequence token (or
// --max-new-tokens); the tokens must be identical. Prints the median wall time of
// --reps passes over all prompts for each side, tokens/s, the drafts accepted,
// new tokens per main-model forward, and the speed-up.
//
//   brigade train recipes/tiny-deepseek-v3.yaml --run-dir runs/tiny-deepseek-v3
//   bench_mtp_speculative --checkpoint runs/tiny-deepseek-v3 [--prompts 16] [--reps 5]
//                         [--max-new-tokens 192] [--threads 2] [--set precision.fp8_recipe=none]
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <iostream>
#include <vector>

#include <torch/torch.h>

#include "bench/op_profile.h"
#include "bench/timing.h"
#include "data/arith.h"
#include "data/tokenizer.h"
#include "launch/commands.h"
#include "recipes/build.h"
#include "model/generate.h"
#include "model/speculative.h"

using namespace brigade;
using bench::median_seconds;

int main(int argc, char** argv) {
  CLI::App app{"MTP speculative decoding against greedy decoding"};
  std::string checkpoint;
  int64_t prompts = 16, max_new = 192;
  int reps = 5, threads = 2;
  std::vector<std::string> overrides;
  bool profile = false;
  app.add_flag("--profile", profile, "print each side's op counts and top ops by self time (one pass, not timed)");
  app.add_option("--set", overrides, "recipe overrides for loading, e.g. precision.fp8_recipe=none");
  app.add_option("--checkpoint", checkpoint, "run, checkpoints or step directory of a model with MTP modules")->required();
  app.add_option("--prompts", prompts)->capture_default_str();
  app.add_option("--max-new-tokens", max_new)->capture_default_str();
  app.add_option("--reps", reps)->capture_default_str();
  app.add_option("--threads", threads)->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  try {
    at::set_num_threads(threads);
    auto loaded = launch::load_model(checkpoint, overrides);
    const auto& r = loaded.recipe;
    auto tokenizer = recipes::make_tokenizer(r.data.tokenizer);
    std::vector<std::vector<int64_t>> inputs;
    for (int64_t i = 0; i < prompts; ++i) {
      auto problem = data::make_arithmetic_problem(r.data.synthetic, static_cast<uint64_t>(r.data.synthetic.num_problems + i));
      std::vector<int64_t> ids = data::sequence_start(*tokenizer);
      for (int64_t id : tokenizer->encode(problem.prompt)) ids.push_back(id);
      inputs.push_back(ids);
    }
    model::SamplingOptions greedy;
    greedy.max_new_tokens = max_new;
    greedy.stop_ids = {tokenizer->eos_id()};
    greedy.vocab_limit = tokenizer->vocab_size();

    std::vector<std::vector<int64_t>> plain(inputs.size()), drafted(inputs.size());
    model::SpeculativeStats total;
    int64_t tokens = 0;
    const double greedy_s = median_seconds(reps, [&] {
      tokens = 0;
      for (size_t i = 0; i < inputs.size(); ++i) {
        plain[i] = model::generate(loaded.model, inputs[i], greedy).tokens;
        tokens += static_cast<int64_t>(plain[i].size());
      }
    });
    const double spec_s = median_seconds(reps, [&] {
      total = {};
      for (size_t i = 0; i < inputs.size(); ++i) {
        model::SpeculativeStats stats;
        drafted[i] = model::generate_speculative(loaded.model, inputs[i], greedy, 0, &stats).tokens;
        total.rounds += stats.rounds + 1;  // the prompt's forward too
        total.drafted += stats.drafted;
        total.accepted += stats.accepted;
      }
    });
    if (profile) {
      for (bool speculative : {false, true}) {
        bench::OpProfile ops;
        for (const auto& input : inputs) {
          if (speculative) model::generate_speculative(loaded.model, input, greedy);
          else model::generate(loaded.model, input, greedy);
        }
        auto stats = ops.ops();
        std::sort(stats.begin(), stats.end(), [](const auto& a, const auto& b) { return a.self_seconds > b.self_seconds; });
        int64_t calls = 0;
        double self = 0;
        for (const auto& op : stats) calls += op.calls, self += op.self_seconds;
        std::printf("%s: %lld op calls, %.3f s inside LibTorch\n", speculative ? "speculative" : "greedy",
                    static_cast<long long>(calls), self);
        for (size_t i = 0; i < std::min<size_t>(12, stats.size()); ++i)
          std::printf("  %-40s %8lld calls %8.1f ms\n", stats[i].name.c_str(), static_cast<long long>(stats[i].calls),
                      1e3 * stats[i].self_seconds);
      }
    }
    int64_t same = 0;
    for (size_t i = 0; i < inputs.size(); ++i) same += plain[i] == drafted[i] ? 1 : 0;
    const auto& mo = loaded.model->options();
    std::printf("model %s: %lld layers, d_model %lld, %lld MTP module(s); %lld prompts, %lld new tokens, %d threads, "
                "median of %d\n",
                r.name.c_str(), static_cast<long long>(mo.n_layers), static_cast<long long>(mo.d_model),
                static_cast<long long>(mo.mtp.depth), static_cast<long long>(prompts), static_cast<long long>(tokens),
                threads, reps);
    std::printf("| decoding | seconds | tokens/s | main-model forwards | tokens per forward |\n|---|---|---|---|---|\n");
    std::printf("| greedy | %.3f | %.0f | %lld | 1.00 |\n", greedy_s, tokens / greedy_s, static_cast<long long>(tokens));
    std::printf("| speculative mtp | %.3f | %.0f | %lld | %.2f |\n", spec_s, tokens / spec_s,
                static_cast<long long>(total.rounds), static_cast<double>(tokens) / static_cast<double>(total.rounds));
    std::printf("drafts accepted: %lld of %lld (%.1f%%); identical outputs: %lld of %zu; speed-up %.2fx\n",
                static_cast<long long>(total.accepted), static_cast<long long>(total.drafted),
                100.0 * static_cast<double>(total.accepted) / std::max<double>(1.0, static_cast<double>(total.drafted)),
                static_cast<long long>(same), inputs.size(), greedy_s / spec_s);
    // What verifying more than one token costs here: one GEMM of 1, 2 and 4 rows
    // against the model's widest weight and a 4096 x 4096 one (where reading the
    // weight should dominate).
    torch::InferenceMode inference;
    for (const auto& [out, in] : {std::pair<int64_t, int64_t>{mo.ff_size(), mo.d_model}, {4096, 4096}}) {
      const auto w = torch::randn({out, in});
      std::printf("GEMM [rows, %lld] x [%lld, %lld]^T:", static_cast<long long>(in), static_cast<long long>(out),
                  static_cast<long long>(in));
      for (int64_t rows : {1, 2, 4}) {
        const auto x = torch::randn({rows, in});
        const double t = median_seconds(out >= 4096 ? 21 : 201, [&] { torch::nn::functional::linear(x, w); });
        std::printf("  %lld rows %.1f us", static_cast<long long>(rows), 1e6 * t);
      }
      std::printf("\n");
    }
    return same == static_cast<int64_t>(inputs.size()) ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "bench_mtp_speculative: " << e.what() << "\n";
    return 1;
  }
}
