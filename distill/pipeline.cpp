#include "distill/pipeline.h"

#include <cmath>
#include <cstdio>

#include "core/error.h"
#include "core/fs.h"
#include "core/hash.h"
#include "core/log.h"
#include "distill/build.h"
#include "distill/eval.h"
#include "distill/generate.h"
#include "distill/kd.h"
#include "distill/onpolicy.h"
#include "distill/remote.h"
#include "distill/traces.h"
#include "distill/verify.h"
#include "trainer/checkpoint.h"

namespace brigade::distill {
namespace fs = std::filesystem;
namespace {

std::string hex(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

std::string read_inputs(const fs::path& file) {
  if (!fs::exists(file)) return "";
  try {
    return nlohmann::json::parse(read_file(file)).at("inputs").get<std::string>();
  } catch (const std::exception&) {
    return "";  // damaged: treated as not started
  }
}

uint64_t hash_prompts(const std::vector<Prompt>& prompts) {
  uint64_t h = 0x70726f6d;
  for (const auto& p : prompts) {
    h = hash_combine(h, fnv1a(p.id));
    h = hash_combine(h, fnv1a(p.prompt));
    h = hash_combine(h, fnv1a(p.answer.value_or("\x01none")));
  }
  return h;
}

uint64_t hash_json(uint64_t seed, const nlohmann::json& j) { return hash_combine(seed, fnv1a(j.dump())); }

// KD compares distributions id by id: the teacher must speak the student's tokenizer.
void check_teacher_tokenizer(const Pipeline& p, const PipelineState& s) {
  const std::string teacher = p.host->checkpoint_tokenizer(s.teacher);
  check_same_tokenizer(teacher, p.host->tokenizer(teacher)->vocab_size(), p.tokenizer_spec,
                       p.host->tokenizer(p.tokenizer_spec)->vocab_size());
}

// The newest checkpoint of a run directory.
fs::path latest_of(const fs::path& run) {
  const auto latest = trainer::CheckpointStore(run / "checkpoints", 1).latest();
  BRIGADE_CHECK(latest.has_value(), "distill: no checkpoint in ", run.string());
  return *latest;
}

}  // namespace

StageDir::StageDir(fs::path dir, std::string name, std::string inputs)
    : dir_(std::move(dir)), name_(std::move(name)), inputs_(std::move(inputs)) {}

bool StageDir::complete() const { return read_inputs(dir_ / "stage.json") == inputs_; }

void StageDir::begin() const {
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

void StageDir::finish(nlohmann::json result) const {
  result["stage"] = name_;
  result["inputs"] = inputs_;
  write_file_atomic(dir_ / "stage.json", result.dump(2) + "\n");
}

std::vector<Prompt> builtin_prompts(const data::ArithmeticOptions& synthetic, int64_t first, int64_t count) {
  std::vector<Prompt> out;
  for (int64_t i = first; i < first + count; ++i) {
    auto problem = data::make_arithmetic_problem(synthetic, static_cast<uint64_t>(i));
    Prompt prompt;
    prompt.id = std::to_string(i);
    prompt.prompt = problem.prompt;
    prompt.answer = problem.answer;
    out.push_back(std::move(prompt));
  }
  return out;
}

int teacher_stage(const Pipeline& p, PipelineState& s, bool run) {
  const auto& t = p.options.teacher;
  if (t.remote()) {
    log_info("distill: teacher: the server at ", t.url, " (", t.api, " API)");
    s.teacher.clear();
    s.teacher_hash = hash_json(0x72656d6f, {{"url", t.url}, {"api", t.api}, {"model", t.model}, {"extra_body", t.extra_body}});
    return 0;
  }
  if (!t.checkpoint.empty()) {
    s.teacher = trainer::resolve_checkpoint(t.checkpoint);
  } else {
    const fs::path recipe = p.recipe_dir / t.recipe;
    const fs::path teacher_run = p.run_dir / "teacher";
    if (run) {
      log_info("distill: teacher: training ", recipe.string(), " into ", teacher_run.string());
      if (int rc = p.host->train_teacher(recipe, teacher_run); rc != 0) return rc;
    }
    const auto latest = trainer::CheckpointStore(teacher_run / "checkpoints", 1).latest();
    BRIGADE_CHECK(latest.has_value(), "distill: no teacher checkpoint in ", teacher_run.string(),
                  "; run the teacher stage first (brigade distill RECIPE --stage teacher)");
    s.teacher = *latest;
  }
  s.teacher_hash = hash_combine(fnv1a(fs::absolute(s.teacher).string()), fnv1a(read_file(s.teacher / "trainer_state.json")));
  return 0;
}

int generate_stage(const Pipeline& p, PipelineState& s, bool run) {
  const auto& d = p.options;
  const StageDir stage(p.work() / "generate", "generate",
                       hex(hash_combine(hash_combine(s.teacher_hash, hash_prompts(p.prompts)), fnv1a(p.generate_key))));
  s.generate = stage.inputs();
  if (run) {
    if (stage.complete()) {
      log_info("distill: generate: done (", stage.dir().string(), ")");
    } else if (d.teacher.remote()) {
      stage.begin();
      const auto tokenizer = p.host->tokenizer(p.tokenizer_spec);
      const auto stats = generate_traces_remote(d.teacher, *tokenizer, p.prompts, d.generate, stage.dir());
      log_info("distill: generate: ", stats.generated, " new samples, ", stats.retried, " retries, ", stats.failed,
               " failed", stats.topk_dropped > 0 ? ", " + std::to_string(stats.topk_dropped) +
                                                        " without top-k (candidates outside the student's tokenizer)"
                                                  : std::string());
      BRIGADE_CHECK(stats.failed == 0, "distill: generate: ", stats.failed, " of ", stats.requested,
                    " samples failed after ", d.teacher.retries, " retries (their \"error\" is in ",
                    (stage.dir() / kTracesFile).string(), "); run brigade distill again to ask for them again");
      stage.finish({{"requested", stats.requested}, {"generated", stats.generated},
                    {"already_done", stats.already_done}, {"truncated", stats.truncated},
                    {"retried", stats.retried}, {"topk_dropped", stats.topk_dropped}});
    } else {
      stage.begin();
      // The teacher reads and writes its own tokenizer's ids (another one than the
      // student's for a cross-tokenizer teacher; its top-k ids are its own too).
      auto teacher = p.host->load(s.teacher);
      log_info("distill: generate: ", p.prompts.size(), " prompts x ", d.generate.samples, " samples from ",
               s.teacher.string());
      const auto stats = generate_traces(teacher.model, *teacher.tokenizer, p.prompts, d.generate, stage.dir());
      stage.finish({{"requested", stats.requested}, {"generated", stats.generated},
                    {"already_done", stats.already_done}, {"truncated", stats.truncated}});
    }
  }
  BRIGADE_CHECK(stage.complete(), "distill: the generate stage has not finished (", stage.dir().string(),
                "); run it first");
  return 0;
}

int verify_stage(const Pipeline& p, PipelineState& s, bool run) {
  const StageDir stage(p.work() / "verify", "verify", hex(hash_combine(fnv1a(s.generate), fnv1a(p.verify_key))));
  s.verify = stage.inputs();
  if (run) {
    if (stage.complete()) {
      log_info("distill: verify: done (", stage.dir().string(), ")");
    } else {
      stage.begin();
      auto stats = run_verify(p.work() / "generate", p.prompts, p.options.verify, stage.dir());
      stage.finish({{"accepted", stats["accepted"]}, {"total", stats["total"]}});
    }
  }
  BRIGADE_CHECK(stage.complete(), "distill: the verify stage has not finished; run it first");
  return 0;
}

int build_stage(const Pipeline& p, PipelineState& s, bool run) {
  // "kd_targets": builds from before kd.safetensors existed are redone.
  const bool by_index = p.options.kd.loss == KdLoss::kUld;
  const StageDir stage(p.work() / "build", "build",
                       hex(hash_json(fnv1a(s.verify), {{"seq_len", p.seq_len}, {"tokenizer", p.tokenizer_spec},
                                                       {"kd_targets", 1}, {"align_by_index", by_index}})));
  s.build = stage.inputs();
  if (run) {
    if (stage.complete()) {
      log_info("distill: build: done (", stage.dir().string(), ")");
    } else {
      stage.begin();
      const fs::path sidecar = p.work() / "generate" / kTopkFile;
      const auto tokenizer = p.host->tokenizer(p.tokenizer_spec);
      stage.finish(build_sft_shard(p.work() / "verify" / "accepted.jsonl", *tokenizer, p.seq_len, stage.dir(),
                                   fs::exists(sidecar) ? sidecar : fs::path(), by_index));
    }
  }
  BRIGADE_CHECK(stage.complete(), "distill: the build stage has not finished; run it first");
  return 0;
}

// The student's supervised fine-tuning on the packed shard, with logit distillation
// when distill.kd.loss is set.
int train_stage(const Pipeline& p, PipelineState& s, bool run) {
  const auto& d = p.options;
  const bool kd = d.kd.loss != KdLoss::kNone;
  const nlohmann::json kd_options = {{"loss", to_string(d.kd.loss)}, {"weight", d.kd.weight},
                                     {"temperature", d.kd.temperature}, {"beta", d.kd.beta}};
  const StageDir stage(p.work() / "train", "train",
                       hex(hash_json(hash_combine(fnv1a(s.build), fnv1a(p.student_key)), kd_options)));
  s.train = stage.inputs();
  s.student_run = stage.dir() / "run";
  if (run) {
    if (stage.complete()) {
      log_info("distill: train: done (", s.student_run.string(), ")");
    } else {
      stage.begin();
      StudentRun student{.run_dir = s.student_run, .shard = fs::absolute(p.work() / "build" / kSftShard), .kd = d.kd};
      if (kd) {
        // ULD compares sorted distributions, not ids: any teacher tokenizer will do;
        // a remote teacher's candidates were mapped to the student's in generate.
        if (!d.teacher.remote() && d.kd.loss != KdLoss::kUld) check_teacher_tokenizer(p, s);
        const fs::path targets = p.work() / "build" / kKdTargets;
        BRIGADE_CHECK(fs::exists(targets), "distill: distill.kd.loss is ", to_string(d.kd.loss), " but ",
                      targets.string(), " does not exist: the accepted samples carry no teacher top-k ",
                      "(was the trace store generated with distill.generate.logprobs > 0?)");
        student.kd_file = fs::absolute(targets);
        student.kd_topk = d.generate.logprobs;
      }
      log_info("distill: train: the student on ", student.shard.string(),
               kd ? " with logit distillation (" + to_string(d.kd.loss) + ")" : std::string());
      if (int rc = p.host->train_student(student); rc != 0) return rc;
      stage.finish({{"run", s.student_run.string()}});
    }
  }
  BRIGADE_CHECK(stage.complete(), "distill: the train stage has not finished; run it first");
  return 0;
}

// Rounds of the student's own samples, scored by the teacher, trained on with the
// KD loss alone (distill/onpolicy.h).
int onpolicy_stage(const Pipeline& p, PipelineState& s, bool run) {
  const auto& d = p.options;
  const auto& op = d.onpolicy;
  // The teacher scores ids of the student's vocabulary (a remote one's echo is checked token by token).
  if (op.enabled() && run && !d.teacher.remote()) check_teacher_tokenizer(p, s);
  s.onpolicy = s.train;
  for (int64_t r = 0; r < op.rounds; ++r) {
    nlohmann::json round_options = {
        {"round", r}, {"steps", op.steps_per_round}, {"prompts", op.prompts_per_round}, {"samples", op.samples},
        {"temperature", op.temperature}, {"topk", op.topk}, {"loss", to_string(op.loss)}, {"beta", op.beta},
        {"lr", op.lr}, {"max_new_tokens", d.generate.max_new_tokens}, {"seed", d.generate.seed}};
    if (op.lambda < 1) round_options["lambda"] = op.lambda;  // rounds made before the key keep their hash
    char name[32];
    std::snprintf(name, sizeof name, "round_%03lld", static_cast<long long>(r));
    const StageDir round(p.work() / "onpolicy" / name, std::string("onpolicy ") + name,
                         hex(hash_json(hash_combine(fnv1a(s.onpolicy), s.teacher_hash), round_options)));
    s.onpolicy = round.inputs();
    if (!run) continue;
    if (round.complete()) {
      log_info("distill: onpolicy: ", name, " done");
      continue;
    }
    round.begin();
    const auto tokenizer = p.host->tokenizer(p.tokenizer_spec);
    const auto prompts = round_prompts(p.prompts, r, op.prompts_per_round);
    // The first lambda share of the prompts is the student's, the rest the teacher's.
    const auto on_policy = static_cast<size_t>(std::llround(op.lambda * static_cast<double>(prompts.size())));
    const std::vector<Prompt> student_prompts(prompts.begin(), prompts.begin() + static_cast<std::ptrdiff_t>(on_policy));
    if (on_policy < prompts.size()) {
      const std::vector<Prompt> teacher_prompts(prompts.begin() + static_cast<std::ptrdiff_t>(on_policy), prompts.end());
      const auto added = add_teacher_samples(p.work() / "verify" / "accepted.jsonl", teacher_prompts, *tokenizer,
                                             round.dir() / "samples");
      log_info("distill: onpolicy: ", name, ": ", student_prompts.size(), " prompts for the student, ",
               teacher_prompts.size(), " with the teacher's verified samples (", added, " added)");
    }
    if (!student_prompts.empty()) {
      // The student as it stands: sampling at the round's seed.
      auto student = p.host->load(latest_of(s.student_run));
      GenerateOptions g;
      g.samples = op.samples;
      g.temperature = op.temperature;
      g.top_p = 1.0;
      g.max_new_tokens = d.generate.max_new_tokens;
      g.batch_size = d.generate.batch_size;
      g.stop = d.generate.stop;
      g.seed = hash_combine(d.generate.seed, static_cast<uint64_t>(r) + 0x6f6e706fULL);
      generate_traces(student.model, *tokenizer, student_prompts, g, round.dir() / "samples");
    }
    if (d.teacher.remote()) {
      const auto scored = score_with_teacher_remote(d.teacher, *tokenizer, prompts, round.dir() / "samples", op.topk,
                                                    round.dir() / "scored");
      log_info("distill: onpolicy: ", name, ": the teacher scored ", scored.scored + scored.already_done,
               " student samples (left out: ", scored.skipped, " cut at the token limit, ", scored.topk_dropped,
               " with a position of fewer than ", op.topk, " candidates in the student's vocabulary, ", scored.refused,
               " refused by the server, ", scored.failed, " failed requests; ", scored.retried, " retries)");
      BRIGADE_CHECK(scored.failed == 0, "distill: onpolicy: ", name, ": ", scored.failed, " scoring requests failed ",
                    "after every retry (the log says why); run again to ask for them again");
    } else {
      auto teacher = p.host->load(s.teacher);
      const auto scored = score_with_teacher(teacher.model, *tokenizer, prompts, round.dir() / "samples", op.topk,
                                             d.generate.batch_size, round.dir() / "scored");
      log_info("distill: onpolicy: ", name, ": the teacher scored ", scored.scored + scored.already_done,
               " student samples (", scored.skipped, " cut at the token limit left out)");
    }
    const int64_t lines = write_scored_samples(round.dir() / "scored", prompts, round.dir() / "accepted.jsonl");
    BRIGADE_CHECK(lines > 0, "distill: onpolicy: ", name, ": no student sample ended within ",
                  d.generate.max_new_tokens, " tokens; raise distill.generate.max_new_tokens");
    const auto built = build_sft_shard(round.dir() / "accepted.jsonl", *tokenizer, p.seq_len, round.dir() / "build",
                                       round.dir() / "scored" / kTopkFile);
    BRIGADE_CHECK(built["rows"].get<int64_t>() >= 2, "distill: onpolicy: ", name, ": the ", lines,
                  " student samples that ended fill ", built["rows"].get<int64_t>(),
                  " packed row; training needs at least 2 (one is held out): raise distill.onpolicy.prompts_per_round ",
                  "or distill.onpolicy.samples");
    StudentRun student{.run_dir = s.student_run,
                       .shard = fs::absolute(round.dir() / "build" / kSftShard),
                       .kd_file = fs::absolute(round.dir() / "build" / kKdTargets),
                       .kd = {.loss = op.loss, .weight = 1.0, .temperature = 1.0, .beta = op.beta},
                       .kd_topk = op.topk,
                       .max_steps = p.student_max_steps + (r + 1) * op.steps_per_round,
                       .constant_lr = op.lr};
    log_info("distill: onpolicy: ", name, ": ", lines, " student samples, ", op.steps_per_round, " steps of ",
             to_string(op.loss));
    if (int rc = p.host->train_student(student); rc != 0) return rc;
    round.finish({{"samples", lines}});
  }
  return 0;
}

std::vector<EvalRow> eval_stage(const Pipeline& p, const PipelineState& s) {
  const auto& d = p.options;
  std::string student_label = d.kd.loss != KdLoss::kNone ? "student (SFT + KD " + to_string(d.kd.loss) : "student (SFT";
  if (d.onpolicy.enabled()) student_label += " + on-policy " + to_string(d.onpolicy.loss);
  student_label += ")";
  std::vector<std::pair<std::string, fs::path>> models;
  if (!d.teacher.remote()) models.emplace_back("teacher", s.teacher);
  models.emplace_back(student_label, latest_of(s.student_run));
  std::vector<EvalRow> rows;
  nlohmann::json table = nlohmann::json::array();
  for (const auto& [label, checkpoint] : models) {
    auto loaded = p.host->load(checkpoint);  // each with its own tokenizer
    const auto r = evaluate_pass_at_k(loaded.model, *loaded.tokenizer, p.held_out, d.eval, d.verify,
                                      d.generate.max_new_tokens, d.generate.batch_size, label);
    EvalRow row{.label = label, .parameters = loaded.parameters, .pass1 = r.pass1,
                .passk = r.passk, .json = r.to_json()};
    row.json["model"] = label;
    row.json["checkpoint"] = checkpoint.string();
    row.json["parameters"] = loaded.parameters;
    table.push_back(row.json);
    rows.push_back(std::move(row));
  }
  write_file_atomic(p.work() / "eval.json", table.dump(2) + "\n");
  log_info("distill: eval written to ", (p.work() / "eval.json").string());
  return rows;
}

}  // namespace brigade::distill
