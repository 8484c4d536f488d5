// Turning a Recipe into live objects: the model, the corpora and samplers, the
// trainer. Shared by the CLI, the benchmarks and the tests.
#pragma once

#include <filesystem>
#include <memory>

#include "data/sampler.h"
#include "data/tokenizer.h"
#include "model/transformer.h"
#include "recipes/recipe.h"
#include "trainer/trainer.h"

namespace brigade::recipes {

struct Corpora {
  data::TokenCorpus train;
  data::TokenCorpus eval;
};

// Generates (synthetic) or opens (shards) the corpus and splits off the eval part.
// Token ids beyond model.vocab_size are an Error naming the shard.
Corpora build_corpora(const Recipe& recipe, const data::Tokenizer& tokenizer);

// A freshly initialised model from trainer.seed, then model.init_from's weights when
// `with_init_from` (a run resuming from its own checkpoint skips reading them).
model::Transformer build_model(const Recipe& recipe, bool with_init_from = true);

// The sampler options for this recipe, for data-parallel rank `rank` of `ranks`.
data::SamplerOptions sampler_options(const Recipe& recipe, bool eval, int rank = 0, int ranks = 1);

// Everything wired: model, samplers, trainer with the default hooks. With a
// data-parallel group (not owned; outlives the trainer) each rank samples its own
// slice of the global batch and gradients are summed over the group. `resuming`: the
// caller restores a checkpoint next, so model.init_from's weights are not read.
std::unique_ptr<trainer::Trainer> build_trainer(const Recipe& recipe, const std::filesystem::path& run_dir,
                                                parallel::Communicator* data_parallel = nullptr,
                                                bool resuming = false);

}  // namespace brigade::recipes
