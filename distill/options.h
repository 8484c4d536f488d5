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

// The most logprobs per token a remote teacher is asked for (vLLM's default
// max_logprobs and brigade serve's limit).
inline constexpr int64_t kMaxRemoteLogprobs = 20;

struct TeacherOptions {
  // A brigade checkpoint (step directory, checkpoints/ or run directory) to use as
  // the teacher; empty: train one from `recipe` first (the built-in default).
  std::string checkpoint;
  // The teacher's training recipe (relative to the distillation recipe's folder),
  // used when `checkpoint` is empty.
  std::string recipe = "distill-arith-teacher.yaml";
  // The teacher recipe's trainer.seed for this run (0: the recipe's own), so a
  // distillation can be repeated over teacher seeds.
  uint64_t seed = 0;

  // A remote teacher: any OpenAI-compatible server (vLLM, SGLang, llama.cpp's
  // server, `brigade serve`). Set `url` to use it instead of a checkpoint.
  std::string url;                  // base URL ending in /v1, e.g. http://127.0.0.1:8080/v1
  std::string api = "completions";  // "completions" (/v1/completions) or "chat" (/v1/chat/completions)
  std::string model;                // the request's "model" field
  std::string api_key_env;          // environment variable holding the API key (sent as a Bearer token, never logged)
  int64_t concurrency = 8;          // requests in flight at once
  double timeout = 120.0;           // seconds per request, connecting included
  int64_t retries = 3;              // retries of a failed request (errors, timeouts, HTTP 408/429/5xx)
  double backoff = 1.0;             // seconds before the first retry, doubled for each further one
  // A JSON object merged into every request body (server-specific sampling fields,
  // e.g. llama.cpp's {"repeat_penalty": 1.0}); empty: none.
  std::string extra_body;

  bool remote() const { return !url.empty(); }
};

struct GenerateOptions {
  int64_t samples = 2;          // samples per prompt
  double temperature = 0.6;     // 0: greedy (then samples must be 1)
  double top_p = 0.95;
  int64_t max_new_tokens = 160;
  int64_t batch_size = 32;      // sequences decoded together
  int64_t logprobs = 0;         // top-k logprobs kept per generated token (0: none)
  std::vector<std::string> stop;  // stop strings: a sample ends before the first one (finish "stop")
  uint64_t seed = 1;
};

struct EvalOptions {
  int64_t problems = 200;       // held-out problems
  int64_t k = 4;                // pass@k from k samples per problem
  double temperature = 0.6;     // for the pass@k samples (pass@1 is greedy)
};

// The on-policy stage (distill/onpolicy.h).
struct OnPolicyOptions {
  int64_t rounds = 0;               // 0: no on-policy stage
  int64_t steps_per_round = 100;    // student optimizer steps per round
  int64_t prompts_per_round = 512;  // prompts the student answers per round
  int64_t samples = 1;              // student samples per prompt
  double temperature = 1.0;         // student sampling temperature
  int64_t topk = 32;                // teacher records per token (capped at the vocabulary)
  KdLoss loss = KdLoss::kReverseKl; // the divergence (distill/kd.h); not none
  double beta = 0.5;                // jsd's teacher weight
  // The student's (constant) learning rate in the rounds. Measured on the demo:
  // 1e-4 took the student from 75.4% to 84.0% pass@1; 5e-4 dropped it to 68.6%.
  double lr = 1e-4;
  // GKD's lambda: the share of each round's prompts the student answers; the rest
  // bring the teacher's verified samples (from the verify stage), scored and trained
  // on with the same divergence. 1: every sample on-policy.
  double lambda = 1.0;

  // An Error naming the key when a value is out of range.
  void validate() const;
  bool enabled() const { return rounds > 0; }
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
  OnPolicyOptions onpolicy;

  void validate() const;
};

}  // namespace brigade::distill
