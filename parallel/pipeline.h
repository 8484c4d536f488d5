// Pipeline parallelism (parallel.pipeline_parallel: P): the transformer's blocks are
// split into P stages on P consecutive ranks; stage 0 also holds the embedding, the
// last stage the final norm and the output head. A step's micro-batches flow
// through the stages: activations forward and their gradients backward, point to
// point between neighbouring stages. What runs when on a stage is its schedule:
//
//   gpipe  every forward, then every backward: M micro-batches' activations kept
//   1f1b   P - s - 1 forwards to fill the pipe, then one forward and one backward
//          in turn, then the remaining backwards: at most P - s kept on stage s
//   interleaved_1f1b  (Megatron-LM's interleaved schedule, Narayanan et al. 2021)
//          the blocks are split into P x V chunks and rank s holds chunks s, s + P,
//          ..., s + (V - 1) P (V = parallel.pp_virtual_stages), so a micro-batch
//          passes every rank V times. Forwards go through the ranks' chunks in
//          groups of P micro-batches: (P - s - 1) x 2 + (V - 1) x P of them fill the
//          pipe, then one forward and one backward in turn, then the remaining
//          backwards (last chunk first). Each chunk is 1/V of a stage, so the
//          bubble shrinks from (P - 1) / (M + P - 1) to (P - 1) / (V M + P - 1) of
//          the step, for more activations in flight (counted in chunks: at most
//          that fill + 1 on rank s) and V times the messages. M must be a multiple
//          of P.
//   dualpipev  DeepSeek's DualPipe-V ("cut-in-half" DualPipe): 2P chunks placed
//          in a V, rank s holding chunks s and 2P - 1 - s, so rank 0 runs both the
//          embedding and the head and a micro-batch goes down the ranks and back
//          up. Its eight phases (DeepSeek's open DualPipe): (P - s - 1) x 2
//          forwards of chunk 0; s + 1 pairs of forwards (0, 1); P - s - 1 of
//          (backward 1, forward 1); M - 2P + s + 1 of (forward 0, backward 1,
//          forward 1, backward 0), where a forward of one chunk meets a backward of
//          the other; P - s - 1 of (backward 1, forward 1, backward 0); s + 1 of
//          (backward 1, backward 0); P - s - 1 backwards of chunk 0. With
//          `zero_bubble` some backwards are split (Qi et al.'s zero-bubble B / W):
//          they make only the input gradients, which the previous rank waits for,
//          and leave the weight gradients to W steps that fill the idle time:
//          each backward of phase 3 is followed by its W, the second half of
//          phase 6's backwards are split, phase 7 is P - s - 1 of (W, split
//          backward 0) and phase 8 is s + 1 W steps. W steps run the deferred
//          weight gradients oldest first. At most 2P + 1 chunks in flight on
//          every rank; M >= 2P.
//
// Backwards of a chunk run in micro-batch order on every schedule, so each
// parameter's gradients are added in the canonical order of parallel/ordered_sum.h.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace brigade::parallel {

enum class PipelineSchedule { kGpipe, k1F1B, kInterleaved1F1B, kDualPipeV };
std::string to_string(PipelineSchedule schedule);
PipelineSchedule parse_pipeline_schedule(const std::string& name);

struct PipelineAction {
  // kWeight: the weight gradients a split backward left (of `micro` and `chunk`).
  enum class Kind { kForward, kBackward, kWeight } kind = Kind::kForward;
  int64_t micro = 0;
  int chunk = 0;  // which of the rank's chunks (0 .. V - 1): model chunk chunk x P + stage
  bool split = false;  // a backward whose weight gradients wait for a kWeight action
  bool operator==(const PipelineAction&) const = default;
};

// Stage `stage` of `stages`: its actions for `micro_batches` micro-batches, in order.
// `chunks` (V) is 1 except for interleaved_1f1b, where it is at least 2 and
// micro_batches must be a multiple of `stages` (an Error naming the keys), and
// dualpipev (2). `zero_bubble`: dualpipev's split backwards and W steps.
std::vector<PipelineAction> pipeline_schedule(PipelineSchedule schedule, int stages, int stage, int64_t micro_batches,
                                              int chunks = 1, bool zero_bubble = false);

// The micro-batches per step a schedule needs with `stages` ranks: a multiple of
// the stages for interleaved_1f1b, at least twice them for dualpipev. An Error
// naming trainer.grad_accum_steps and parallel.pipeline_parallel otherwise.
void check_pipeline_micro_batches(PipelineSchedule schedule, int64_t stages, int64_t micro_batches);

// Where the chunks are: the model chunk (0 .. P x V - 1, in model order) of rank
// `stage`'s chunk v, and the rank holding model chunk c.
int pipeline_model_chunk(PipelineSchedule schedule, int stages, int stage, int v);
int pipeline_chunk_rank(PipelineSchedule schedule, int stages, int model_chunk);

// The bubble a schedule leaves when every chunk's forward takes the same time and
// its backward twice that, as a fraction of the step: (P - 1) / (V M + P - 1).
double theoretical_bubble(int stages, int64_t micro_batches, int chunks = 1);

// The most micro-batches whose forward ran and whose backward has not, over the
// actions (a split backward's deferred weight gradients not counted).
int64_t max_in_flight(const std::vector<PipelineAction>& actions);

// Where the stages' blocks begin: `stages + 1` boundaries, stage s running blocks
// [b[s], b[s + 1]). With `layers_per_stage` (parallel.pp_layers) given: its counts,
// in stage order. Otherwise balanced by parameters: the contiguous split that
// minimises the largest stage's parameters, where stage 0 also holds `first_extra`
// (the embedding) and the last stage `last_extra` (final norm, head, MTP modules);
// among those, the one whose block counts are closest to even. Every stage gets a
// block; a list that does not fit is an Error naming parallel.pp_layers.
std::vector<int64_t> stage_boundaries(const std::vector<int64_t>& block_params, int64_t first_extra,
                                      int64_t last_extra, int stages,
                                      const std::vector<int64_t>& layers_per_stage = {});

}  // namespace brigade::parallel
