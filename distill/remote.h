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
// distillation needs teacher and student to share a tokenizer anyway. A candidate
// whose text is "bytes:" followed by \xNN escapes (brigade serve's spelling of a
// token that is not whole UTF-8, which JSON text cannot carry) is those bytes.
//
// On-policy scoring (score_with_teacher_remote): each student sample is sent to
// /v1/completions as token ids, [BOS] + prompt + completion + EOS in the student's
// tokenizer, with "echo": true, "logprobs": k, "max_tokens": 1, the way
// lm-evaluation-harness scores a continuation. The reply's logprobs then cover the
// prompt: entry i is the teacher's distribution over token i given the tokens
// before it, so entries first..end are the student's n completion positions and its
// EOS, the records score_with_teacher writes for a local teacher. vLLM and `brigade
// serve` answer this; llama.cpp's server does not echo prompt logprobs, and the
// stage stops with that reason. The echoed tokens are checked against the
// student's: a teacher with another vocabulary stops the stage too.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "data/tokenizer.h"
#include "distill/generate.h"
#include "distill/onpolicy.h"
#include "distill/options.h"
#include "distill/prompts.h"
#include "distill/traces.h"

namespace brigade::distill {

// A reply that no retry can fix (the server does not offer what was asked): the
// stage stops with its message.
struct UnusableReply : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A candidate token's bytes: `text`, or the bytes a "bytes:\xNN..." text spells.
std::string token_bytes_from_text(const std::string& text);

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

// The on-policy scoring request for the student's token ids `ids` (see above).
nlohmann::json scoring_request(const TeacherOptions& teacher, const std::vector<int64_t>& ids, int64_t k);

// The teacher's top-k records for entries first..ids.size()-1 of an echoed reply
// ([n, k] int32 ids of the student's vocabulary and float32 log-probs, descending);
// nullopt when a position has fewer than k candidates the student's tokenizer can
// represent. An Error (retried) for a reply that is not the API's JSON; an
// UnusableReply when the reply has no prompt logprobs or echoes other tokens.
std::optional<std::pair<torch::Tensor, torch::Tensor>> parse_scoring_reply(const data::Tokenizer& tokenizer,
                                                                           const std::string& body,
                                                                           const std::vector<int64_t>& ids,
                                                                           size_t first, int64_t k);

// score_with_teacher (distill/onpolicy.h) with a remote teacher: the same records in
// the same store, each sample one request, teacher.concurrency in flight, the
// generate stage's retries. Resumable: samples already in out_dir are kept.
ScoreStats score_with_teacher_remote(const TeacherOptions& teacher, const data::Tokenizer& tokenizer,
                                     const std::vector<Prompt>& prompts, const std::filesystem::path& samples_dir,
                                     int64_t k, const std::filesystem::path& out_dir, bool progress = true);

}  // namespace brigade::distill
