// `brigade distill RECIPE`: parses the recipe and runs the stages of
// distill/pipeline.h in order (--stage NAME: one stage, whose inputs must exist).
// This file provides what the stages cannot do below the recipe layer: train a
// recipe, read a checkpoint, and the schema's cache keys.
#include <cstdio>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "distill/pipeline.h"
#include "distill/prompts.h"
#include "launch/commands.h"
#include "recipes/build.h"
#include "trainer/checkpoint.h"

namespace brigade::launch {
namespace fs = std::filesystem;
namespace {

class Host final : public distill::PipelineHost {
 public:
  explicit Host(const recipes::Recipe& recipe) : recipe_(recipe) {}

  int train_teacher(const fs::path& recipe, const fs::path& run_dir) override {
    std::vector<std::string> overrides;
    if (const uint64_t seed = recipe_.distill.teacher.seed; seed != 0) overrides.push_back("trainer.seed=" + std::to_string(seed));
    return train_command({recipe, overrides, run_dir, /*resume=*/true});
  }

  // The student: a typed copy of the recipe with the run's data and objective.
  int train_student(const distill::StudentRun& run) override {
    recipes::Recipe student = recipe_;
    student.data.source = data::DataSource::kShards;
    student.data.shards = {run.shard.string()};
    student.data.packed = true;
    student.data.kd_file = run.kd_file.string();
    student.distill.kd = run.kd;
    // the KD checks ask for the teacher's top-k: the shard's sidecar holds it
    if (run.kd_topk > 0) student.distill.generate.logprobs = run.kd_topk;
    if (run.max_steps) student.trainer.max_steps = *run.max_steps;
    if (run.constant_lr) {
      student.trainer.lr = student.trainer.min_lr = *run.constant_lr;
      student.trainer.warmup_steps = 0;
    }
    return train_recipe(student, run.run_dir, /*resume=*/true);
  }

  distill::PipelineModel load(const fs::path& checkpoint) override {
    auto loaded = load_model(checkpoint, {});
    distill::PipelineModel out;
    out.model = loaded.model;
    out.tokenizer = tokenizer(loaded.recipe.data.tokenizer);
    out.parameters = loaded.model->parameter_count().total;
    return out;
  }

  std::unique_ptr<data::Tokenizer> tokenizer(const std::string& spec) override { return recipes::make_tokenizer(spec); }

  std::string checkpoint_tokenizer(const fs::path& checkpoint) override {
    const fs::path dir = trainer::resolve_checkpoint(checkpoint);
    return recipes::parse_recipe(read_file(dir / "recipe.yaml"), (dir / "recipe.yaml").string(),
                                 checkpoint_overrides({}), dir)
        .data.tokenizer;
  }

 private:
  const recipes::Recipe& recipe_;
};

std::vector<distill::Prompt> prompts_of(const recipes::Recipe& recipe) {
  const auto& d = recipe.distill;
  if (d.prompts.empty()) {
    const int64_t n = d.num_prompts > 0 ? d.num_prompts : recipe.data.synthetic.num_problems;
    return distill::builtin_prompts(recipe.data.synthetic, 0, n);
  }
  auto set = distill::read_prompts(d.prompts);
  if (!set.skipped.empty()) log_warn(set.describe_skipped(d.prompts));
  auto prompts = std::move(set.prompts);
  if (d.num_prompts > 0 && static_cast<int64_t>(prompts.size()) > d.num_prompts)
    prompts.resize(static_cast<size_t>(d.num_prompts));
  return prompts;
}

}  // namespace

int distill_command(const DistillArgs& args) {
  using StageFn = int (*)(const distill::Pipeline&, distill::PipelineState&, bool);
  const std::vector<std::pair<std::string, StageFn>> stages = {
      {"teacher", distill::teacher_stage}, {"generate", distill::generate_stage}, {"verify", distill::verify_stage},
      {"build", distill::build_stage},     {"train", distill::train_stage},       {"onpolicy", distill::onpolicy_stage}};
  std::string names;
  bool known = args.stage.empty() || args.stage == "eval";
  for (const auto& [name, run] : stages) {
    names += name + ", ";
    known = known || args.stage == name;
  }
  BRIGADE_CHECK(known, "distill: unknown --stage '", args.stage, "'; stages: ", names, "eval");
  const recipes::Recipe recipe = recipes::load_recipe(args.recipe, args.overrides);
  Host host(recipe);
  distill::Pipeline p;
  p.host = &host;
  p.recipe_dir = args.recipe.parent_path();
  p.run_dir = default_run_dir(recipe, args.run_dir);
  p.options = recipe.distill;
  p.tokenizer_spec = recipe.data.tokenizer;
  p.seq_len = recipe.data.seq_len;
  p.student_max_steps = recipe.trainer.max_steps;
  // Cache keys from the schema: what changes a stage's output. The batch size only
  // regroups the same samples.
  p.generate_key = recipes::section_fingerprint(recipe, "distill.generate", {"distill.generate.batch_size"});
  p.verify_key = recipes::section_fingerprint(recipe, "distill.verify");
  recipes::Recipe sft = recipe;  // the on-policy keys do not change the supervised stage
  sft.distill.onpolicy = distill::OnPolicyOptions{};
  p.student_key = recipes::recipe_hash(sft);

  distill::PipelineState s;
  auto want = [&](const std::string& stage) { return args.stage.empty() || args.stage == stage; };
  for (const auto& [name, run] : stages) {
    if (name == "generate") {  // the teacher is settled: the prompts are read once
      p.prompts = prompts_of(recipe);
      BRIGADE_CHECK(!p.prompts.empty(), "distill: no prompts", recipe.distill.prompts.empty() ? "" : " in " + recipe.distill.prompts);
    }
    if (int rc = run(p, s, want(name)); rc != 0) return rc;
    if (args.stage == name) return 0;
  }

  // eval: held-out built-in problems (the data.synthetic eval range)
  p.held_out = distill::builtin_prompts(recipe.data.synthetic, recipe.data.synthetic.num_problems,
                                        recipe.distill.eval.problems);
  const auto rows = distill::eval_stage(p, s);
  std::printf("\n| model | parameters | pass@1 | pass@%lld |\n|---|---|---|---|\n",
              static_cast<long long>(recipe.distill.eval.k));
  for (const auto& r : rows)
    std::printf("| %s | %s | %.1f%% | %.1f%% |\n", r.label.c_str(),
                human_count(static_cast<double>(r.parameters)).c_str(), 100.0 * r.pass1, 100.0 * r.passk);
  // The share users judge a distillation by: the student's pass@1 over the teacher's.
  if (rows.size() == 2 && rows[0].pass1 > 0) {
    std::printf("\nthe student reaches %.1f%% of the teacher's pass@1 with %.0f%% of its parameters\n",
                100.0 * rows[1].pass1 / rows[0].pass1,
                100.0 * static_cast<double>(rows[1].parameters) / static_cast<double>(std::max<int64_t>(1, rows[0].parameters)));
  }
  std::fflush(stdout);
  return 0;
}

}  // namespace brigade::launch
