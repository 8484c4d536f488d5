// The build stage: accepted samples -> a packed, loss-masked token shard for
// supervised fine-tuning.
//
// Each accepted sample becomes one document:
//
//   BOS  prompt tokens  completion tokens  EOS
//
// (the "plain" template: the student sees exactly what the teacher saw, the
// byte tokenizer's format). Only the completion and the EOS are trained (loss mask
// 1); BOS and the prompt are context (mask 0). Documents are packed in order into
// rows of exactly seq_len + 1 tokens, a document never split across rows; the
// rest of a row is PAD (mask 0). Training reads whole rows and keeps attention
// inside each document (data.packed), so packed samples never see each other. A
// document longer than a row is dropped and counted.
#pragma once

#include <cstdint>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "data/tokenizer.h"

namespace brigade::distill {

inline constexpr const char* kSftShard = "sft.shard";

// Reads `accepted` (verify's accepted.jsonl), writes out_dir/sft.shard and
// out_dir/build.json (documents, rows, tokens, trained tokens, dropped documents,
// padding) and returns the statistics. An Error when no document fits, or when
// the mask is all zeros or all ones over the whole shard (a template bug).
nlohmann::json build_sft_shard(const std::filesystem::path& accepted, const data::Tokenizer& tokenizer,
                               int64_t seq_len, const std::filesystem::path& out_dir);

}  // namespace brigade::distill
