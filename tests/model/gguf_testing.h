// Helpers shared by the GGUF tests (gguf_test.cpp, gguf_moe_test.cpp).
#pragma once

#include <filesystem>
#include <iostream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/fs.h"
#include "model/transformer.h"
#include "moe/options.h"
#include "tests/testing.h"

namespace brigade::model::gguf_testing {

inline const std::string kCheckScript = std::string(BRIGADE_SOURCE_DIR) + "/tests/model/gguf_check.py";

// Runs `gguf_check.py command arg`; exit code 3 means a python package is missing.
inline testing::CommandResult run_check(const std::string& command, const std::filesystem::path& arg) {
  return testing::run_command(std::string(BRIGADE_VENV_PYTHON) + " " + kCheckScript + " " + command + " " +
                              arg.string());
}

// The JSON document on the last non-empty line of the output (python may warn above it).
inline nlohmann::json last_json_line(const std::string& output) {
  size_t end = output.find_last_not_of("\n ");
  size_t begin = output.rfind('\n', end);
  return nlohmann::json::parse(output.substr(begin == std::string::npos ? 0 : begin + 1, end + 1 - (begin + 1)));
}

// DeepSeek-shaped models (multi-head latent attention, dense first layer, shared +
// routed experts) as llama.cpp's deepseek2. v3: query compression, sigmoid scores
// with a random selection bias, 4 groups of which 2 are used, renormalised top-k and
// routed scaling 2.5. v2: no query compression, softmax scores without groups or
// renormalisation, tied embeddings.
inline TransformerOptions deepseek_options(bool v3) {
  TransformerOptions o;
  o.vocab_size = 264;
  o.d_model = 64;
  o.n_layers = 3;
  o.n_heads = 4;
  o.n_kv_heads = 0;
  o.head_dim = 0;
  o.d_ff = 96;
  o.max_seq_len = 256;
  o.tie_embeddings = !v3;
  o.rope_theta = 10000.0;
  o.norm_eps = 1e-6;  // llama.cpp uses it for the latent norms too (brigade and transformers: 1e-6)
  o.init_std = 0.3;
  o.attention = AttentionKind::kMla;
  o.mla.q_lora_rank = v3 ? 32 : 0;
  o.mla.kv_lora_rank = 32;
  o.mla.qk_nope_head_dim = 16;
  o.mla.qk_rope_head_dim = 16;
  o.mla.v_head_dim = 16;
  auto& m = o.moe;
  m.num_experts = 8;
  m.top_k = 2;
  m.expert_d_ff = 32;
  m.num_shared_experts = 1;
  m.first_k_dense = 1;
  m.score_function = v3 ? moe::ScoreFunction::kSigmoid : moe::ScoreFunction::kSoftmax;
  m.num_groups = v3 ? 4 : 1;
  m.topk_group = v3 ? 2 : 1;
  m.normalize_topk = v3;
  m.routed_scaling = v3 ? 2.5 : 1.0;
  m.bias_update_rate = 0.0;
  return o;
}

// A seeded random model in eval mode with norm weights in [0.6, 1.4] and biases
// N(0, 0.3), so the export's mapping of every tensor matters.
inline Transformer make_model(const TransformerOptions& o, uint64_t seed) {
  torch::manual_seed(seed);
  Transformer model(o);
  torch::NoGradGuard no_grad;
  for (auto& [name, t] : model->state_dict()) {
    if (name.ends_with("norm.weight")) t.uniform_(0.6, 1.4);
    if (name.ends_with(".bias")) t.normal_(0.0, 0.3);
  }
  model->eval();
  return model;
}

// Rounds in place the matrices an F16 export stores as fp16 (all but the MoE router,
// which stays F32): the weights llama.cpp runs.
inline void round_to_fp16(Transformer& model) {
  torch::NoGradGuard no_grad;
  for (auto& [name, t] : model->state_dict()) {
    if (t.dim() >= 2 && !name.ends_with("mlp.gate.weight")) t.copy_(t.to(torch::kHalf).to(torch::kFloat32));
  }
}

// llama.cpp's greedy continuations (gguf_check.py llama) of `job`'s items, written to
// dir/job.json, expected equal to cases[i].second (the label cases[i].first), each
// printed; with min_distinct > 0 brigade's continuation must also hold that many
// distinct tokens (a repetitive one tests little). Skips when a Python package is
// missing.
inline void expect_llama_cpp_greedy(const std::filesystem::path& dir, const nlohmann::json& job,
                                    const std::vector<std::pair<std::string, std::vector<int64_t>>>& cases,
                                    size_t min_distinct) {
  write_file_atomic(dir / "job.json", job.dump());
  auto run = run_check("llama", dir / "job.json");
  if (run.exit_code == 3) GTEST_SKIP() << run.output;
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const auto results = last_json_line(run.output);
  ASSERT_EQ(results.size(), cases.size()) << run.output;
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto& [label, expected] = cases[i];
    const std::vector<int64_t> theirs = results[i]["greedy"].get<std::vector<int64_t>>();
    const std::set<int64_t> distinct(expected.begin(), expected.end());
    std::cout << "[gguf parity] " << label << ": greedy " << (expected == theirs ? "equal" : "DIFFERENT") << " ("
              << distinct.size() << " distinct tokens of " << expected.size() << ")\n";
    EXPECT_EQ(expected, theirs) << label;
    if (min_distinct > 0) EXPECT_GE(distinct.size(), min_distinct) << label << ": the continuation is too repetitive to test much";
  }
}

// Whether the venv has llama-cpp-python (scripts/setup.sh builds it for the tests).
inline bool have_llama_cpp() {
  return testing::run_command(std::string(BRIGADE_VENV_PYTHON) + " -c 'import llama_cpp'").exit_code == 0;
}

// One torch thread while alive: OpenMP workers spinning between parallel regions
// would compete with llama.cpp for a small machine's cores.
struct OneTorchThread {
  int saved = torch::get_num_threads();
  OneTorchThread() { torch::set_num_threads(1); }
  ~OneTorchThread() { torch::set_num_threads(saved); }
  OneTorchThread(const OneTorchThread&) = delete;
  OneTorchThread& operator=(const OneTorchThread&) = delete;
};

}  // namespace brigade::model::gguf_testing
