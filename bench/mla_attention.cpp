// bench_mla_attention: brigade's multi-head latent attention, timed. The brigade
// half of bench/mla_attention.py, which times transformers' DeepseekV3Attention on
// the same weights and input and prints the ratios; see bench/README.md.
//
//   bench_mla_attention --weights W.safetensors [--threads 2]
//
// W.safetensors holds the attention's projections under Hugging Face names
// (q_a_proj.weight or q_proj.weight, kv_a_proj_with_mqa.weight, kv_b_proj.weight,
// o_proj.weight, the latent norms), the input "x" [batch, seq, hidden], a probe "g"
// (the output gradient) and the config as metadata. Once loaded it prints
// {"ready": true} and serves one request per stdin line until stdin closes:
//   "pass <iters>"              iters forward+backward passes over x (training form)
//   "output <path>"             writes the forward's output "y" to a safetensors file
//   "decode <context> <iters>"  one new token per sequence of x's batch attending to
//                               `context` cached positions, iters times, with the
//                               latent cache (brigade's generation: absorbed form)
//                               and with a full per-head K/V cache (the expanded
//                               keys and values, as a GQA-style cache would hold)
// Timing answers are {"seconds": s, "tokens": n} ("decode": one object per cache,
// with its values per cached position).
#include <CLI/CLI.hpp>

#include <chrono>
#include <iostream>
#include <sstream>
#include <string>

#include <ATen/ops/scaled_dot_product_attention.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/error.h"
#include "model/kv_cache.h"
#include "model/mla.h"
#include "model/rope.h"
#include "model/safetensors.h"

namespace {

using namespace brigade;

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

int64_t meta_int(const std::map<std::string, std::string>& meta, const char* key) {
  auto it = meta.find(key);
  BRIGADE_CHECK(it != meta.end(), "weights file has no metadata '", key, "'");
  return std::stoll(it->second);
}

// One decode step with a full K/V cache: keys [batch, heads, positions, dn + dr] and
// values [batch, heads, positions, dv] expanded once per position and kept.
torch::Tensor full_cache_step(model::MLAttentionImpl& a, const torch::Tensor& x, const torch::Tensor& cos,
                              const torch::Tensor& sin, torch::Tensor& keys, torch::Tensor& values, int64_t past,
                              int64_t heads, double scale) {
  const auto& o = a.options();
  const int64_t batch = x.size(0), dn = o.qk_nope_head_dim, dr = o.qk_rope_head_dim, dv = o.v_head_dim;
  auto q = a.q_proj ? a.q_proj(x) : a.q_b_proj(a.q_a_layernorm(a.q_a_proj(x)));
  q = q.view({batch, 1, heads, dn + dr}).transpose(1, 2);
  auto q_rope = model::apply_rope(q.narrow(-1, dn, dr), cos, sin);
  auto kv = a.kv_a_proj_with_mqa(x);
  auto latent = a.kv_a_layernorm(kv.narrow(-1, 0, o.kv_lora_rank));
  auto k_rope = model::apply_rope(kv.narrow(-1, o.kv_lora_rank, dr).unsqueeze(1), cos, sin);
  auto expanded = a.kv_b_proj(latent).view({batch, 1, heads, dn + dv}).transpose(1, 2);
  keys.narrow(2, past, 1).copy_(torch::cat({expanded.narrow(-1, 0, dn), k_rope.expand({batch, heads, 1, dr})}, -1));
  values.narrow(2, past, 1).copy_(expanded.narrow(-1, dn, dv));
  auto out = at::scaled_dot_product_attention(torch::cat({q.narrow(-1, 0, dn), q_rope}, -1),
                                              keys.narrow(2, 0, past + 1), values.narrow(2, 0, past + 1),
                                              std::nullopt, 0.0, false, scale);
  return a.o_proj(out.transpose(1, 2).reshape({batch, 1, heads * dv}));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"brigade MLA attention benchmark (driven by bench/mla_attention.py)"};
  std::string weights_path;
  int threads = 2;
  app.add_option("--weights", weights_path, "safetensors file with the attention, x, g and config")->required();
  app.add_option("--threads", threads, "intra-op threads");
  CLI11_PARSE(app, argc, argv);

  try {
    at::set_num_threads(threads);
    auto file = model::load_safetensors(weights_path);
    const auto& meta = file.metadata;
    model::MlaOptions o;
    o.q_lora_rank = meta_int(meta, "q_lora_rank");
    o.kv_lora_rank = meta_int(meta, "kv_lora_rank");
    o.qk_nope_head_dim = meta_int(meta, "qk_nope_head_dim");
    o.qk_rope_head_dim = meta_int(meta, "qk_rope_head_dim");
    o.v_head_dim = meta_int(meta, "v_head_dim");
    const int64_t heads = meta_int(meta, "num_attention_heads");
    const double theta = std::stod(meta.at("rope_theta"));
    auto x = file.tensors.at("x");
    auto g = file.tensors.at("g");
    const int64_t batch = x.size(0), seq = x.size(1), d = x.size(2);
    const double scale = 1.0 / std::sqrt(static_cast<double>(o.qk_head_dim()));
    model::MLAttention attention(d, heads, o, scale);
    {
      torch::NoGradGuard no_grad;
      for (auto& item : attention->named_parameters()) item.value().copy_(file.tensors.at(item.key()));
    }
    const int64_t positions = std::max<int64_t>(seq, 8192);
    const auto rope = model::rope_tables(o.qk_rope_head_dim, positions + 1, theta, {}, positions + 1);
    const auto cos = rope.cos.narrow(0, 0, seq), sin = rope.sin_signed.narrow(0, 0, seq);
    attention->train();
    auto xg = x.clone().requires_grad_(true);
    auto pass = [&] {
      attention->forward(xg, cos, sin, nullptr, 0).backward(g);
      attention->zero_grad();
      xg.mutable_grad() = torch::Tensor();
    };
    for (int i = 0; i < 2; ++i) pass();
    std::cout << nlohmann::json{{"ready", true}}.dump() << std::endl;

    for (std::string line; std::getline(std::cin, line);) {
      std::istringstream in(line);
      std::string what;
      in >> what;
      if (what == "pass") {
        int64_t iters = 1;
        in >> iters;
        const auto start = std::chrono::steady_clock::now();
        for (int64_t i = 0; i < iters; ++i) pass();
        std::cout << nlohmann::json{{"seconds", seconds_since(start)}, {"tokens", iters * batch * seq}}.dump()
                  << std::endl;
      } else if (what == "output") {
        std::string path;
        in >> path;
        torch::NoGradGuard no_grad;
        model::save_safetensors(path, {{"y", attention->forward(x, cos, sin, nullptr, 0).contiguous()}});
        std::cout << nlohmann::json{{"written", path}}.dump() << std::endl;
      } else if (what == "decode") {
        int64_t context = 1024, iters = 16;
        in >> context >> iters;
        BRIGADE_CHECK(context >= 1 && context < positions, "decode context must be in [1, ", positions, ")");
        torch::InferenceMode inference;
        attention->eval();
        // The same cached context for both: random hidden states run through the layer.
        const auto history = torch::randn({batch, context, d}) * x.std();
        const auto step_x = x.narrow(1, 0, 1);
        const auto step_cos = rope.cos.narrow(0, context, 1), step_sin = rope.sin_signed.narrow(0, context, 1);
        model::KVCache latent;
        latent.keys.push_back(torch::zeros({batch, 1, context + 1, o.cache_width()}));
        attention->forward(history, rope.cos.narrow(0, 0, context), rope.sin_signed.narrow(0, 0, context), &latent, 0);
        latent.length = context;
        auto keys = torch::zeros({batch, heads, context + 1, o.qk_head_dim()});
        auto values = torch::zeros({batch, heads, context + 1, o.v_head_dim});
        for (int64_t p = 0; p < context; ++p)  // fill the full cache from the same history
          full_cache_step(*attention, history.narrow(1, p, 1), rope.cos.narrow(0, p, 1),
                          rope.sin_signed.narrow(0, p, 1), keys, values, p, heads, scale);
        torch::Tensor a, b;
        const auto start = std::chrono::steady_clock::now();
        for (int64_t i = 0; i < iters; ++i) {
          latent.length = context;
          a = attention->forward(step_x, step_cos, step_sin, &latent, 0);
        }
        const double latent_s = seconds_since(start);
        const auto start_full = std::chrono::steady_clock::now();
        for (int64_t i = 0; i < iters; ++i)
          b = full_cache_step(*attention, step_x, step_cos, step_sin, keys, values, context, heads, scale);
        const double full_s = seconds_since(start_full);
        const double diff = (a - b).abs().max().item<double>() / std::max(1e-30, b.abs().max().item<double>());
        std::cout << nlohmann::json{{"latent", {{"seconds", latent_s}, {"tokens", iters * batch},
                                                {"values_per_position", o.cache_width()}}},
                                    {"full", {{"seconds", full_s}, {"tokens", iters * batch},
                                              {"values_per_position", heads * (o.qk_head_dim() + o.v_head_dim)}}},
                                    {"relative_difference", diff}}
                         .dump()
                  << std::endl;
        attention->train();
      } else {
        BRIGADE_FAIL("unknown request '", line, "' (expected pass N, output PATH or decode CONTEXT N)");
      }
    }
  } catch (const std::exception& e) {
    std::cerr << "bench_mla_attention: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
