// The distillation pipeline, stage by stage (`brigade distill`; docs/distillation.md).
// Each stage writes into WORK/<stage>/ and is cached by a hash of its inputs (the
// upstream stage's hash and its own options): a complete stage with the same
// inputs is skipped, a partial one continues (generate keeps the samples already
// stored, train resumes from its last checkpoint), and one with other inputs starts
// over.
//
//   teacher   RUN/teacher/: the teacher trained from distill.teacher.recipe (skipped
//             with distill.teacher.checkpoint or a remote teacher)
//   generate  WORK/generate/: the trace store (distill/traces.h)
//   verify    WORK/verify/: accepted.jsonl, stats.json (distill/verify.h)
//   build     WORK/build/: sft.shard, build.json (distill/build.h), and
//             kd.safetensors (the teacher's top-k per shard token) with logprobs
//   train     WORK/train/run/: the student's run (supervised fine-tuning, plus
//             logit distillation on kd.safetensors with distill.kd.loss)
//   onpolicy  WORK/onpolicy/round_RRR/ (distill.onpolicy.rounds > 0): the student's
//             samples scored by the teacher, then KD steps on them in the student's
//             run (distill/onpolicy.h)
//   eval      WORK/eval.json: pass@1 / pass@k of teacher and student
//
// Training a model and reading a checkpoint need the recipe layer above distill/:
// the caller provides them as a PipelineHost (launch/distill.cpp), and the cache
// keys of the options, which it takes from the recipe schema.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/arith.h"
#include "data/tokenizer.h"
#include "distill/options.h"
#include "distill/prompts.h"
#include "model/transformer.h"

namespace brigade::distill {

// A stage directory. stage.json {"stage", "inputs", ...} marks it complete for
// those inputs; inputs.json marks a started one.
class StageDir {
 public:
  StageDir(std::filesystem::path dir, std::string name, std::string inputs);
  const std::filesystem::path& dir() const { return dir_; }
  const std::string& inputs() const { return inputs_; }
  bool complete() const;
  // Keeps a partial run with the same inputs; clears one with other inputs.
  void begin() const;
  void finish(nlohmann::json result) const;

 private:
  std::filesystem::path dir_;
  std::string name_;
  std::string inputs_;
};

// A brigade checkpoint, ready to generate: its model and its own tokenizer.
struct PipelineModel {
  model::Transformer model{nullptr};
  std::unique_ptr<data::Tokenizer> tokenizer;
  int64_t parameters = 0;
};

// One training run of the student: the recipe's student with these changes, and
// nothing else changed.
struct StudentRun {
  std::filesystem::path run_dir;
  std::filesystem::path shard;    // packed rows (data.source shards, data.packed)
  std::filesystem::path kd_file;  // the teacher's top-k per shard token; empty: none
  KdOptions kd;                   // the objective (kd.loss none: cross-entropy alone)
  int64_t kd_topk = 0;            // records per token in kd_file (distill.generate.logprobs)
  // The on-policy rounds: train to this step at a constant learning rate, no warmup.
  std::optional<int64_t> max_steps;
  std::optional<double> constant_lr;
};

// What the stages need from above distill/.
class PipelineHost {
 public:
  virtual ~PipelineHost() = default;
  // Trains (or resumes) the teacher from its recipe into run_dir; the exit status.
  virtual int train_teacher(const std::filesystem::path& recipe, const std::filesystem::path& run_dir) = 0;
  // Trains (or resumes) the student; the exit status.
  virtual int train_student(const StudentRun& run) = 0;
  // A checkpoint (step, checkpoints or run directory).
  virtual PipelineModel load(const std::filesystem::path& checkpoint) = 0;
  // The tokenizer a checkpoint's recipe names, without loading its weights.
  virtual std::string checkpoint_tokenizer(const std::filesystem::path& checkpoint) = 0;
  // A data.tokenizer value as a tokenizer (a GGUF file's vocabulary included).
  virtual std::unique_ptr<data::Tokenizer> tokenizer(const std::string& spec) = 0;
};

// The typed inputs every stage reads.
struct Pipeline {
  PipelineHost* host = nullptr;
  std::filesystem::path recipe_dir;  // distill.teacher.recipe is relative to it
  std::filesystem::path run_dir;     // RUN: teacher/ and distill/
  DistillOptions options;
  std::vector<Prompt> prompts;       // what the teacher answers
  std::vector<Prompt> held_out;      // what eval scores
  std::string tokenizer_spec;        // the student's data.tokenizer
  int64_t seq_len = 0;               // the student's data.seq_len
  int64_t student_max_steps = 0;     // the student's trainer.max_steps (the rounds continue past it)
  // Cache keys, from the recipe schema: each stage's own keys, and the whole
  // student recipe without the on-policy keys (adding rounds keeps the train stage).
  std::string generate_key, verify_key, student_key;

  std::filesystem::path work() const { return run_dir / "distill"; }
};

// Where the stages stand: what each finished stage hands to the next.
struct PipelineState {
  std::filesystem::path teacher;  // the teacher checkpoint; empty for a remote teacher
  uint64_t teacher_hash = 0;
  std::string generate, verify, build, train, onpolicy;  // each stage's inputs hash
  std::filesystem::path student_run;
};

// The stages, in order. Each runs its work unless complete (or `run` is false, to
// reach a later stage through finished ones: their inputs are still checked) and
// returns the exit status of any training it ran (0 otherwise). An Error names a
// stage whose input has not finished.
int teacher_stage(const Pipeline& p, PipelineState& s, bool run);
int generate_stage(const Pipeline& p, PipelineState& s, bool run);
int verify_stage(const Pipeline& p, PipelineState& s, bool run);
int build_stage(const Pipeline& p, PipelineState& s, bool run);
int train_stage(const Pipeline& p, PipelineState& s, bool run);
int onpolicy_stage(const Pipeline& p, PipelineState& s, bool run);

struct EvalRow {
  std::string label;
  int64_t parameters = 0;
  double pass1 = 0, passk = 0;
  nlohmann::json json;  // PassAtK::to_json() with model, checkpoint, parameters
};
// Scores the local teacher (a remote one is not run here) and the student on the
// held-out problems; writes WORK/eval.json.
std::vector<EvalRow> eval_stage(const Pipeline& p, const PipelineState& s);

// The built-in arithmetic problems [first, first + count) of `synthetic` as prompts.
std::vector<Prompt> builtin_prompts(const data::ArithmeticOptions& synthetic, int64_t first, int64_t count);

}  // namespace brigade::distill
