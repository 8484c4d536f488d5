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

// A freshly initialised model from trainer.seed.
model::Transformer build_model(const Recipe& recipe);

// The sampler options for this recipe (rank 0 of 1 until the distributed issue).
data::SamplerOptions sampler_options(const Recipe& recipe, bool eval);

// Everything wired: model, samplers, trainer with the default hooks.
std::unique_ptr<trainer::Trainer> build_trainer(const Recipe& recipe, const std::filesystem::path& run_dir);

}  // namespace brigade::recipes
