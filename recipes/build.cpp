#include "recipes/build.h"

#include <algorithm>

#include <torch/torch.h>

#include <thread>

#include "core/device.h"
#include "core/error.h"
#include "core/hash.h"
#include "core/log.h"
#include "data/arith.h"
#include "model/gguf_import.h"
#include "model/hf.h"
#include "distill/kd_objective.h"
#include "parallel/nccl_communicator.h"
#include "trainer/plan.h"

namespace brigade::recipes {

Corpora build_corpora(const Recipe& r, const data::Tokenizer& tokenizer) {
  Corpora c;
  if (r.data.source == data::DataSource::kSynthetic) {
    c.train = data::make_arithmetic_corpus(r.data.synthetic, tokenizer, /*eval=*/false);
    c.eval = data::make_arithmetic_corpus(r.data.synthetic, tokenizer, /*eval=*/true);
  } else {
    std::vector<std::filesystem::path> paths(r.data.shards.begin(), r.data.shards.end());
    auto all = data::TokenCorpus::from_shards(paths);
    BRIGADE_CHECK(all.vocab_bound() <= r.model.vocab_size, "data.shards hold token ids up to ",
                  all.vocab_bound() - 1, " but model.vocab_size is ", r.model.vocab_size);
    auto eval_tokens = static_cast<int64_t>(static_cast<double>(all.size()) * r.data.eval_fraction);
    if (r.data.packed) {
      // Whole rows: at least one held out, at least one to train on.
      const int64_t row = r.data.seq_len + 1, rows = all.size() / row;
      BRIGADE_CHECK(rows >= 2, "data.shards hold ", rows, " packed rows of ", row,
                    " tokens: at least 2 are needed (one held out for eval)");
      eval_tokens = std::clamp<int64_t>(eval_tokens / row, 1, rows - 1) * row;
    }
    BRIGADE_CHECK(eval_tokens > r.data.seq_len && all.size() - eval_tokens > r.data.seq_len,
                  "data.shards hold ", all.size(), " tokens: too few for data.seq_len ", r.data.seq_len,
                  " with data.eval_fraction ", r.data.eval_fraction);
    c.train = all.slice(0, all.size() - eval_tokens);
    c.eval = all.slice(all.size() - eval_tokens, all.size());
  }
  return c;
}

std::unique_ptr<data::Tokenizer> make_tokenizer(const std::string& name) {
  const std::filesystem::path path(name);
  if (path.extension() == ".gguf" && std::filesystem::is_regular_file(path))
    return model::read_gguf_vocabulary(path);
  return data::make_tokenizer(name);
}

model::Transformer build_model(const Recipe& r, bool with_init_from) {
  torch::manual_seed(r.trainer.seed);
  model::Transformer model(r.model);
  if (with_init_from && !r.model.init_from.empty()) {
    const std::filesystem::path from = r.model.init_from;
    if (from.extension() == ".gguf") model::load_gguf_weights(*model, from);
    else model::load_hf_weights(*model, from);
  }
  model->enable_fp8(r.precision.fp8);
  return model;
}

data::SamplerOptions sampler_options(const Recipe& r, bool eval, int rank, int ranks) {
  data::SamplerOptions o;
  o.rank = rank;
  o.world_size = ranks;
  o.seq_len = r.data.seq_len;
  o.micro_batch_size = r.trainer.micro_batch_size;
  if (!eval) o.micro_batches = r.trainer.grad_accum_steps;
  if (r.data.packed) {
    const auto tokenizer = make_tokenizer(r.data.tokenizer);
    if (tokenizer->add_bos()) o.document_start = tokenizer->bos_id();
    else o.document_end = tokenizer->eos_id();
  }
  // Eval batches come from a different stream so they never mirror training batches.
  o.seed = eval ? mix64(r.trainer.seed ^ 0x65766131ULL) : r.trainer.seed;
  return o;
}

Placement plan_placement(const Recipe& r, const MachineFacts& m) {
  Placement p;
  p.device = choose_device(r.trainer.device, m.devices, "trainer.device");
  p.backend = parallel::choose_backend(r.parallel.backend, p.device, m.world.size, m.nccl_built);
  if (p.device.is_cuda()) {
    const int gpu = p.device.index();
    const int capability = m.devices.capabilities.at(gpu);
    const bool fp8 = r.precision.fp8.enabled() || r.parallel.ep_fp8_dispatch;
    const std::string what = r.precision.fp8.enabled() ? "precision.fp8_recipe is " + precision::to_string(r.precision.fp8.recipe)
                                                       : std::string("parallel.ep_fp8_dispatch is true");
    BRIGADE_CHECK(!fp8 || capability >= 89, what, " but GPU ", gpu, " is sm_", capability,
                  ", which has no FP8 tensor cores (sm_89 or newer: Ada, Hopper, Blackwell); "
                  "set precision.fp8_recipe=none and parallel.ep_fp8_dispatch=false, or use trainer.device=cpu (emulated FP8)");
    BRIGADE_CHECK(!fp8 || r.precision.fp8.cuda_kernels, what,
                  " on CUDA: FP8 there runs brigade's own quantize kernels and cuBLASLt GEMMs, which have not yet "
                  "passed their *_CUDA tests on a GPU (docs/gpu.md); set precision.fp8_cuda_kernels=true to use them "
                  "anyway, or precision.fp8_recipe=none for BF16");
  }
  const int64_t per_node = std::max(1, m.world.local_size);
  p.threads = r.trainer.threads > 0 ? r.trainer.threads : std::max<int64_t>(1, m.cores / per_node);
  return p;
}

MachineFacts this_machine(const parallel::World& world) {
  MachineFacts m;
  m.world = world;
  m.devices.local_rank = world.local_rank;
  m.devices.local_ranks = world.local_size;
  m.devices.cuda_built = cuda_built();
  for (int i = 0; i < cuda_device_count(); ++i) m.devices.capabilities.push_back(cuda_capability(i));
  m.cores = std::max(1u, std::thread::hardware_concurrency());
  m.nccl_built = parallel::nccl_built();
  return m;
}

std::unique_ptr<trainer::Trainer> build_trainer(const Recipe& r, const std::filesystem::path& run_dir,
                                                parallel::Communicator* data_parallel, bool resuming) {
  const bool kd = r.distill.kd.loss != distill::KdLoss::kNone;
  BRIGADE_CHECK(!kd || (r.data.source == data::DataSource::kShards && r.data.packed && !r.data.kd_file.empty()),
                "distill.kd.loss is ", distill::to_string(r.distill.kd.loss),
                ": logit distillation trains on a packed shard with its teacher top-k (data.source: shards, "
                "data.packed: true, data.kd_file); `brigade distill` sets them in its train stage");
  auto tokenizer = data::make_tokenizer(r.data.tokenizer);
  Corpora corpora = build_corpora(r, *tokenizer);
  trainer::RunContext context{run_dir, dump_recipe(r), recipe_hash(r), model_fingerprint(r)};
  context.data_parallel = data_parallel;
  context.device = data_parallel && data_parallel->size() > 1 ? data_parallel->device()
                                                               : plan_placement(r, this_machine()).device;
  context.bucket_bytes = r.parallel.bucket_bytes();
  context.zero_stage = r.parallel.zero_stage;
  context.expert_parallel = r.parallel.expert_parallel;
  context.ep_fp8_dispatch = r.parallel.ep_fp8_dispatch;
  context.pipeline_parallel = r.parallel.pipeline_parallel;
  context.pp_schedule = r.parallel.pp_schedule;
  context.pp_layers = r.parallel.pp_layers;
  context.pp_virtual_stages = r.parallel.pp_virtual_stages;
  context.pp_zero_bubble = r.parallel.pp_zero_bubble;
  try {
    trainer::PlanOptions layout;
    layout.gpus = data_parallel ? data_parallel->size() : 1;
    const trainer::PlanInputs in{r.model, r.precision, r.parallel, r.trainer, r.data.seq_len};
    context.planned_memory_bytes = trainer::plan_training(in, layout).memory_total();
  } catch (const Error&) {
    // A layout brigade plan does not model (it says why when run): nothing to compare.
  }
  if (kd) {
    auto targets = distill::load_kd_targets(r.data.kd_file);
    // The training split starts at the shards' first token, so the sampler's row
    // offsets index the targets directly.
    const int64_t tokens = corpora.train.size() + corpora.eval.size();
    BRIGADE_CHECK(targets.tokens() == tokens, "data.kd_file ", r.data.kd_file, " has ", targets.tokens(),
                  " positions but data.shards hold ", tokens, " tokens: it belongs to another shard");
    log_info("train: logit distillation (", distill::to_string(r.distill.kd.loss), ", weight ", r.distill.kd.weight,
             ", T ", r.distill.kd.temperature, ") on the teacher's top-", targets.k(), " from ", r.data.kd_file);
    context.objective = std::make_shared<distill::KdObjective>(std::move(targets), r.distill.kd);
  }
  // Pipeline stages of one pipeline train on the same rows: the sampler's ranks are pipelines.
  const int stages = static_cast<int>(std::max<int64_t>(1, r.parallel.pipeline_parallel));
  BRIGADE_CHECK(!data_parallel || data_parallel->size() % stages == 0, "parallel.pipeline_parallel (", stages,
                ") must divide the number of ranks (", data_parallel ? data_parallel->size() : 1, ")");
  const int rank = data_parallel ? data_parallel->rank() / stages : 0;
  const int ranks = data_parallel ? std::max(1, data_parallel->size() / stages) : 1;
  // Evaluation uses the same held-out batches on every rank (rank 0 reports them).
  auto t = std::make_unique<trainer::Trainer>(
      r.trainer, r.precision, build_model(r, /*with_init_from=*/!resuming),
      data::BatchSampler(std::move(corpora.train), sampler_options(r, false, rank, ranks)),
      data::BatchSampler(std::move(corpora.eval), sampler_options(r, true)), std::move(context));
  t->add_default_hooks();
  return t;
}

}  // namespace brigade::recipes
