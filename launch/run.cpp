// train, generate and demo.
#include <malloc.h>
#include <unistd.h>

#include <climits>
#include <csignal>
#include <cmath>

#include <iostream>
#include <thread>

#include <torch/torch.h>

#include "core/device.h"
#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "data/arith.h"
#include "data/tokenizer.h"
#include "distill/verify.h"
#include "launch/commands.h"
#include "launch/report.h"
#include "launch/world.h"
#include "parallel/communicator.h"
#include "model/generate.h"
#include "model/speculative.h"
#include "moe/options.h"
#include "recipes/build.h"
#include "recipes/recipe.h"
#include "trainer/checkpoint.h"

namespace brigade::launch {
namespace fs = std::filesystem;

fs::path default_run_dir(const recipes::Recipe& recipe, const fs::path& requested) {
  return requested.empty() ? fs::path("runs") / recipe.name : requested;
}

// Refuses to start a fresh run on top of an existing one: nothing already in the
// run directory may be overwritten.
namespace {

void check_fresh_run_dir(const fs::path& run_dir) {
  const trainer::CheckpointStore store(run_dir / "checkpoints", 1);
  const bool has_checkpoints = !store.list().empty();
  const bool has_metrics = fs::exists(run_dir / "metrics.jsonl") && fs::file_size(run_dir / "metrics.jsonl") > 0;
  BRIGADE_CHECK(!has_checkpoints && !has_metrics, "run directory ", run_dir.string(),
                " already holds a run; pass --resume to continue it, or --run-dir for a new one");
}

void log_model(const recipes::Recipe& r, model::Transformer& model) {
  const auto count = model->parameter_count();
  const auto& mla = r.model.mla;
  const std::string attention =
      r.model.is_mla() ? " heads (MLA: kv latent " + std::to_string(mla.kv_lora_rank) + ", rope " +
                             std::to_string(mla.qk_rope_head_dim) + ", q latent " + std::to_string(mla.q_lora_rank) + ")"
                       : " heads (" + std::to_string(r.model.kv_heads()) + " kv)";
  log_info("model: ", r.model.n_layers, " layers, d_model ", r.model.d_model, ", ", r.model.n_heads, attention,
           ", d_ff ", r.model.ff_size(), ", vocab ", r.model.vocab_size);
  if (r.model.rope_scaling.enabled())
    log_info("rope scaling: ", model::to_string(r.model.rope_scaling.type), " x", r.model.rope_scaling.factor);
  if (r.model.moe.enabled()) {
    const auto& m = r.model.moe;
    log_info("moe: layers ", m.first_k_dense, "..", r.model.n_layers - 1, ", ", m.num_experts, " routed experts (top-",
             m.top_k, ", d_ff ", m.expert_size(r.model.ff_size()), ") + ", m.num_shared_experts,
             " shared, router ", moe::to_string(m.score_function), ", ",
             m.dropless ? std::string("dropless") : "capacity factor " + std::to_string(m.capacity_factor));
  }
  log_info("parameters: ", human_count(static_cast<double>(count.total)), " total, ",
           human_count(static_cast<double>(count.activated)), " activated per token (",
           human_count(static_cast<double>(count.embedding)), " embedding), training FLOPs/token ",
           human_count(count.train_flops_per_token(r.model, r.data.seq_len)), " at seq_len ", r.data.seq_len);
}

}  // namespace

std::vector<std::string> checkpoint_overrides(const std::vector<std::string>& overrides) {
  // The weights come from the checkpoint: the Hugging Face directory a run started
  // from is neither read nor needed any more.
  std::vector<std::string> out{"model.init_from=''"};
  out.insert(out.end(), overrides.begin(), overrides.end());
  return out;
}

LoadedModel load_model(const fs::path& checkpoint, const std::vector<std::string>& overrides) {
  const fs::path dir = trainer::resolve_checkpoint(checkpoint);
  const auto ck = trainer::load_checkpoint(dir);
  LoadedModel out;
  out.recipe = recipes::parse_recipe(ck.recipe_yaml, (dir / "recipe.yaml").string(),
                                     checkpoint_overrides(overrides), dir);
  out.model = model::Transformer(out.recipe.model);
  out.model->enable_fp8(out.recipe.precision.fp8);
  trainer::load_weights(out.model->state_dict(), ck.model, "checkpoint " + dir.string());
  // Generation, serving, evaluation and the distillation teacher compute where the
  // recipe's trainer.device says (auto: the GPU when one is visible; --set
  // trainer.device=cpu overrides a checkpoint trained on a GPU), checked as a training
  // run is checked before any work.
  const auto device = recipes::plan_placement(out.recipe, recipes::this_machine()).device;
  if (!device.is_cpu()) {
    out.model->to(device);
    log_info("model on ", device.str(), " (trainer.device=", to_string(out.recipe.trainer.device), ")");
  }
  return out;
}


fs::path find_shipped_recipe(const std::string& relative) {
  if (fs::exists(relative)) return relative;
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (const fs::path& root : {exe.parent_path().parent_path(), exe.parent_path()}) {
      if (fs::exists(root / relative)) return root / relative;
    }
  }
  BRIGADE_FAIL("cannot find ", relative, " in the working directory or next to the brigade executable");
}

void configure_allocator() {
  mallopt(M_MMAP_MAX, 0);              // large blocks come from the heap and are reused
  mallopt(M_TRIM_THRESHOLD, INT_MAX);  // never hand the heap top back to the kernel
}

void configure_threads(int64_t threads) {
  const int64_t n = threads > 0 ? threads : static_cast<int64_t>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(static_cast<int>(n));
  log_info("compute threads: ", n, "; ", describe_devices());
}

// Every rank must train the same recipe: rank 0's hash (16 hex digits) is compared
// with everyone's.
void check_same_recipe(parallel::Communicator& world, const std::string& hash) {
  const auto on = torch::TensorOptions().dtype(torch::kLong).device(world.device());
  auto mine = torch::full({1}, static_cast<int64_t>(std::stoull(hash, nullptr, 16)), on);
  auto all = torch::empty({world.size()}, on);
  world.all_gather(mine, all).wait();
  const auto hashes = all.cpu();
  for (int r = 1; r < world.size(); ++r) {
    BRIGADE_CHECK(hashes[r].item<int64_t>() == hashes[0].item<int64_t>(), "rank ", r,
                  " runs a different recipe than rank 0 (after --set overrides): every rank must train the same one");
  }
}

namespace {

// Preemption (Slurm's SIGTERM before a time limit, --signal=USR1@N, a scheduler's
// SIGUSR1): the handler only notes the signal; the trainer reads the note once per
// step, the ranks agree through the step's all-reduce, and the run ends after that
// step with a checkpoint. A second signal while saving just notes it again.
volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void note_stop_signal(int signal) { g_stop_signal = signal; }

void install_stop_signals() {
  struct sigaction action {};
  action.sa_handler = note_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;  // system calls in flight (file writes, MPI) carry on
  for (int signal : {SIGTERM, SIGUSR1}) sigaction(signal, &action, nullptr);
}

}  // namespace

int train_command(const TrainArgs& args) {
  const DetectedWorld detected = detect_world();
  if (detected.world.size > 1) {
    set_log_rank(detected.world.rank);
    set_error_rank(detected.world.rank);
  }
  return train_recipe(recipes::load_recipe(args.recipe, args.overrides), args.run_dir, args.resume);
}

int train_recipe(const recipes::Recipe& recipe, const fs::path& requested_run_dir, bool resume) {
  // Ranks first: a multi-rank job (mpirun, srun, brigade launch) talks over MPI on
  // CPUs and NCCL on GPUs.
  const DetectedWorld detected = detect_world();
  std::unique_ptr<parallel::Communicator> world;
  // Everything that can reject the input runs before the run directory is touched,
  // the device and back end included (cuda without a GPU, nccl on CPUs, ...).
  recipes::validate(recipe);
  const recipes::Placement placement = recipes::plan_placement(recipe, recipes::this_machine(detected.world));
  log_info("device: ", placement.device.str(), " (trainer.device=", to_string(recipe.trainer.device), ")");
  if (detected.world.size > 1) {
    world = parallel::make_world_communicator(
        detected.world, {placement.backend, std::chrono::seconds(recipe.parallel.timeout_s)});
    BRIGADE_CHECK(world->device() == placement.device, "rank ", detected.world.rank, " computes on ",
                  placement.device.str(), " but its ", parallel::to_string(placement.backend),
                  " communicator moves tensors on ", world->device().str());
    std::string layout = "data parallel over " + parallel::to_string(placement.backend);
    if (recipe.parallel.zero_stage == 1) layout += ", ZeRO-1 optimizer sharding";
    if (recipe.parallel.expert_parallel > 1) {
      layout += detail::concat(", expert parallel in groups of ", recipe.parallel.expert_parallel,
                               recipe.parallel.ep_fp8_dispatch ? " (FP8 dispatch)" : "");
    }
    log_info("world: ", world->size(), " ranks (", detected.source, "), ", layout);
    check_same_recipe(*world, recipes::recipe_hash(recipe));
  }
  const fs::path run_dir = default_run_dir(recipe, requested_run_dir);
  std::optional<trainer::LoadedCheckpoint> checkpoint;
  if (resume) {
    const trainer::CheckpointStore store(run_dir / "checkpoints", 1);
    if (auto latest = store.latest()) {
      checkpoint = trainer::load_checkpoint(*latest);
    } else {
      check_fresh_run_dir(run_dir);
      log_warn("--resume: no checkpoint in ", run_dir.string(), "; starting a new run");
    }
  } else {
    check_fresh_run_dir(run_dir);
  }

  configure_threads(placement.threads);
  // Resuming: the checkpoint replaces every weight, so model.init_from is not read.
  auto trainer = recipes::build_trainer(recipe, run_dir, world.get(), checkpoint.has_value());
  if (checkpoint) trainer->resume(*checkpoint);
  log_model(recipe, trainer->model());

  if (!world || world->rank() == 0) {
    fs::create_directories(run_dir);
    write_file_atomic(run_dir / "recipe.yaml", recipes::dump_recipe(recipe));
  }
  log_info("run directory: ", run_dir.string());
  if (trainer->finished()) {
    log_info("already at step ", trainer->current_step(), ": nothing to train");
    return 0;
  }
  install_stop_signals();
  trainer->set_stop_request([] { return g_stop_signal != 0; });
  trainer->run();
  if (world) world->barrier().wait();  // rank 0's last checkpoint is written
  const std::string latest = trainer->checkpoints().latest().value_or("(none)").string();
  if (trainer->stopped_by_request()) {
    log_info("stopped by a signal at step ", trainer->current_step(), ", checkpoint ", latest,
             "; --resume continues (exit status ", kExitRequeue, ": requeue the job)");
    return kExitRequeue;
  }
  log_info("done: step ", trainer->current_step(), ", checkpoint ", latest);
  return 0;
}

int generate_command(const GenerateArgs& args) {
  auto loaded = load_model(args.checkpoint, args.overrides);
  auto tokenizer = recipes::make_tokenizer(loaded.recipe.data.tokenizer);
  model::SamplingOptions sampling;
  sampling.max_new_tokens = args.max_new_tokens;
  sampling.temperature = args.temperature;
  sampling.top_k = args.top_k;
  sampling.top_p = args.top_p;
  sampling.seed = args.seed;
  if (!args.raw) sampling.stop_ids = {tokenizer->eos_id()};
  std::vector<int64_t> prompt = data::sequence_start(*tokenizer);
  for (int64_t id : tokenizer->encode(args.prompt)) prompt.push_back(id);
  model::Generation result;
  if (args.speculative == "mtp") {
    model::SpeculativeStats stats;
    result = model::generate_speculative(loaded.model, prompt, sampling, 0, &stats);
    std::cerr << "speculative mtp: " << result.tokens.size() << " tokens in " << stats.rounds + 1
              << " main-model forwards, " << stats.accepted << " of " << stats.drafted << " drafts accepted ("
              << std::lround(100.0 * stats.acceptance()) << "%)\n";
  } else {
    result = model::generate(loaded.model, prompt, sampling);
  }
  if (result.stopped) result.tokens.pop_back();  // the EOS itself is not text
  std::cout << args.prompt << tokenizer->decode(result.tokens) << std::endl;
  return 0;
}

int demo_command(const DemoArgs& args) {
  const fs::path recipe_path = find_shipped_recipe("recipes/distill-arith.yaml");
  std::vector<std::string> overrides = args.overrides;
  if (args.eval_problems > 0) overrides.push_back("distill.eval.problems=" + std::to_string(args.eval_problems));
  const recipes::Recipe recipe = recipes::load_recipe(recipe_path, overrides);
  const fs::path run_dir = default_run_dir(recipe, args.run_dir);
  std::cout << "brigade demo: " << recipe_path.string() << " into " << run_dir.string() << "\n"
            << "  teacher   train an MoE on step-by-step arithmetic (" << recipe.distill.teacher.recipe << ")\n"
            << "  generate  the teacher solves " << recipe.distill.num_prompts << " training problems\n"
            << "  verify    keep the solutions with a closed <think> and the right \\boxed{} answer\n"
            << "  build     pack them for the student, loss on the solutions only\n"
            << "  train     fine-tune the dense student on them\n"
            << "  eval      pass@1 and pass@" << recipe.distill.eval.k << " of both on " << recipe.distill.eval.problems
            << " held-out problems\n"
            << "Finished stages are reused; an interrupted run continues where it stopped.\n\n"
            << std::flush;
  if (int rc = distill_command({recipe_path, overrides, run_dir, ""}); rc != 0) return rc;
  // The run as a page: stage table, pass@k, teacher and student curves.
  if (int rc = report_command({{run_dir}, run_dir / "report.html"}); rc != 0) return rc;
  if (args.samples <= 0) return 0;

  // A few of the student's greedy solutions to held-out problems.
  const fs::path student = run_dir / "distill" / "train" / "run";
  auto loaded = load_model(student, {});
  auto tokenizer = recipes::make_tokenizer(recipe.data.tokenizer);
  model::SamplingOptions greedy;
  greedy.max_new_tokens = recipe.distill.generate.max_new_tokens;
  greedy.stop_ids = {tokenizer->eos_id()};
  const auto& synth = recipe.data.synthetic;
  std::cout << "\nThe student on held-out problems (greedy):\n";
  for (int64_t i = 0; i < args.samples; ++i) {
    auto problem = data::make_arithmetic_problem(synth, static_cast<uint64_t>(synth.num_problems + i));
    std::vector<int64_t> prompt = data::sequence_start(*tokenizer);
    for (int64_t id : tokenizer->encode(problem.prompt)) prompt.push_back(id);
    auto result = model::generate(loaded.model, prompt, greedy);
    if (result.stopped) result.tokens.pop_back();
    const std::string text = tokenizer->decode(result.tokens);
    // The eval stage's grader (distill/verify.h), so the samples are judged as pass@1 is.
    const auto answer = distill::extract_answer(text, recipe.distill.verify);
    const bool ok = answer && distill::answers_match(*answer, problem.answer, recipe.distill.verify.numeric_tolerance);
    std::cout << "----------------------------------------\n" << problem.prompt << text << "\n"
              << (ok ? "  [correct]" : "  [wrong: expected " + problem.answer + "]") << "\n";
  }
  std::cout << "----------------------------------------\n"
            << "run directory: " << run_dir.string() << " (teacher/, distill/<stage>/, distill/eval.json)\n"
            << "take the student to llama.cpp / Ollama or transformers (docs/formats.md):\n"
            << "  brigade export --checkpoint " << student.string() << " --format gguf --quant q8_0 --out student.gguf\n"
            << "  brigade export --checkpoint " << student.string() << " --format hf --out student-hf/\n";
  return 0;
}

}  // namespace brigade::launch
