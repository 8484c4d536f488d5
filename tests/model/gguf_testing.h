// Helpers shared by the GGUF tests (gguf_test.cpp, gguf_moe_test.cpp).
#pragma once

#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "model/transformer.h"
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
