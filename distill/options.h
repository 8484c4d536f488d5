// The distillation options (recipe section `distill`). A distillation recipe is the
// student's recipe (its model, data.tokenizer, data.seq_len, trainer and precision
// sections describe the student's supervised fine-tuning) plus this section: where
// the teacher comes from, the prompts, how to sample and verify, and the evaluation.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "distill/kd.h"
#include "distill/verify.h"

namespace brigade::distill {

struct TeacherOptions {
  // A brigade checkpoint (step directory, checkpoints/ or run directory) to use as
  // the teacher; empty: train one from `recipe` first (the built-in default).
  std::string checkpoint;
  // The teacher's training recipe (relative to the distillation recipe's folder),
  // used when `checkpoint` is empty.
  std::string recipe = "distill-arith-teacher.yaml";
};

struct GenerateOptions {
  int64_t samples = 2;          // samples per prompt
  double temperature = 0.6;     // 0: greedy (then samples must be 1)
  double top_p = 0.95;
  int64_t max_new_tokens = 160;
  int64_t batch_size = 32;      // sequences decoded together
  int64_t logprobs = 0;         // top-k logprobs kept per generated token (0: none)
  uint64_t seed = 1;
};

struct EvalOptions {
  int64_t problems = 200;       // held-out problems
  int64_t k = 4;                // pass@k from k samples per problem
  double temperature = 0.6;     // for the pass@k samples (pass@1 is greedy)
};

struct DistillOptions {
  TeacherOptions teacher;
  // Prompts JSONL ({"id", "prompt", "answer"} per line); empty: the built-in
  // arithmetic problems of data.synthetic (training index range).
  std::string prompts;
  int64_t num_prompts = 0;      // use the first N prompts (0: all; the built-in set: data.synthetic.num_problems)
  GenerateOptions generate;
  VerifyOptions verify;
  EvalOptions eval;
  // Logit distillation in the train stage: (1 - kd.weight) * cross-entropy +
  // kd.weight * KD on the teacher's top-k (needs generate.logprobs > 0).
  KdOptions kd;

  void validate() const;
};

}  // namespace brigade::distill
