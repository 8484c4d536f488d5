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

// data.tokenizer as a tokenizer: data::make_tokenizer's names ("byte", a tokenizer.json
// or its directory), or a .gguf file whose vocabulary is rebuilt
// (model::read_gguf_tokenizer).
std::unique_ptr<data::Tokenizer> make_tokenizer(const std::string& name);

// A freshly initialised model from trainer.seed, then model.init_from's weights when
// `with_init_from` (a run resuming from its own checkpoint skips reading them).
model::Transformer build_model(const Recipe& recipe, bool with_init_from = true);

// The sampler options for this recipe, for data-parallel rank `rank` of `ranks`.
data::SamplerOptions sampler_options(const Recipe& recipe, bool eval, int rank = 0, int ranks = 1);

// Where a rank computes and how the ranks talk, decided from the recipe and the
// machine before any work is done.
struct Placement {
  c10::Device device{c10::kCPU};
  parallel::Backend backend = parallel::Backend::kSingle;
  int64_t threads = 1;  // intra-op CPU threads
};
// What the placement depends on besides the recipe (launch/ gathers it).
struct MachineFacts {
  parallel::World world;
  DeviceFacts devices;  // for world.local_rank of world.local_size
  int64_t cores = 1;
  bool nccl_built = false;
};
// Requests this machine cannot serve are an Error naming the recipe key: cuda with
// no GPU, more ranks on a node than GPUs, nccl on CPUs, FP8 on a GPU older than sm_89.
Placement plan_placement(const Recipe& recipe, const MachineFacts& machine);
// This process's facts, as a single process (local rank 0 of 1) sees them.
MachineFacts this_machine(const parallel::World& world = {});

// Everything wired: model, samplers, trainer with the default hooks. With a
// data-parallel group (not owned; outlives the trainer) each rank samples its own
// slice of the global batch and gradients are summed over the group, on the group's
// device; alone, the trainer computes where plan_placement(recipe, this_machine()) says. `resuming`: the
// caller restores a checkpoint next, so model.init_from's weights are not read.
std::unique_ptr<trainer::Trainer> build_trainer(const Recipe& recipe, const std::filesystem::path& run_dir,
                                                parallel::Communicator* data_parallel = nullptr,
                                                bool resuming = false);

}  // namespace brigade::recipes
