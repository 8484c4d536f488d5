// The data options (recipe section `data`).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/arith.h"

namespace brigade::data {

enum class DataSource {
  kSynthetic,  // the built-in arithmetic reasoning corpus (nothing to download)
  kShards,     // token shards written by `brigade data prepare`
};

struct DataOptions {
  std::string tokenizer = "byte";
  int64_t seq_len = 128;               // tokens per training sequence
  DataSource source = DataSource::kSynthetic;
  std::vector<std::string> shards;     // source: shards
  double eval_fraction = 0.02;         // source: shards; the tail of the corpus held out for eval
  // source: shards; the shards hold packed rows of seq_len + 1 tokens with whole
  // documents (`brigade distill`'s build stage): whole rows are sampled and
  // attention stays inside each document.
  bool packed = false;
  // source: shards, packed; the teacher's top-k per shard token (the distill build
  // stage's kd.safetensors), read when distill.kd.loss is not none. Empty: none.
  std::string kd_file;
  ArithmeticOptions synthetic;         // source: synthetic
};

std::string to_string(DataSource source);
DataSource parse_data_source(const std::string& name);

}  // namespace brigade::data
