// The generate stage with a local teacher: every (prompt, sample) pair not yet in
// the trace store is decoded by a brigade model (batched, KV cache) and appended.
// Sample s of prompt p always uses the seed hash(options.seed, p.id, s), so a
// resumed or re-batched run produces the same samples.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "distill/options.h"
#include "distill/prompts.h"
#include "distill/traces.h"
#include "model/transformer.h"

namespace brigade::distill {

struct GenerateStats {
  int64_t requested = 0;   // prompts x samples
  int64_t already_done = 0;  // found in the store (resume)
  int64_t generated = 0;
  int64_t truncated = 0;   // hit max_new_tokens or the context before the EOS
};

// A prompt's tokens as the teacher sees them: BOS when the tokenizer's convention
// starts sequences with it (data::sequence_start), then the prompt text; a chat
// prompt rendered with the tokenizer's chat template, the assistant's turn opened
// (data::chat_prompt_tokens).
std::vector<int64_t> prompt_tokens(const data::Tokenizer& tokenizer, const Prompt& prompt);

// The per-sample seed (31 bits, so a remote server accepts it as "seed").
uint64_t sample_seed(uint64_t seed, const std::string& prompt_id, int64_t sample);

// A sample the store does not have yet: prompts[prompt], sample index `sample`.
struct MissingSample {
  size_t prompt = 0;
  int64_t sample = 0;
};

// The (prompt, sample) pairs of `prompts` x `samples` that `store` has not done, in
// order; counts stats.requested and stats.already_done and logs a resume.
std::vector<MissingSample> missing_samples(const TraceWriter& store, const std::vector<Prompt>& prompts,
                                           int64_t samples, GenerateStats& stats);

// Cuts `text` before the first of `stop`; true if one was found.
bool apply_stop_strings(std::string& text, const std::vector<std::string>& stop);

// Cuts `text` (the decoding of `ids`) before the first of `stop` and returns how
// many leading ids make up the cut text; nullopt when no stop string occurs.
std::optional<int64_t> cut_at_stop(const data::Tokenizer& tokenizer, const std::vector<int64_t>& ids,
                                   std::string& text, const std::vector<std::string>& stop);

// The value of the environment variable `name` (an API key); an Error naming it
// and `option` when it is unset or empty.
std::string read_api_key(const std::string& name, const std::string& option);

// Appends the missing samples to the store at `dir`, flushing after each batch (a
// kill loses at most the batch in flight). `progress`: show a progress display.
GenerateStats generate_traces(model::Transformer& teacher, const data::Tokenizer& tokenizer,
                              const std::vector<Prompt>& prompts, const GenerateOptions& options,
                              const std::filesystem::path& dir, bool progress = true);

}  // namespace brigade::distill
