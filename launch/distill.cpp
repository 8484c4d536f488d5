// `brigade distill RECIPE`: the distillation pipeline, stage by stage. Each stage
// writes into RUN/distill/<stage>/ and is cached by a hash of its inputs (the
// upstream stage's hash and its own options): a complete stage with the same
// inputs is skipped, a partial one continues (generate keeps the samples already
// stored, train resumes from its last checkpoint), and one with other inputs starts
// over. --stage NAME runs one stage (its inputs must exist).
//
//   teacher   RUN/teacher/: train the teacher from distill.teacher.recipe (skipped
//             with distill.teacher.checkpoint)
//   generate  RUN/distill/generate/: the trace store (distill/traces.h)
//   verify    RUN/distill/verify/: accepted.jsonl, stats.json (distill/verify.h)
//   build     RUN/distill/build/: sft.shard, build.json (distill/build.h), and
//             kd.safetensors (the teacher's top-k per shard token) with logprobs
//   train     RUN/distill/train/run/: the student's run (supervised fine-tuning, plus
//             logit distillation on kd.safetensors with distill.kd.loss)
//   onpolicy  RUN/distill/onpolicy/round_RRR/ (distill.onpolicy.rounds > 0): the
//             student's samples scored by the teacher, then KD steps on them in the
//             student's run (distill/onpolicy.h)
//   eval      RUN/distill/eval.json: pass@1 / pass@k of teacher and student
#include <cstdio>
#include <fstream>
#include <iostream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/hash.h"
#include "core/log.h"
#include "data/arith.h"
#include "distill/build.h"
#include "distill/eval.h"
#include "distill/generate.h"
#include "distill/kd.h"
#include "distill/onpolicy.h"
#include "distill/prompts.h"
#include "distill/remote.h"
#include "distill/verify.h"
#include "launch/commands.h"
#include "recipes/build.h"
#include "trainer/checkpoint.h"

namespace brigade::launch {
namespace fs = std::filesystem;
namespace {

const std::vector<std::string> kStages = {"teacher", "generate", "verify", "build", "train", "onpolicy", "eval"};

std::string hex(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

// A stage directory. stage.json {"stage", "inputs", ...} marks it complete for
// those inputs; inputs.json marks a started one.
class Stage {
 public:
  Stage(fs::path dir, std::string name, std::string inputs) : dir_(std::move(dir)), name_(std::move(name)), inputs_(std::move(inputs)) {}
  const fs::path& dir() const { return dir_; }
  const std::string& inputs() const { return inputs_; }
  bool complete() const { return read_inputs(dir_ / "stage.json") == inputs_; }
  // Keeps a partial run with the same inputs; clears one with other inputs.
  void begin() const {
    const auto started = read_inputs(dir_ / "inputs.json");
    if (!started.empty() && started != inputs_) {
      log_info(name_, ": inputs changed since the last run; starting the stage over");
      fs::remove_all(dir_);
    } else if (started.empty() && fs::exists(dir_)) {
      fs::remove_all(dir_);
    }
    fs::create_directories(dir_);
    write_file_atomic(dir_ / "inputs.json", nlohmann::json{{"stage", name_}, {"inputs", inputs_}}.dump() + "\n");
  }
  void finish(nlohmann::json result) const {
    result["stage"] = name_;
    result["inputs"] = inputs_;
    write_file_atomic(dir_ / "stage.json", result.dump(2) + "\n");
  }

 private:
  static std::string read_inputs(const fs::path& file) {
    if (!fs::exists(file)) return "";
    try {
      return nlohmann::json::parse(read_file(file)).at("inputs").get<std::string>();
    } catch (const std::exception&) {
      return "";  // damaged: treated as not started
    }
  }
  fs::path dir_;
  std::string name_;
  std::string inputs_;
};

std::vector<distill::Prompt> builtin_prompts(const data::ArithmeticOptions& synth, int64_t first, int64_t count) {
  std::vector<distill::Prompt> out;
  for (int64_t i = first; i < first + count; ++i) {
    auto problem = data::make_arithmetic_problem(synth, static_cast<uint64_t>(i));
    out.push_back({.id = std::to_string(i), .prompt = problem.prompt, .answer = problem.answer});
  }
  return out;
}

uint64_t hash_prompts(const std::vector<distill::Prompt>& prompts) {
  uint64_t h = 0x70726f6d;
  for (const auto& p : prompts) {
    h = hash_combine(h, fnv1a(p.id));
    h = hash_combine(h, fnv1a(p.prompt));
    h = hash_combine(h, fnv1a(p.answer.value_or("\x01none")));
  }
  return h;
}

uint64_t hash_json(uint64_t seed, const nlohmann::json& j) { return hash_combine(seed, fnv1a(j.dump())); }

}  // namespace

int distill_command(const DistillArgs& args) {
  BRIGADE_CHECK(args.stage.empty() || std::find(kStages.begin(), kStages.end(), args.stage) != kStages.end(),
                "distill: unknown --stage '", args.stage, "'; stages: teacher, generate, verify, build, train, onpolicy, eval");
  const recipes::Recipe recipe = recipes::load_recipe(args.recipe, args.overrides);
  const auto& d = recipe.distill;
  const fs::path run_dir = default_run_dir(recipe, args.run_dir);
  const fs::path work = run_dir / "distill";
  auto want = [&](const std::string& stage) { return args.stage.empty() || args.stage == stage; };
  auto tokenizer = recipes::make_tokenizer(recipe.data.tokenizer);

  // teacher
  fs::path teacher_ck;  // empty with a remote teacher
  if (d.teacher.remote()) {
    log_info("distill: teacher: the server at ", d.teacher.url, " (", d.teacher.api, " API)");
  } else if (!d.teacher.checkpoint.empty()) {
    teacher_ck = trainer::resolve_checkpoint(d.teacher.checkpoint);
  } else {
    const fs::path teacher_recipe = args.recipe.parent_path() / d.teacher.recipe;
    const fs::path teacher_run = run_dir / "teacher";
    if (want("teacher")) {
      log_info("distill: teacher: training ", teacher_recipe.string(), " into ", teacher_run.string());
      if (int rc = train_command({teacher_recipe, {}, teacher_run, /*resume=*/true}); rc != 0) return rc;
    }
    const trainer::CheckpointStore store(teacher_run / "checkpoints", 1);
    BRIGADE_CHECK(store.latest().has_value(), "distill: no teacher checkpoint in ", teacher_run.string(),
                  "; run the teacher stage first (brigade distill ", args.recipe.string(), " --stage teacher)");
    teacher_ck = *store.latest();
  }
  if (args.stage == "teacher") return 0;
  const uint64_t teacher_hash =
      d.teacher.remote()
          ? hash_json(0x72656d6f, {{"url", d.teacher.url}, {"api", d.teacher.api}, {"model", d.teacher.model},
                                     {"extra_body", d.teacher.extra_body}})
          : hash_combine(fnv1a(fs::absolute(teacher_ck).string()), fnv1a(read_file(teacher_ck / "trainer_state.json")));

  // prompts
  std::vector<distill::Prompt> prompts;
  if (d.prompts.empty()) {
    const int64_t n = d.num_prompts > 0 ? d.num_prompts : recipe.data.synthetic.num_problems;
    prompts = builtin_prompts(recipe.data.synthetic, 0, n);
  } else {
    auto set = distill::read_prompts(d.prompts);
    if (!set.skipped.empty()) log_warn(set.describe_skipped(d.prompts));
    prompts = std::move(set.prompts);
    if (d.num_prompts > 0 && static_cast<int64_t>(prompts.size()) > d.num_prompts) prompts.resize(static_cast<size_t>(d.num_prompts));
  }
  BRIGADE_CHECK(!prompts.empty(), "distill: no prompts", d.prompts.empty() ? "" : " in " + d.prompts);

  // generate
  const nlohmann::json gen_options = {{"samples", d.generate.samples}, {"temperature", d.generate.temperature},
                                      {"top_p", d.generate.top_p}, {"max_new_tokens", d.generate.max_new_tokens},
                                      {"logprobs", d.generate.logprobs}, {"seed", d.generate.seed},
                                      {"stop", d.generate.stop}};
  const Stage generate(work / "generate", "generate",
                       hex(hash_json(hash_combine(teacher_hash, hash_prompts(prompts)), gen_options)));
  if (want("generate")) {
    if (generate.complete()) {
      log_info("distill: generate: done (", generate.dir().string(), ")");
    } else {
      generate.begin();
      if (d.teacher.remote()) {
        const auto stats = distill::generate_traces_remote(d.teacher, *tokenizer, prompts, d.generate, generate.dir());
        log_info("distill: generate: ", stats.generated, " new samples, ", stats.retried, " retries, ", stats.failed,
                 " failed", stats.topk_dropped > 0 ? ", " + std::to_string(stats.topk_dropped) +
                                                          " without top-k (candidates outside the student's tokenizer)"
                                                    : std::string());
        BRIGADE_CHECK(stats.failed == 0, "distill: generate: ", stats.failed, " of ", stats.requested,
                      " samples failed after ", d.teacher.retries, " retries (their \"error\" is in ",
                      (generate.dir() / distill::kTracesFile).string(),
                      "); run brigade distill again to ask for them again");
        generate.finish({{"requested", stats.requested}, {"generated", stats.generated},
                         {"already_done", stats.already_done}, {"truncated", stats.truncated},
                         {"retried", stats.retried}, {"topk_dropped", stats.topk_dropped}});
      } else {
        // The teacher reads and writes its own tokenizer's ids (another one than the
        // student's for a cross-tokenizer teacher; its top-k ids are its own too).
        auto loaded_teacher = load_model(teacher_ck, {});
        const auto teacher_tokenizer = recipes::make_tokenizer(loaded_teacher.recipe.data.tokenizer);
        log_info("distill: generate: ", prompts.size(), " prompts x ", d.generate.samples, " samples from ",
                 teacher_ck.string());
        const auto stats =
            distill::generate_traces(loaded_teacher.model, *teacher_tokenizer, prompts, d.generate, generate.dir());
        generate.finish({{"requested", stats.requested}, {"generated", stats.generated},
                         {"already_done", stats.already_done}, {"truncated", stats.truncated}});
      }
    }
  }
  if (args.stage == "generate") return 0;
  BRIGADE_CHECK(generate.complete(), "distill: the generate stage has not finished (", generate.dir().string(),
                "); run it first");

  // verify
  const nlohmann::json verify_options = {{"answer_pattern", d.verify.answer_pattern},
                                         {"require_think", d.verify.require_think}, {"max_chars", d.verify.max_chars},
                                         {"max_tokens", d.verify.max_tokens}, {"tolerance", d.verify.numeric_tolerance}};
  const Stage verify(work / "verify", "verify", hex(hash_json(fnv1a(generate.inputs()), verify_options)));
  if (want("verify")) {
    if (verify.complete()) {
      log_info("distill: verify: done (", verify.dir().string(), ")");
    } else {
      verify.begin();
      auto stats = distill::run_verify(generate.dir(), prompts, d.verify, verify.dir());
      verify.finish({{"accepted", stats["accepted"]}, {"total", stats["total"]}});
    }
  }
  if (args.stage == "verify") return 0;
  BRIGADE_CHECK(verify.complete(), "distill: the verify stage has not finished; run it first");

  // build
  // "kd_targets": builds from before kd.safetensors existed are redone.
  const Stage build(work / "build", "build",
                    hex(hash_json(fnv1a(verify.inputs()), {{"seq_len", recipe.data.seq_len},
                                                            {"tokenizer", recipe.data.tokenizer},
                                                            {"kd_targets", 1},
                                                            {"align_by_index", d.kd.loss == distill::KdLoss::kUld}})));
  if (want("build")) {
    if (build.complete()) {
      log_info("distill: build: done (", build.dir().string(), ")");
    } else {
      build.begin();
      const fs::path sidecar = generate.dir() / distill::kTopkFile;
      build.finish(distill::build_sft_shard(verify.dir() / "accepted.jsonl", *tokenizer, recipe.data.seq_len,
                                            build.dir(), fs::exists(sidecar) ? sidecar : fs::path(),
                                            /*align_by_index=*/d.kd.loss == distill::KdLoss::kUld));
    }
  }
  if (args.stage == "build") return 0;
  BRIGADE_CHECK(build.complete(), "distill: the build stage has not finished; run it first");

  // train: the student's supervised fine-tuning on the packed shard, with logit
  // distillation when distill.kd.loss is set
  const bool kd = d.kd.loss != distill::KdLoss::kNone;
  const nlohmann::json kd_options = {{"loss", distill::to_string(d.kd.loss)}, {"weight", d.kd.weight},
                                     {"temperature", d.kd.temperature}, {"beta", d.kd.beta}};
  // The on-policy keys do not change the supervised stage: adding rounds keeps it.
  recipes::Recipe sft_recipe = recipe;
  sft_recipe.distill.onpolicy = distill::OnPolicyOptions{};
  const Stage train(work / "train", "train",
                    hex(hash_json(hash_combine(fnv1a(build.inputs()), fnv1a(recipes::recipe_hash(sft_recipe))), kd_options)));
  const fs::path student_run = train.dir() / "run";
  if (want("train")) {
    if (train.complete()) {
      log_info("distill: train: done (", student_run.string(), ")");
    } else {
      train.begin();
      auto overrides = args.overrides;
      overrides.push_back("data.source=shards");
      overrides.push_back("data.shards=[" + fs::absolute(build.dir() / distill::kSftShard).string() + "]");
      overrides.push_back("data.packed=true");
      // KD compares distributions id by id: the teacher must speak the student's
      // tokenizer (a remote teacher's candidates were mapped to it in generate).
      if (kd) {
        // ULD compares sorted distributions, not ids: any teacher tokenizer will do.
        if (!d.teacher.remote() && d.kd.loss != distill::KdLoss::kUld) {
          const auto teacher_recipe = recipes::parse_recipe(read_file(teacher_ck / "recipe.yaml"),
                                                            (teacher_ck / "recipe.yaml").string(),
                                                            checkpoint_overrides({}), teacher_ck);
          distill::check_same_tokenizer(teacher_recipe.data.tokenizer,
                                        recipes::make_tokenizer(teacher_recipe.data.tokenizer)->vocab_size(),
                                        recipe.data.tokenizer, tokenizer->vocab_size());
        }
        const fs::path targets = build.dir() / distill::kKdTargets;
        BRIGADE_CHECK(fs::exists(targets), "distill: distill.kd.loss is ", distill::to_string(d.kd.loss), " but ",
                      targets.string(), " does not exist: the accepted samples carry no teacher top-k ",
                      "(was the trace store generated with distill.generate.logprobs > 0?)");
        overrides.push_back("data.kd_file=" + fs::absolute(targets).string());
      }
      log_info("distill: train: the student on ", (build.dir() / distill::kSftShard).string(),
               kd ? " with logit distillation (" + distill::to_string(d.kd.loss) + ")" : std::string());
      if (int rc = train_command({args.recipe, overrides, student_run, /*resume=*/true}); rc != 0) return rc;
      train.finish({{"run", student_run.string()}});
    }
  }
  if (args.stage == "train") return 0;
  BRIGADE_CHECK(train.complete(), "distill: the train stage has not finished; run it first");

  // onpolicy: rounds of the student's own samples, scored by the teacher, trained on
  // with the KD loss alone (distill/onpolicy.h)
  const auto& op = d.onpolicy;
  if (op.enabled() && want("onpolicy")) {  // the teacher scores token ids of the student's vocabulary
    const auto teacher_recipe = recipes::parse_recipe(read_file(teacher_ck / "recipe.yaml"),
                                                      (teacher_ck / "recipe.yaml").string(), checkpoint_overrides({}),
                                                      teacher_ck);
    distill::check_same_tokenizer(teacher_recipe.data.tokenizer,
                                  recipes::make_tokenizer(teacher_recipe.data.tokenizer)->vocab_size(),
                                  recipe.data.tokenizer, tokenizer->vocab_size());
  }
  std::string previous = train.inputs();
  for (int64_t r = 0; r < op.rounds; ++r) {
    const nlohmann::json round_options = {
        {"round", r}, {"steps", op.steps_per_round}, {"prompts", op.prompts_per_round}, {"samples", op.samples},
        {"temperature", op.temperature}, {"topk", op.topk}, {"loss", distill::to_string(op.loss)}, {"beta", op.beta},
        {"lr", op.lr}, {"max_new_tokens", d.generate.max_new_tokens}, {"seed", d.generate.seed}};
    char name[32];
    std::snprintf(name, sizeof name, "round_%03lld", static_cast<long long>(r));
    const Stage round(work / "onpolicy" / name, std::string("onpolicy ") + name,
                      hex(hash_json(hash_combine(fnv1a(previous), teacher_hash), round_options)));
    previous = round.inputs();
    if (!want("onpolicy")) continue;
    if (round.complete()) {
      log_info("distill: onpolicy: ", name, " done");
      continue;
    }
    round.begin();
    const auto round_prompts = distill::round_prompts(prompts, r, op.prompts_per_round);
    {
      // The student as it stands: sampling at the round's seed.
      auto student = load_model(*trainer::CheckpointStore(student_run / "checkpoints", 1).latest(), {}).model;
      distill::GenerateOptions g;
      g.samples = op.samples;
      g.temperature = op.temperature;
      g.top_p = 1.0;
      g.max_new_tokens = d.generate.max_new_tokens;
      g.batch_size = d.generate.batch_size;
      g.stop = d.generate.stop;
      g.seed = hash_combine(d.generate.seed, static_cast<uint64_t>(r) + 0x6f6e706fULL);
      distill::generate_traces(student, *tokenizer, round_prompts, g, round.dir() / "samples");
    }
    {
      auto teacher = load_model(teacher_ck, {}).model;
      const auto s = distill::score_with_teacher(teacher, *tokenizer, round_prompts, round.dir() / "samples", op.topk,
                                                 d.generate.batch_size, round.dir() / "scored");
      log_info("distill: onpolicy: ", name, ": the teacher scored ", s.scored + s.already_done, " student samples (",
               s.skipped, " cut at the token limit left out)");
    }
    const int64_t lines = distill::write_scored_samples(round.dir() / "scored", round_prompts, round.dir() / "accepted.jsonl");
    BRIGADE_CHECK(lines > 0, "distill: onpolicy: ", name, ": no student sample ended within ", d.generate.max_new_tokens,
                  " tokens; raise distill.generate.max_new_tokens");
    const auto built = distill::build_sft_shard(round.dir() / "accepted.jsonl", *tokenizer, recipe.data.seq_len,
                                                round.dir() / "build", round.dir() / "scored" / distill::kTopkFile);
    BRIGADE_CHECK(built["rows"].get<int64_t>() >= 2, "distill: onpolicy: ", name, ": the ", lines,
                  " student samples that ended fill ", built["rows"].get<int64_t>(),
                  " packed row; training needs at least 2 (one is held out): raise distill.onpolicy.prompts_per_round ",
                  "or distill.onpolicy.samples");
    auto overrides = args.overrides;
    for (const std::string& o :
         {std::string("data.source=shards"),
          "data.shards=[" + fs::absolute(round.dir() / "build" / distill::kSftShard).string() + "]",
          std::string("data.packed=true"),
          "data.kd_file=" + fs::absolute(round.dir() / "build" / distill::kKdTargets).string(),
          "distill.kd.loss=" + distill::to_string(op.loss), std::string("distill.kd.weight=1"),
          // the KD checks ask for the teacher's top-k: the round's scored store holds it
          "distill.generate.logprobs=" + std::to_string(op.topk),
          std::string("distill.kd.temperature=1"), "distill.kd.beta=" + std::to_string(op.beta),
          "trainer.max_steps=" + std::to_string(recipe.trainer.max_steps + (r + 1) * op.steps_per_round),
          "trainer.lr=" + std::to_string(op.lr), "trainer.min_lr=" + std::to_string(op.lr),
          std::string("trainer.warmup_steps=0")})
      overrides.push_back(o);
    log_info("distill: onpolicy: ", name, ": ", lines, " student samples, ", op.steps_per_round, " steps of ",
             distill::to_string(op.loss));
    if (int rc = train_command({args.recipe, overrides, student_run, /*resume=*/true}); rc != 0) return rc;
    round.finish({{"samples", lines}});
  }
  if (args.stage == "onpolicy") return 0;

  // eval: held-out built-in problems (the data.synthetic eval range)
  const auto held_out = builtin_prompts(recipe.data.synthetic, recipe.data.synthetic.num_problems, d.eval.problems);
  nlohmann::json table = nlohmann::json::array();
  std::printf("\n| model | parameters | pass@1 | pass@%lld |\n|---|---|---|---|\n", static_cast<long long>(d.eval.k));
  std::string student_label = kd ? "student (SFT + KD " + distill::to_string(d.kd.loss) : "student (SFT";
  if (op.enabled()) student_label += " + on-policy " + distill::to_string(op.loss);
  student_label += ")";
  // A remote teacher is not scored here (the eval runs brigade models locally).
  std::vector<std::pair<std::string, fs::path>> models;
  if (!d.teacher.remote()) models.emplace_back("teacher", teacher_ck);
  models.emplace_back(student_label, *trainer::CheckpointStore(student_run / "checkpoints", 1).latest());
  for (const auto& [label, checkpoint] : models) {
    auto loaded = load_model(checkpoint, {});
    auto& model = loaded.model;
    const auto model_tokenizer = recipes::make_tokenizer(loaded.recipe.data.tokenizer);  // each its own
    const auto r = distill::evaluate_pass_at_k(model, *model_tokenizer, held_out, d.eval, d.verify,
                                               d.generate.max_new_tokens, d.generate.batch_size, label);
    const auto params = model->parameter_count().total;
    std::printf("| %s | %s | %.1f%% | %.1f%% |\n", label.c_str(), human_count(static_cast<double>(params)).c_str(),
                100.0 * r.pass1, 100.0 * r.passk);
    auto row = r.to_json();
    row["model"] = label;
    row["checkpoint"] = checkpoint.string();
    row["parameters"] = params;
    table.push_back(row);
  }
  std::fflush(stdout);
  write_file_atomic(work / "eval.json", table.dump(2) + "\n");
  log_info("distill: eval written to ", (work / "eval.json").string());
  return 0;
}

}  // namespace brigade::launch
