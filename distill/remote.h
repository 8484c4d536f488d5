// The generate stage with a remote teacher: any server speaking the OpenAI
// completions or chat completions API (vLLM, SGLang, llama.cpp's server, `brigade
// serve`), over HTTP with libcurl.
//
// Every (prompt, sample) pair not yet in the trace store becomes one request with
// n = 1; up to teacher.concurrency requests are in flight at once. A request that
// fails (connection error, timeout, HTTP 408/409/429/5xx, a reply that is not the
// API's JSON) is retried after teacher.backoff seconds, doubled each time (a
// Retry-After header wins), up to teacher.retries times; then the sample is stored
// with finish_reason "error" and its error text, and the next run asks again.
// HTTP 401, 403 and 404 stop the stage at once with an Error: every request would
// fail the same way.
//
// Each request carries "seed": sample_seed(generate.seed, prompt id, sample) (31
// bits), so a server that honours seeds (brigade serve does) answers a rerun alike.
//
// The API key is read from the environment variable teacher.api_key_env and sent
// as "Authorization: Bearer KEY". It never appears in logs, errors or the store:
// server replies quoted in errors have it replaced by "***".
//
// Top-k logprobs (generate.logprobs = k > 0): completions asks for "logprobs": k,
// chat for "logprobs": true, "top_logprobs": k. Each candidate token (its "bytes"
// when the server gives them, else its text) must be exactly one token of the
// student's tokenizer; a sample with a position that has fewer than k such
// candidates is stored without top-k (counted in `topk_dropped`). Logit
// distillation needs teacher and student to share a tokenizer anyway.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "data/tokenizer.h"
#include "distill/generate.h"
#include "distill/options.h"
#include "distill/prompts.h"
#include "distill/traces.h"

namespace brigade::distill {

// The request body for one sample.
nlohmann::json remote_request(const TeacherOptions& teacher, const GenerateOptions& options, const Prompt& prompt,
                              uint64_t seed);

// A 200 reply's body as a trace (prompt_id and sample left empty). An Error saying
// what is missing when the body is not the API's JSON. `topk_dropped` is set when
// logprobs were asked for but could not be mapped to `tokenizer`'s ids.
Trace parse_remote_reply(const TeacherOptions& teacher, const GenerateOptions& options,
                         const data::Tokenizer& tokenizer, const std::string& body, bool& topk_dropped);

struct RemoteStats : GenerateStats {
  int64_t failed = 0;        // stored as failed after every retry
  int64_t retried = 0;       // retries made
  int64_t topk_dropped = 0;  // samples stored without top-k (see above)
};

// Appends the missing samples to the store at `dir`. A kill loses at most the
// requests in flight.
RemoteStats generate_traces_remote(const TeacherOptions& teacher, const data::Tokenizer& tokenizer,
                                   const std::vector<Prompt>& prompts, const GenerateOptions& options,
                                   const std::filesystem::path& dir, bool progress = true);

}  // namespace brigade::distill
