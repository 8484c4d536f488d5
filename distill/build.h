// The build stage: accepted samples -> a packed, loss-masked token shard for
// supervised fine-tuning.
//
// Each accepted sample becomes one document:
//
//   [BOS]  prompt tokens  completion tokens  EOS
//
// (BOS when the tokenizer's convention starts sequences with it, data::sequence_start)
//
// A chat prompt's sample ("conversation" in accepted.jsonl) becomes the conversation
// with the completion as the assistant's last turn, rendered with the student's
// chat template (data/chat.h): only that turn is trained, the teacher's <think>
// block included, and an untrained EOS closes the document. Such documents get no
// KD targets (the teacher's records do not line up with a re-rendered turn).
//
// (the "plain" template: the student sees exactly what the teacher saw, the
// byte tokenizer's format). Only the completion and the EOS are trained (loss mask
// 1); BOS and the prompt are context (mask 0). Documents are packed in order into
// rows of exactly seq_len + 1 tokens, a document never split across rows; the
// rest of a row is PAD (mask 0). Training reads whole rows and keeps attention
// inside each document (data.packed), so packed samples never see each other. A
// document longer than a row is dropped and counted.
//
// KD targets: when the accepted samples carry the teacher's top-k ("topk" in
// accepted.jsonl, records in the trace store's sidecar), the stage also writes
// kd.safetensors, aligned with the shard's token positions (tokens = rows x
// (seq_len + 1)):
//
//   ids       [tokens, k] int32    the teacher's top-k ids
//   logprobs  [tokens, k] float32  their log-probabilities (T = 1)
//   valid     [tokens] uint8       1 where a teacher record is present
//
// Position j holds the teacher's distribution for predicting token j + 1: for a
// document starting at shard position o with P context tokens (BOS + prompt), the
// teacher's record t (its t-th generated token) goes to position o + P + t - 1,
// t = 0 .. n, where record n is the EOS the teacher stopped with. A document is
// aligned only when re-tokenizing its completion gives exactly n tokens for the
// teacher's n + 1 records (a tokenizer that does not round-trip the teacher's text
// breaks this); otherwise its positions stay invalid (no KD, SFT only) and it is
// counted as "kd_misaligned" in build.json, next to "kd_documents" (aligned).
#pragma once

#include <cstdint>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "data/tokenizer.h"

namespace brigade::distill {

inline constexpr const char* kSftShard = "sft.shard";
inline constexpr const char* kKdTargets = "kd.safetensors";

// Reads `accepted` (verify's accepted.jsonl), writes out_dir/sft.shard and
// out_dir/build.json (documents, rows, tokens, trained tokens, dropped documents,
// padding) and returns the statistics. An Error when no document fits, or when
// the mask is all zeros or all ones over the whole shard (a template bug).
// `topk_sidecar`: the trace store's traces.topk.bin that the lines' "topk" records
// refer to; when given and some line carries "topk", out_dir/kd.safetensors is
// written too (see above). Empty: no KD targets.
// `align_by_index`: the teacher spoke another tokenizer (KD loss uld): its record t
// goes with the student's position t (context - 1 + t) for t up to the shorter of the
// two, instead of requiring the same tokens.
nlohmann::json build_sft_shard(const std::filesystem::path& accepted, const data::Tokenizer& tokenizer,
                               int64_t seq_len, const std::filesystem::path& out_dir,
                               const std::filesystem::path& topk_sidecar = {}, bool align_by_index = false);

}  // namespace brigade::distill
