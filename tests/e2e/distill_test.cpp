// `brigade distill` as a user runs it, on a small teacher trained in the test: every
// stage runs and writes its outputs, a second run skips the finished stages, a run
// interrupted inside generate continues without losing or duplicating samples,
// and bad stage requests are clear errors. With the teacher's logprobs the same
// pipeline trains the student with logit distillation.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "tests/testing.h"

namespace brigade {
namespace {

namespace fs = std::filesystem;
using testing::run_brigade;
using testing::TempDir;
using testing::wait_for;

const std::string kSmall =
    " --set model.d_model=64 --set model.n_layers=2 --set model.n_heads=4 --set model.n_kv_heads=2"
    " --set model.d_ff=128 --set data.seq_len=64 --set model.max_seq_len=128 --set data.synthetic.num_problems=2000"
    " --set data.synthetic.eval_problems=30 --set trainer.micro_batch_size=8 --set trainer.warmup_steps=10"
    " --set trainer.eval_every=0 --set trainer.checkpoint_every=0 --set trainer.eval_batches=1 --set trainer.threads=2";

// The complete lines of a trace store's text (a torn last line left out), parsed.
std::vector<nlohmann::json> lines_upto_torn(const std::string& text) {
  std::vector<nlohmann::json> out;
  size_t begin = 0;
  for (size_t end = text.find('\n'); end != std::string::npos; begin = end + 1, end = text.find('\n', begin))
    out.push_back(nlohmann::json::parse(text.substr(begin, end - begin)));
  return out;
}

std::vector<nlohmann::json> lines(const fs::path& file) {
  std::vector<nlohmann::json> out;
  std::istringstream in(read_file(file));
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  }
  return out;
}

TEST(CliDistill, StagesRunOnceAndAnInterruptedGenerateContinues) {
  TempDir dir;
  // A teacher that has learned the format (<think> ... </think> \boxed{}), not the arithmetic.
  auto teacher = run_brigade("train " + std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-dense.yaml" + kSmall +
                             " --set trainer.lr=0.01 --set trainer.max_steps=300 --run-dir " + (dir / "teacher").string());
  ASSERT_EQ(teacher.exit_code, 0) << teacher.output;
  // Prompts without reference answers (verified on format alone) and one broken line.
  {
    std::ofstream prompts(dir / "prompts.jsonl");
    for (int i = 0; i < 8; ++i) prompts << "{\"id\": \"p" << i << "\", \"prompt\": \"Problem: " << i << "+" << 2 * i << "*3\\n\"}\n";
    prompts << "{\"id\": \"broken\"\n";
  }
  // SFT alone first (the shipped recipe adds logit distillation; that run is below).
  const std::string pipeline = "distill " + std::string(BRIGADE_SOURCE_DIR) + "/recipes/distill-arith.yaml" + kSmall +
                              " --set distill.kd.loss=none --set distill.generate.logprobs=0" +
                              " --set trainer.max_steps=10 --set distill.teacher.checkpoint=" + (dir / "teacher").string() +
                              " --set distill.prompts=" + (dir / "prompts.jsonl").string() +
                              " --set distill.generate.samples=2 --set distill.generate.max_new_tokens=60"
                              " --set distill.generate.batch_size=5 --set distill.eval.problems=4 --set distill.eval.k=2";
  const std::string distill = pipeline + " --run-dir " + (dir / "run").string();
  auto first = run_brigade(distill);
  ASSERT_EQ(first.exit_code, 0) << first.output;
  EXPECT_NE(first.output.find("prompts.jsonl: 9 ("), std::string::npos) << first.output;  // the broken line, by number
  EXPECT_NE(first.output.find("| teacher |"), std::string::npos) << first.output;
  EXPECT_NE(first.output.find("| student (SFT) |"), std::string::npos) << first.output;
  const fs::path work = dir / "run" / "distill";
  const auto traces = lines(work / "generate" / "traces.jsonl");
  ASSERT_EQ(traces.size(), 16u);
  const auto stats = nlohmann::json::parse(read_file(work / "verify" / "stats.json"));
  EXPECT_EQ(stats["total"].get<int64_t>(), 16);
  EXPECT_EQ(stats["verified_by_format_only"]["samples"].get<int64_t>(), 16);
  EXPECT_GT(stats["accepted"].get<int64_t>(), 0) << stats.dump(1);
  const auto build = nlohmann::json::parse(read_file(work / "build" / "build.json"));
  EXPECT_EQ(build["documents"].get<int64_t>(), stats["accepted"].get<int64_t>() - build["dropped_too_long"].get<int64_t>());
  EXPECT_TRUE(fs::exists(work / "train" / "run" / "checkpoints" / "latest"));
  const auto eval = nlohmann::json::parse(read_file(work / "eval.json"));
  ASSERT_EQ(eval.size(), 2u);
  EXPECT_EQ(eval[0]["problems"].get<int64_t>(), 4);

  // Again: every stage is already done.
  auto second = run_brigade(distill);
  ASSERT_EQ(second.exit_code, 0) << second.output;
  for (const char* stage : {"generate: done", "verify: done", "build: done", "train: done"}) {
    EXPECT_NE(second.output.find(stage), std::string::npos) << stage << "\n" << second.output;
  }
  EXPECT_EQ(lines(work / "generate" / "traces.jsonl").size(), 16u);

  // As if killed inside generate: the stage never finished, its last three samples
  // are missing and the line being written is torn.
  fs::remove(work / "generate" / "stage.json");
  {
    std::string text = read_file(work / "generate" / "traces.jsonl");
    size_t cut = text.size();
    for (int i = 0; i < 3; ++i) cut = text.rfind('\n', cut - 2) + 1;
    std::ofstream(work / "generate" / "traces.jsonl", std::ios::trunc) << text.substr(0, cut) << "{\"prompt_id\": \"p7\", \"sam";
  }
  auto resumed = run_brigade(distill + " --stage generate");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("13 of 16 samples already in"), std::string::npos) << resumed.output;
  const auto after = lines(work / "generate" / "traces.jsonl");
  ASSERT_EQ(after.size(), 16u);
  std::set<std::pair<std::string, int64_t>> unique;
  for (const auto& t : after) unique.insert({t["prompt_id"].get<std::string>(), t["sample"].get<int64_t>()});
  EXPECT_EQ(unique.size(), 16u);
  // The same seeds: the regenerated samples are the ones the first run made.
  for (size_t i = 13; i < 16; ++i) EXPECT_EQ(after[i]["text"], traces[i]["text"]) << i;

  // SFT + KD from the same teacher, in another run directory.
  auto kd = run_brigade(pipeline + " --set distill.generate.logprobs=4 --set distill.kd.loss=forward_kl --run-dir " +
                        (dir / "run_kd").string());
  ASSERT_EQ(kd.exit_code, 0) << kd.output;
  EXPECT_NE(kd.output.find("| student (SFT + KD forward_kl) |"), std::string::npos) << kd.output;
  const fs::path kd_work = dir / "run_kd" / "distill";
  const auto kd_build = nlohmann::json::parse(read_file(kd_work / "build" / "build.json"));
  EXPECT_EQ(kd_build["kd_k"].get<int64_t>(), 4);
  // The byte tokenizer round-trips the teacher's text: every document aligns.
  EXPECT_EQ(kd_build["kd_documents"].get<int64_t>(), kd_build["documents"].get<int64_t>()) << kd_build.dump(1);
  EXPECT_EQ(kd_build["kd_misaligned"].get<int64_t>(), 0);
  const auto metrics = lines(kd_work / "train" / "run" / "metrics.jsonl");
  bool logged = false;
  for (const auto& m : metrics) {
    if (!m.contains("kd_loss")) continue;
    logged = true;
    EXPECT_TRUE(std::isfinite(m["kd_loss"].get<double>()));
    EXPECT_GT(m["kd_loss"].get<double>(), 0.0);
  }
  EXPECT_TRUE(logged);
  EXPECT_EQ(nlohmann::json::parse(read_file(kd_work / "eval.json"))[1]["model"], "student (SFT + KD forward_kl)");

  // GKD's lambda 0.5, on a copy of the finished SFT run: the round's first 4 prompts
  // get the student's samples, the last 4 the teacher's verified ones, and both are
  // scored and trained on.
  fs::copy(dir / "run", dir / "run_lambda", fs::copy_options::recursive | fs::copy_options::copy_symlinks);
  auto mixed = run_brigade(pipeline + " --run-dir " + (dir / "run_lambda").string() +
                           " --set distill.onpolicy.rounds=1 --set distill.onpolicy.steps_per_round=3"
                           " --set distill.onpolicy.prompts_per_round=8 --set distill.onpolicy.topk=8"
                           " --set distill.onpolicy.lambda=0.5");
  ASSERT_EQ(mixed.exit_code, 0) << mixed.output;
  EXPECT_NE(mixed.output.find("train: done"), std::string::npos) << mixed.output;
  {
    const fs::path rd = dir / "run_lambda" / "distill" / "onpolicy" / "round_000";
    std::map<std::pair<std::string, int64_t>, std::string> teacher_accepted, from_teacher;
    std::set<std::string> student_ids;
    for (const auto& a : lines(dir / "run_lambda" / "distill" / "verify" / "accepted.jsonl")) {
      const auto id = a["prompt_id"].get<std::string>();
      if (id >= "p4") teacher_accepted[{id, a["sample"].get<int64_t>()}] = a["completion"];
    }
    for (const auto& t : lines(rd / "samples" / "traces.jsonl")) {
      const auto id = t["prompt_id"].get<std::string>();
      if (id < "p4") student_ids.insert(id);
      else from_teacher[{id, t["sample"].get<int64_t>()}] = t["text"];
    }
    EXPECT_EQ(student_ids, (std::set<std::string>{"p0", "p1", "p2", "p3"}));
    ASSERT_FALSE(teacher_accepted.empty());
    EXPECT_EQ(from_teacher, teacher_accepted);
    const auto rb = nlohmann::json::parse(read_file(rd / "build" / "build.json"));
    EXPECT_EQ(rb["kd_misaligned"].get<int64_t>(), 0);
    EXPECT_EQ(lines(rd / "scored" / "traces.jsonl").size(), lines(rd / "accepted.jsonl").size());
  }

  // On-policy rounds added to the finished SFT run: the supervised stage is kept, the
  // student samples, the teacher scores, and the student's run continues with reverse KL.
  const std::string onpolicy = distill + " --set distill.onpolicy.rounds=2 --set distill.onpolicy.steps_per_round=3"
                                         " --set distill.onpolicy.prompts_per_round=8 --set distill.onpolicy.topk=8";
  auto op = run_brigade(onpolicy);
  ASSERT_EQ(op.exit_code, 0) << op.output;
  EXPECT_NE(op.output.find("train: done"), std::string::npos) << "adding rounds must keep the SFT stage\n" << op.output;
  for (const char* round : {"round_000", "round_001"}) {
    const fs::path rd = work / "onpolicy" / round;
    ASSERT_TRUE(fs::exists(rd / "stage.json")) << round << "\n" << op.output;
    EXPECT_EQ(lines(rd / "samples" / "traces.jsonl").size(), 8u) << round;
    const auto scored = lines(rd / "scored" / "traces.jsonl");
    EXPECT_EQ(scored.size(), lines(rd / "accepted.jsonl").size()) << round;
    const auto rb = nlohmann::json::parse(read_file(rd / "build" / "build.json"));
    EXPECT_EQ(rb["kd_misaligned"].get<int64_t>(), 0) << round;
  }
  nlohmann::json last_train;  // the last training line (evaluations log lines of their own)
  for (const auto& m : lines(work / "train" / "run" / "metrics.jsonl"))
    if (m.contains("loss")) last_train = m;
  ASSERT_TRUE(last_train.is_object());
  EXPECT_EQ(last_train["step"].get<int64_t>(), 16) << "10 SFT steps + 2 rounds of 3";
  EXPECT_TRUE(last_train.contains("kd_loss")) << last_train.dump();
  auto again = run_brigade(onpolicy);
  ASSERT_EQ(again.exit_code, 0) << again.output;
  EXPECT_NE(again.output.find("onpolicy: round_001 done"), std::string::npos) << again.output;
  EXPECT_EQ(lines(work / "train" / "run" / "metrics.jsonl").back()["step"].get<int64_t>(), 16);
}

// A teacher recipe of a few seconds: `base` (a shipped recipe) shrunk to d_model 32,
// 2 layers and 400 steps; `model_extra` is added to its model map.
void write_tiny_teacher(const fs::path& file, const std::string& base, const std::string& model_extra,
                        int checkpoint_every) {
  std::ofstream(file) << "inherit: " << BRIGADE_SOURCE_DIR << "/recipes/" << base << "\n"
                      << "name: tiny-teacher\n"
                      << "model: {d_model: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 64, max_seq_len: 128"
                      << model_extra << "}\n"
                      << "data: {seq_len: 64, synthetic: {num_problems: 2000, eval_problems: 30}}\n"
                      << "trainer: {max_steps: 400, micro_batch_size: 8, lr: 0.01, warmup_steps: 10, eval_every: 0,\n"
                      << "          checkpoint_every: " << checkpoint_every << ", eval_batches: 1, threads: 1}\n";
}

// `n` prompts without answers: verified on format alone, which a tiny teacher
// learns (it cannot do the sums).
void write_unanswered_prompts(const fs::path& file, int n) {
  std::ofstream out(file);
  for (int i = 0; i < n; ++i)
    out << "{\"id\": " << i << ", \"prompt\": \"Problem: " << i % 10 << "+" << i % 7 << "*3\\n\"}\n";
}

// kill -9 inside the teacher's training, inside generate, inside the student's
// training and inside an on-policy round's training; each time `brigade distill` is
// started again. The end result equals an uninterrupted run's: the same samples
// (none lost, none twice) and the same scores.
TEST(CliDistill, KillNineInAnyStageThenRunAgain) {
  TempDir dir;
  write_tiny_teacher(dir / "teacher.yaml", "tiny-dense.yaml", "", /*checkpoint_every=*/40);
  write_unanswered_prompts(dir / "prompts.jsonl", 300);
  const std::string args = " " + std::string(BRIGADE_SOURCE_DIR) + "/recipes/distill-arith.yaml" + kSmall +
                           " --set data.seq_len=128 --set trainer.threads=1 --set trainer.max_steps=300"
                           " --set trainer.checkpoint_every=30 --set distill.teacher.recipe=" + (dir / "teacher.yaml").string() +
                           " --set distill.prompts=" + (dir / "prompts.jsonl").string() + " --set distill.generate.batch_size=4"
                           " --set distill.generate.max_new_tokens=60 --set distill.eval.problems=8 --set distill.eval.k=2"
                           " --set distill.onpolicy.rounds=2 --set distill.onpolicy.steps_per_round=60"
                           " --set distill.onpolicy.prompts_per_round=16 --set distill.onpolicy.topk=8";
  auto reference = run_brigade("distill" + args + " --run-dir " + (dir / "reference").string());
  ASSERT_EQ(reference.exit_code, 0) << reference.output;

  const fs::path run = dir / "killed";
  const std::string command = std::string(BRIGADE_BINARY) + " distill" + args + " --run-dir " + run.string();
  auto has_step = [](const fs::path& checkpoints) {
    if (!fs::exists(checkpoints)) return false;
    for (const auto& e : fs::directory_iterator(checkpoints))
      if (e.path().filename().string().starts_with("step_")) return true;
    return false;
  };
  struct Kill {
    const char* stage;
    std::function<bool()> reached;  // the stage is under way
    fs::path done_marker;           // exists once the stage finished
  };
  const fs::path work = run / "distill";
  const std::vector<Kill> kills = {
      {"teacher", [&] { return has_step(run / "teacher" / "checkpoints"); }, run / "teacher" / "checkpoints" / "step_00000400"},
      {"generate", [&] { return fs::exists(work / "generate" / "traces.jsonl") &&
                                fs::file_size(work / "generate" / "traces.jsonl") > 0; }, work / "generate" / "stage.json"},
      {"train", [&] { return has_step(work / "train" / "run" / "checkpoints"); }, work / "train" / "stage.json"},
      // the first round trains steps 301..360 and checkpoints at 330
      {"onpolicy", [&] { return fs::exists(work / "train" / "run" / "checkpoints" / "step_00000330"); },
       work / "onpolicy" / "round_000" / "stage.json"}};
  int mid_stage = 0;
  for (const auto& kill : kills) {
    testing::Background process(command, dir / "killed.log");
    ASSERT_TRUE(wait_for(kill.reached, 300)) << kill.stage << "\n" << read_file(dir / "killed.log");
    process.kill(9);
    mid_stage += fs::exists(kill.done_marker) ? 0 : 1;
    if (std::string(kill.stage) == "generate") {
      // What the kill left: no sample twice (a torn last line is repaired on the next open).
      const auto stored = lines_upto_torn(read_file(work / "generate" / "traces.jsonl"));
      std::set<std::pair<std::string, int64_t>> unique;
      for (const auto& t : stored) unique.insert({t["prompt_id"].get<std::string>(), t["sample"].get<int64_t>()});
      EXPECT_EQ(unique.size(), stored.size());
    }
  }
  // The kills landed inside their stages (each stage takes seconds; only a very
  // slow poll could miss one).
  EXPECT_EQ(mid_stage, 4) << read_file(dir / "killed.log");
  auto finished = run_brigade("distill" + args + " --run-dir " + run.string());
  ASSERT_EQ(finished.exit_code, 0) << finished.output;

  const auto want = lines(dir / "reference" / "distill" / "generate" / "traces.jsonl");
  const auto got = lines(work / "generate" / "traces.jsonl");
  ASSERT_EQ(got.size(), 300u);
  std::map<std::pair<std::string, int64_t>, std::string> want_text, got_text;
  for (const auto& t : want) want_text[{t["prompt_id"].get<std::string>(), t["sample"].get<int64_t>()}] = t["text"];
  for (const auto& t : got) got_text[{t["prompt_id"].get<std::string>(), t["sample"].get<int64_t>()}] = t["text"];
  EXPECT_EQ(got_text.size(), 300u);
  EXPECT_EQ(got_text, want_text);
  const auto want_eval = nlohmann::json::parse(read_file(dir / "reference" / "distill" / "eval.json"));
  const auto got_eval = nlohmann::json::parse(read_file(work / "eval.json"));
  ASSERT_EQ(got_eval.size(), want_eval.size());
  for (size_t i = 0; i < got_eval.size(); ++i) {
    EXPECT_EQ(got_eval[i]["pass@1"], want_eval[i]["pass@1"]) << i;
    EXPECT_EQ(got_eval[i]["pass@k"], want_eval[i]["pass@k"]) << i;
  }
}

// `brigade demo` is the pipeline of recipes/distill-arith.yaml end to end (here with
// a tiny teacher recipe and student so it takes seconds).
TEST(CliDemo, RunsTheDistillationPipelineAndEndsWithTheTable) {
  TempDir dir;
  write_tiny_teacher(dir / "teacher.yaml", "tiny-moe.yaml", ", moe: {expert_d_ff: 16}", /*checkpoint_every=*/0);
  write_unanswered_prompts(dir / "prompts.jsonl", 40);
  auto r = run_brigade("demo" + kSmall + " --set data.seq_len=128 --set trainer.threads=1 --set trainer.max_steps=20"
                       " --set distill.teacher.recipe=" + (dir / "teacher.yaml").string() +
                       " --set distill.prompts=" + (dir / "prompts.jsonl").string() +
                       " --set distill.num_prompts=40 --set distill.generate.max_new_tokens=60 --eval-problems 6"
                       " --samples 2 --run-dir " + (dir / "run").string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* expected : {"teacher   train an MoE", "distill: teacher: training", "generate 40/40",
                               "| model | parameters | pass@1 | pass@4 |", "| teacher |", "| student (SFT + KD forward_kl) |",
                               "The student on held-out problems (greedy):"}) {
    EXPECT_NE(r.output.find(expected), std::string::npos) << expected << "\n" << r.output;
  }
  const auto eval = nlohmann::json::parse(read_file(dir / "run" / "distill" / "eval.json"));
  ASSERT_EQ(eval.size(), 2u);
  EXPECT_EQ(eval[0]["problems"].get<int64_t>(), 6);
  EXPECT_EQ(eval[0]["model"], "teacher");
  EXPECT_EQ(eval[1]["model"], "student (SFT + KD forward_kl)");  // the shipped recipe's default
  // The teacher was trained by the demo, from the MoE recipe.
  EXPECT_TRUE(fs::exists(dir / "run" / "teacher" / "checkpoints" / "latest"));
  EXPECT_NE(read_file(dir / "run" / "teacher" / "recipe.yaml").find("num_experts: 8"), std::string::npos);
  // It ends with the run as a page: stages, pass@k, teacher and student curves.
  EXPECT_NE(r.output.find("report: " + (dir / "run" / "report.html").string()), std::string::npos) << r.output;
  const std::string page = read_file(dir / "run" / "report.html");
  for (const char* expected : {"class=\"stages\"", "<td>verify</td>", "class=\"eval\"", "student (SFT + KD forward_kl)",
                               "data-run=\"run/teacher\"", "data-run=\"run/student\"", "teacher solution"})
    EXPECT_NE(page.find(expected), std::string::npos) << expected;
}

TEST(CliDistill, BadStageRequestsAreClearErrors) {
  TempDir dir;
  const std::string recipe = std::string(BRIGADE_SOURCE_DIR) + "/recipes/distill-arith.yaml";
  auto r = run_brigade("distill " + recipe + " --stage bake --run-dir " + (dir / "run").string());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("unknown --stage 'bake'"), std::string::npos) << r.output;
  r = run_brigade("distill " + recipe + " --stage verify --run-dir " + (dir / "run").string());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("no teacher checkpoint"), std::string::npos) << r.output;
  r = run_brigade("distill " + recipe + " --set distill.generate.temperature=0 --set distill.generate.samples=3");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("set samples to 1"), std::string::npos) << r.output;
  r = run_brigade("distill " + recipe + " --set distill.kd.loss=jsd --set distill.generate.logprobs=0");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("distill.kd.loss is jsd but distill.generate.logprobs is 0"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace brigade
