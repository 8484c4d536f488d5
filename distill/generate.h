// The generate stage with a local teacher: every (prompt, sample) pair not yet in
// the trace store is decoded by a brigade model (batched, KV cache) and appended.
// Sample s of prompt p always uses the seed hash(options.seed, p.id, s), so a
// resumed or re-batched run produces the same samples.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "data/tokenizer.h"
#include "distill/options.h"
#include "distill/prompts.h"
#include "model/transformer.h"

namespace brigade::distill {

struct GenerateStats {
  int64_t requested = 0;   // prompts x samples
  int64_t already_done = 0;  // found in the store (resume)
  int64_t generated = 0;
  int64_t truncated = 0;   // hit max_new_tokens or the context before the EOS
};

// A prompt's tokens as the teacher sees them: BOS, then the prompt text.
std::vector<int64_t> prompt_tokens(const data::Tokenizer& tokenizer, const Prompt& prompt);

// The per-sample seed (31 bits, so a remote server accepts it as "seed").
uint64_t sample_seed(uint64_t seed, const std::string& prompt_id, int64_t sample);

// Appends the missing samples to the store at `dir`, flushing after each batch (a
// kill loses at most the batch in flight). `progress`: show a progress display.
GenerateStats generate_traces(model::Transformer& teacher, const data::Tokenizer& tokenizer,
                              const std::vector<Prompt>& prompts, const GenerateOptions& options,
                              const std::filesystem::path& dir, bool progress = true);

}  // namespace brigade::distill
