// Loads a safetensors file (or a Hugging Face directory, sharded or not) with
// brigade's reader and touches every tensor, timing each round. Driven by
// bench/safetensors_load.py, which times the Python safetensors package on the
// same files in the same run.
//
//   bench_safetensors_load PATH ROUNDS   -> one line per round: "seconds checksum"
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>

#include <torch/torch.h>

#include "model/safetensors.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s PATH ROUNDS\n", argv[0]);
    return 2;
  }
  const std::filesystem::path path = argv[1];
  const int rounds = std::stoi(argv[2]);
  torch::set_num_threads(1);
  for (int r = 0; r < rounds; ++r) {
    const auto start = std::chrono::steady_clock::now();
    const auto file = std::filesystem::is_directory(path) ? brigade::model::load_safetensors_dir(path)
                                                          : brigade::model::load_safetensors(path);
    // Touch every byte, as a model load does when it copies the weights in.
    double checksum = 0;
    for (const auto& [name, tensor] : file.tensors) checksum += tensor.to(torch::kFloat).sum().item<double>();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("%.6f %.6e\n", seconds, checksum);
    std::fflush(stdout);
  }
  return 0;
}
