#include "distill/options.h"

#include <cmath>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace brigade::distill {

void OnPolicyOptions::validate() const {
  BRIGADE_CHECK(rounds >= 0, "distill.onpolicy.rounds must be >= 0, got ", rounds);
  if (!enabled()) return;
  BRIGADE_CHECK(steps_per_round >= 1, "distill.onpolicy.steps_per_round must be >= 1, got ", steps_per_round);
  BRIGADE_CHECK(prompts_per_round >= 1, "distill.onpolicy.prompts_per_round must be >= 1, got ", prompts_per_round);
  BRIGADE_CHECK(samples >= 1, "distill.onpolicy.samples must be >= 1, got ", samples);
  BRIGADE_CHECK(temperature > 0 && std::isfinite(temperature), "distill.onpolicy.temperature must be > 0, got ", temperature);
  BRIGADE_CHECK(topk >= 1, "distill.onpolicy.topk must be >= 1, got ", topk);
  BRIGADE_CHECK(loss != KdLoss::kNone && loss != KdLoss::kUld,
                "distill.onpolicy.loss must be forward_kl, reverse_kl or jsd, not ", to_string(loss));
  BRIGADE_CHECK(beta > 0 && beta < 1, "distill.onpolicy.beta must lie in (0, 1), got ", beta);
  BRIGADE_CHECK(lr > 0 && std::isfinite(lr), "distill.onpolicy.lr must be > 0, got ", lr);
  BRIGADE_CHECK(lambda >= 0 && lambda <= 1, "distill.onpolicy.lambda must lie in [0, 1], got ", lambda);
}

void DistillOptions::validate() const {
  BRIGADE_CHECK(!teacher.checkpoint.empty() || !teacher.recipe.empty(),
                "distill.teacher: set a checkpoint or a recipe to train the teacher from");
  const auto& t = teacher;
  if (t.remote()) {
    BRIGADE_CHECK(t.url.starts_with("http://") || t.url.starts_with("https://"),
                  "distill.teacher.url '", t.url, "' must start with http:// or https://");
    BRIGADE_CHECK(t.api == "completions" || t.api == "chat", "distill.teacher.api is '", t.api,
                  "'; use completions (/v1/completions) or chat (/v1/chat/completions)");
    BRIGADE_CHECK(t.concurrency >= 1 && t.concurrency <= 1024,
                  "distill.teacher.concurrency must be in 1..1024, got ", t.concurrency);
    BRIGADE_CHECK(t.timeout > 0, "distill.teacher.timeout must be > 0 seconds, got ", t.timeout);
    BRIGADE_CHECK(t.retries >= 0 && t.retries <= 20, "distill.teacher.retries must be in 0..20, got ", t.retries);
    BRIGADE_CHECK(t.backoff >= 0, "distill.teacher.backoff must be >= 0 seconds, got ", t.backoff);
    BRIGADE_CHECK(t.checkpoint.empty(), "distill.teacher: set url (a remote teacher) or checkpoint, not both");
    if (!t.extra_body.empty()) {
      nlohmann::json extra;
      try {
        extra = nlohmann::json::parse(t.extra_body);
      } catch (const nlohmann::json::exception& e) {
        BRIGADE_FAIL("distill.teacher.extra_body is not valid JSON: ", e.what());
      }
      BRIGADE_CHECK(extra.is_object(), "distill.teacher.extra_body must be a JSON object, got ", extra.dump());
      for (const char* key : {"prompt", "messages", "n", "logprobs", "top_logprobs"})
        BRIGADE_CHECK(!extra.contains(key), "distill.teacher.extra_body sets '", key,
                      "', which brigade sets itself (distill.generate.* and the prompts)");
    }
  }
  for (const auto& s : generate.stop) BRIGADE_CHECK(!s.empty(), "distill.generate.stop has an empty string");
  BRIGADE_CHECK(num_prompts >= 0, "distill.num_prompts must be >= 0, got ", num_prompts);
  const auto& g = generate;
  BRIGADE_CHECK(g.samples >= 1, "distill.generate.samples must be >= 1, got ", g.samples);
  BRIGADE_CHECK(g.temperature > 0 || g.samples == 1,
                "distill.generate.temperature 0 (greedy) gives one distinct sample per prompt: set samples to 1");
  BRIGADE_CHECK(g.top_p > 0 && g.top_p <= 1, "distill.generate.top_p must be in (0, 1], got ", g.top_p);
  BRIGADE_CHECK(g.max_new_tokens >= 1, "distill.generate.max_new_tokens must be >= 1, got ", g.max_new_tokens);
  BRIGADE_CHECK(g.batch_size >= 1, "distill.generate.batch_size must be >= 1, got ", g.batch_size);
  BRIGADE_CHECK(g.logprobs >= 0, "distill.generate.logprobs must be >= 0, got ", g.logprobs);
  distill::validate(verify);
  BRIGADE_CHECK(eval.problems >= 1, "distill.eval.problems must be >= 1, got ", eval.problems);
  BRIGADE_CHECK(eval.k >= 1, "distill.eval.k must be >= 1, got ", eval.k);
  BRIGADE_CHECK(eval.temperature > 0, "distill.eval.temperature must be > 0, got ", eval.temperature);
  kd.validate();
  onpolicy.validate();
  BRIGADE_CHECK(!onpolicy.enabled() || !teacher.remote() || onpolicy.topk <= kMaxRemoteLogprobs,
                "distill.onpolicy.topk is ", onpolicy.topk, " but a remote teacher returns at most ", kMaxRemoteLogprobs,
                " logprobs per token (vLLM's and brigade serve's limit): set distill.onpolicy.topk <= ",
                kMaxRemoteLogprobs);
  BRIGADE_CHECK(kd.loss != KdLoss::kUld || !teacher.remote(), "distill.kd.loss: uld needs a local teacher (a server's ",
                "top-k candidates are mapped to the student's tokenizer, which another vocabulary defeats)");
  BRIGADE_CHECK(kd.loss == KdLoss::kNone || g.logprobs > 0, "distill.kd.loss is ", to_string(kd.loss),
                " but distill.generate.logprobs is 0: logit distillation needs the teacher's top-k; set "
                "distill.generate.logprobs (e.g. 8) or distill.kd.loss: none for SFT only");
}

}  // namespace brigade::distill
