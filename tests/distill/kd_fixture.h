// A small SFT shard with the teacher's top-4 per completion token (kd.safetensors),
// for tests that train with logit distillation: 24 documents of about one row of 33
// tokens each (byte tokenizer). Written by the build stage from a trace store.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace brigade::testing {

// Writes the traces and the build stage's outputs under `dir`; returns the build
// directory (sft.shard and kd.safetensors).
std::filesystem::path build_kd_shard(const std::filesystem::path& dir);

// The recipe settings that train on that build: the shard, its KD targets, and the
// teacher's top-k the recipe declares (distill.kd.* not included).
std::vector<std::string> kd_data_settings(const std::filesystem::path& build);

}  // namespace brigade::testing
