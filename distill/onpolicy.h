// On-policy distillation (GKD, Agarwal et al. 2024; Qwen3's strong-to-weak stage):
// the student samples completions for the prompts, the teacher scores every token the
// student wrote, and the student minimises a per-token divergence to the teacher
// (reverse KL by default: mode-seeking, on the student's own samples) instead of
// imitating fixed teacher text. `brigade distill` runs it as the onpolicy stage after
// the supervised train stage, in rounds:
//
//   round r   RUN/distill/onpolicy/round_RRR/
//     samples   the current student's samples (a trace store: prompts_per_round
//               prompts, rotating through the prompt set, x samples)
//     scored    the samples that ended at the EOS, each with the teacher's top-k
//               log-probs at every completion position and at the EOS
//               (score_with_teacher), and accepted.jsonl listing them
//     build     sft.shard + kd.safetensors (distill/build.h)
//   then the student's run continues for steps_per_round steps on that shard with
//   the KD loss alone (kd.weight 1: no cross-entropy on its own text), at a
//   constant learning rate.
//
// Each piece is a stage with a completion marker, so a killed run redoes at most
// the piece it was in (the trace stores keep what was written; the training
// resumes from its last checkpoint).
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "data/tokenizer.h"
#include "distill/options.h"
#include "distill/prompts.h"
#include "distill/traces.h"
#include "model/transformer.h"

namespace brigade::distill {

struct ScoreStats {
  int64_t scored = 0;        // samples written with the teacher's records
  int64_t already_done = 0;  // found in the output store (resume)
  int64_t skipped = 0;       // truncated or failed samples (no EOS to align)
  // A remote teacher's (score_with_teacher_remote, distill/remote.h):
  int64_t topk_dropped = 0;  // a position with fewer than k candidates in the student's vocabulary: left out
  int64_t failed = 0;        // requests that failed after every retry: left out, asked again by a rerun
  int64_t refused = 0;       // requests the server refused (HTTP 4xx, e.g. past its context): left out
  int64_t retried = 0;       // retries made
};

// A sample to score: its trace, the context [BOS] + prompt, and its text re-encoded.
struct SampleToScore {
  const Trace* trace = nullptr;
  std::vector<int64_t> context;
  std::vector<int64_t> completion;
};

// The samples of `samples` that ended at the EOS and are not yet in `out` (the others
// counted in stats.already_done and stats.skipped): what a local or a remote teacher
// scores. Chat prompts are refused.
std::vector<SampleToScore> samples_to_score(const data::Tokenizer& tokenizer, const std::vector<Prompt>& prompts,
                                            const TraceReader& samples, const TraceWriter& out, ScoreStats& stats);

// For every sample in the trace store `samples_dir` that ended at the EOS: the
// teacher's log-probabilities (temperature 1, top-k most likely, k = min(k,
// vocabulary)) at each of the n + 1 positions that predict the sample's n completion
// tokens (its text re-encoded, as build_sft_shard encodes it) and the EOS, written
// with the same text to the trace store `out_dir`. Chat prompts are refused (their
// built documents get no KD targets). Resumable: samples already in out_dir are kept.
ScoreStats score_with_teacher(model::Transformer& teacher, const data::Tokenizer& tokenizer,
                              const std::vector<Prompt>& prompts, const std::filesystem::path& samples_dir, int64_t k,
                              int64_t batch_size, const std::filesystem::path& out_dir);

// Writes `out_file` in verify's accepted.jsonl format ({"prompt_id", "sample",
// "prompt", "completion", "answer", "topk"}) for every sample of the scored store,
// so build_sft_shard packs them with their KD targets. Returns the lines written.
int64_t write_scored_samples(const std::filesystem::path& scored_dir, const std::vector<Prompt>& prompts,
                             const std::filesystem::path& out_file);

// Adds to the trace store `dir` the teacher's verified samples (verify's
// accepted.jsonl) of `prompts`: the off-policy share of a round (lambda < 1).
// Resumable: samples already in the store are kept. Returns the samples added.
int64_t add_teacher_samples(const std::filesystem::path& accepted, const std::vector<Prompt>& prompts,
                            const data::Tokenizer& tokenizer, const std::filesystem::path& dir);

// The prompts of round `round`: `count` consecutive prompts starting at
// round * count, wrapping around the set.
std::vector<Prompt> round_prompts(const std::vector<Prompt>& prompts, int64_t round, int64_t count);

}  // namespace brigade::distill
