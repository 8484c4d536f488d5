// bench_moe_layer: brigade's MoE layer forward+backward, timed. The brigade half
// of bench/moe_layer.py, which times transformers' DeepSeek-V3 MoE block on the
// same weights and input and prints the ratios; see bench/README.md.
//
//   bench_moe_layer --weights W.safetensors [--threads 2]
//
// W.safetensors holds the block under Hugging Face names (gate.weight,
// gate.e_score_correction_bias, experts.gate_up_proj, experts.down_proj,
// shared_experts.*), the input "x" [batch, seq, hidden], a probe "g" (the output
// gradient) and the config as metadata (the keys of tests/moe/hf_deepseek_moe.py).
// Once loaded and warmed up it prints {"ready": true, "max_abs_output": ...} and
// serves one request per stdin line until stdin closes:
//   "layer <iters>"       iters forward+backward passes of MoELayer over all of x
//   "reference <tokens>"  one forward+backward of the slow per-token reference over
//                         the first `tokens` tokens of x (float32)
//   "output <path>"       writes MoELayer's output "y" to a safetensors file
//   "profile <iters>"     iters passes under an OpProfile; answers {"ops": [...]} by self time
// Each timing answer is {"seconds": s, "tokens": n}.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "bench/op_profile.h"
#include "core/error.h"
#include "model/safetensors.h"
#include "moe/moe.h"

namespace {

using namespace brigade;

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

moe::MoEOptions options_from(const std::map<std::string, std::string>& meta) {
  auto get = [&](const char* key) {
    auto it = meta.find(key);
    BRIGADE_CHECK(it != meta.end(), "weights file has no metadata '", key, "'");
    return it->second;
  };
  moe::MoEOptions o;
  o.num_experts = std::stoll(get("n_routed_experts"));
  o.top_k = std::stoll(get("num_experts_per_tok"));
  o.num_shared_experts = std::stoll(get("n_shared_experts"));
  o.expert_d_ff = std::stoll(get("moe_intermediate_size"));
  o.num_groups = std::stoll(get("n_group"));
  o.topk_group = std::stoll(get("topk_group"));
  o.normalize_topk = get("norm_topk_prob") == "true";
  o.routed_scaling = std::stod(get("routed_scaling_factor"));
  o.validate(1);
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"brigade MoE layer benchmark (driven by bench/moe_layer.py)"};
  std::string weights_path;
  int threads = 2;
  app.add_option("--weights", weights_path, "safetensors file with the block, x, g and config")->required();
  app.add_option("--threads", threads, "intra-op threads");
  CLI11_PARSE(app, argc, argv);

  try {
    at::set_num_threads(threads);
    auto file = model::load_safetensors(weights_path);
    const auto o = options_from(file.metadata);
    auto x = file.tensors.at("x");
    auto g = file.tensors.at("g");
    const int64_t d = x.size(-1);
    moe::MoELayer layer(d, o.expert_d_ff, o);
    {
      torch::NoGradGuard no_grad;
      for (auto& item : layer->named_parameters()) item.value().copy_(file.tensors.at(item.key()));
      layer->gate->e_score_correction_bias.copy_(file.tensors.at("gate.e_score_correction_bias"));
    }
    layer->train();
    auto xg = x.clone().requires_grad_(true);
    auto pass = [&] {
      auto y = layer->forward(xg);
      y.backward(g);
      layer->end_step(false);  // reset the step's counters; no bias update in a benchmark
      layer->zero_grad();
      xg.mutable_grad() = torch::Tensor();
    };
    for (int i = 0; i < 2; ++i) pass();
    double max_abs = 0.0;
    {
      torch::NoGradGuard no_grad;
      max_abs = layer->forward(x).abs().max().item<double>();
    }
    std::cout << nlohmann::json{{"ready", true}, {"max_abs_output", max_abs}}.dump() << std::endl;

    // Reference weights: leaves of their own, float32.
    moe::ReferenceWeights ref;
    auto leaf = [](const torch::Tensor& t) { return t.detach().clone().requires_grad_(true); };
    ref.router = leaf(layer->gate->weight);
    ref.bias = layer->gate->e_score_correction_bias.clone();
    auto& experts = *layer->experts->as<moe::GroupedExpertsImpl>();
    ref.gate_up = leaf(experts.gate_up_proj);
    ref.down = leaf(experts.down_proj);
    if (layer->shared_experts) {
      ref.shared_gate = leaf(layer->shared_experts->gate_proj->weight);
      ref.shared_up = leaf(layer->shared_experts->up_proj->weight);
      ref.shared_down = leaf(layer->shared_experts->down_proj->weight);
    }

    for (std::string line; std::getline(std::cin, line);) {
      std::istringstream in(line);
      std::string what;
      in >> what;
      if (what == "layer") {
        int64_t iters = 1;
        in >> iters;
        const auto start = std::chrono::steady_clock::now();
        for (int64_t i = 0; i < iters; ++i) pass();
        std::cout << nlohmann::json{{"seconds", seconds_since(start)}, {"tokens", iters * x.numel() / d}}.dump()
                  << std::endl;
      } else if (what == "reference") {
        int64_t tokens = 16;
        in >> tokens;
        auto xs = x.reshape({-1, d}).narrow(0, 0, tokens).clone().requires_grad_(true);
        auto gs = g.reshape({-1, d}).narrow(0, 0, tokens);
        const auto start = std::chrono::steady_clock::now();
        auto out = moe::reference_moe(xs, ref, o);
        out.y.backward(gs);
        std::cout << nlohmann::json{{"seconds", seconds_since(start)}, {"tokens", tokens}}.dump() << std::endl;
      } else if (what == "profile") {
        int64_t iters = 1;
        in >> iters;
        nlohmann::json ops = nlohmann::json::array();
        {
          bench::OpProfile profile;
          for (int64_t i = 0; i < iters; ++i) pass();
          auto stats = profile.ops();
          std::sort(stats.begin(), stats.end(), [](const auto& a, const auto& b) { return a.self_seconds > b.self_seconds; });
          for (const auto& op : stats) {
            ops.push_back({{"name", op.name}, {"calls", op.calls}, {"self_ms", 1e3 * op.self_seconds / iters}});
          }
        }
        std::cout << nlohmann::json{{"ops", ops}}.dump() << std::endl;
      } else if (what == "output") {
        std::string path;
        in >> path;
        torch::NoGradGuard no_grad;
        model::save_safetensors(path, {{"y", layer->forward(x).contiguous()}});
        std::cout << nlohmann::json{{"written", path}}.dump() << std::endl;
      } else {
        BRIGADE_FAIL("unknown request '", line, "' (expected layer N, reference N or output PATH)");
      }
    }
  } catch (const std::exception& e) {
    std::cerr << "bench_moe_layer: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
