#include "distill/remote.h"

#include <curl/curl.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <memory>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"

namespace brigade::distill {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

std::string endpoint(const TeacherOptions& t) {
  std::string base = t.url;
  while (!base.empty() && base.back() == '/') base.pop_back();
  return base + (t.api == "chat" ? "/chat/completions" : "/completions");
}

// `text` with every occurrence of `secret` replaced, cut to `limit` bytes.
std::string redact(std::string text, const std::string& secret, size_t limit = 300) {
  if (!secret.empty()) {
    for (size_t at = text.find(secret); at != std::string::npos; at = text.find(secret, at + 3))
      text.replace(at, secret.size(), "***");
  }
  if (text.size() > limit) text = text.substr(0, limit) + "...";
  for (char& c : text) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return text;
}

}  // namespace

std::string token_bytes_from_text(const std::string& text) {
  static constexpr std::string_view kPrefix = "bytes:";
  if (!text.starts_with(kPrefix) || text.size() == kPrefix.size() || (text.size() - kPrefix.size()) % 4 != 0)
    return text;
  std::string bytes;
  for (size_t at = kPrefix.size(); at < text.size(); at += 4) {
    if (text[at] != '\\' || text[at + 1] != 'x' || !std::isxdigit(static_cast<unsigned char>(text[at + 2])) ||
        !std::isxdigit(static_cast<unsigned char>(text[at + 3])))
      return text;
    bytes.push_back(static_cast<char>(std::stoi(text.substr(at + 2, 2), nullptr, 16)));
  }
  return bytes;
}

namespace {

// The id of a candidate token: its bytes must be one token of `tokenizer`.
std::optional<int64_t> candidate_id(const data::Tokenizer& tokenizer, const nlohmann::json& candidate,
                                    const std::string& text) {
  std::string bytes = token_bytes_from_text(text);
  if (auto b = candidate.find("bytes"); b != candidate.end() && b->is_array()) {
    bytes.clear();
    for (const auto& v : *b) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > 255) return std::nullopt;
      bytes.push_back(static_cast<char>(v.get<int64_t>()));
    }
  }
  if (bytes.empty()) return std::nullopt;
  // Special tokens come back by name ("<|eos|>").
  if (auto special = tokenizer.special_id(bytes)) return special;
  const auto ids = tokenizer.encode(bytes);
  if (ids.size() != 1) return std::nullopt;
  return ids[0];
}

// Fills trace.topk_* from per-position candidate lists; false if any position has
// fewer than k candidates with an id.
bool fill_topk(Trace& trace, const data::Tokenizer& tokenizer, int64_t k,
               const std::vector<std::vector<std::pair<nlohmann::json, std::string>>>& positions) {
  const auto n = static_cast<int64_t>(positions.size());
  torch::Tensor ids = torch::empty({n, k}, torch::kInt32);
  torch::Tensor logprobs = torch::empty({n, k}, torch::kFloat32);
  auto* id = ids.data_ptr<int32_t>();
  auto* lp = logprobs.data_ptr<float>();
  for (int64_t p = 0; p < n; ++p) {
    std::vector<std::pair<float, int32_t>> found;
    for (const auto& [candidate, text] : positions[static_cast<size_t>(p)]) {
      auto cid = candidate_id(tokenizer, candidate, text);
      const auto value = candidate.find("logprob");
      if (!cid || value == candidate.end() || !value->is_number()) continue;
      found.emplace_back(value->get<float>(), static_cast<int32_t>(*cid));
    }
    std::stable_sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    if (static_cast<int64_t>(found.size()) < k) return false;
    for (int64_t j = 0; j < k; ++j) {
      id[p * k + j] = found[static_cast<size_t>(j)].second;
      lp[p * k + j] = found[static_cast<size_t>(j)].first;
    }
  }
  trace.topk_ids = ids;
  trace.topk_logprobs = logprobs;
  return true;
}

int64_t usage_count(const nlohmann::json& reply, const char* key) {
  auto usage = reply.find("usage");
  if (usage == reply.end() || !usage->is_object()) return 0;
  auto v = usage->find(key);
  return v != usage->end() && v->is_number_integer() && v->get<int64_t>() >= 0 ? v->get<int64_t>() : 0;
}

}  // namespace

nlohmann::json remote_request(const TeacherOptions& teacher, const GenerateOptions& options, const Prompt& prompt,
                              uint64_t seed) {
  nlohmann::json body = {{"max_tokens", options.max_new_tokens},
                         {"temperature", options.temperature},
                         {"top_p", options.top_p},
                         {"n", 1},
                         {"seed", static_cast<int64_t>(seed & 0x7fffffffULL)}};
  if (!teacher.model.empty()) body["model"] = teacher.model;
  if (!options.stop.empty()) body["stop"] = options.stop;
  if (teacher.api == "chat") {
    if (prompt.chat()) {
      // The conversation as the file gives it; the server applies its own template.
      const auto conversation = nlohmann::json::parse(prompt.conversation);
      for (const auto& [key, value] : conversation.items()) body[key] = value;
    } else {
      body["messages"] = nlohmann::json::array({{{"role", "user"}, {"content", prompt.prompt}}});
    }
    if (options.logprobs > 0) {
      body["logprobs"] = true;
      body["top_logprobs"] = options.logprobs;
    }
  } else {
    BRIGADE_CHECK(!prompt.chat(), "prompt '", prompt.id, "' is a chat prompt (\"messages\"): a remote teacher needs ",
                  "distill.teacher.api: chat for it");
    body["prompt"] = prompt.prompt;
    if (options.logprobs > 0) body["logprobs"] = options.logprobs;
  }
  if (!teacher.extra_body.empty()) body.update(nlohmann::json::parse(teacher.extra_body));  // checked in validate()
  return body;
}

namespace {

// A 200 reply's JSON, checked to hold a first choice (an Error saying what is wrong).
nlohmann::json parse_reply(const std::string& body) {
  nlohmann::json reply;
  try {
    reply = nlohmann::json::parse(body);
  } catch (const nlohmann::json::exception& e) {
    BRIGADE_FAIL("the reply is not JSON (", e.what(), ")");
  }
  BRIGADE_CHECK(reply.is_object(), "the reply is not a JSON object");
  if (auto error = reply.find("error"); error != reply.end() && !error->is_null()) {
    BRIGADE_FAIL("the server answered with an error: ", error->dump());
  }
  auto choices = reply.find("choices");
  BRIGADE_CHECK(choices != reply.end() && choices->is_array() && !choices->empty() && (*choices)[0].is_object(),
                "the reply has no \"choices\"");
  return reply;
}

}  // namespace

Trace parse_remote_reply(const TeacherOptions& teacher, const GenerateOptions& options,
                         const data::Tokenizer& tokenizer, const std::string& body, bool& topk_dropped) {
  topk_dropped = false;
  const nlohmann::json reply = parse_reply(body);
  const auto& choice = reply["choices"][0];
  Trace t;
  const bool chat = teacher.api == "chat";
  if (chat) {
    auto message = choice.find("message");
    BRIGADE_CHECK(message != choice.end() && message->is_object(), "choices[0] has no \"message\"");
    auto content = message->find("content");
    BRIGADE_CHECK(content != message->end() && (content->is_string() || content->is_null()),
                  "choices[0].message has no string \"content\"");
    t.text = content->is_string() ? content->get<std::string>() : "";
  } else {
    auto text = choice.find("text");
    BRIGADE_CHECK(text != choice.end() && text->is_string(), "choices[0] has no string \"text\"");
    t.text = text->get<std::string>();
  }
  auto reason = choice.find("finish_reason");
  const std::string finish = reason != choice.end() && reason->is_string() ? reason->get<std::string>() : "";
  // "stop", "eos" (some servers), or a tool call count as the teacher ending the sample.
  t.finish_reason = finish == "length" ? "length" : "stop";
  // Servers without stop-string support: cut here too.
  if (apply_stop_strings(t.text, options.stop)) t.finish_reason = "stop";
  t.prompt_tokens = usage_count(reply, "prompt_tokens");
  t.completion_tokens = usage_count(reply, "completion_tokens");

  if (options.logprobs > 0) {
    std::vector<std::vector<std::pair<nlohmann::json, std::string>>> positions;
    auto logprobs = choice.find("logprobs");
    bool ok = logprobs != choice.end() && logprobs->is_object();
    if (ok && chat) {
      auto content = logprobs->find("content");
      ok = content != logprobs->end() && content->is_array();
      for (size_t i = 0; ok && i < content->size(); ++i) {
        const auto& entry = (*content)[i];
        auto top = entry.find("top_logprobs");
        if (top == entry.end() || !top->is_array()) {
          ok = false;
          break;
        }
        auto& list = positions.emplace_back();
        for (const auto& c : *top) {
          if (c.is_object() && c.contains("token") && c["token"].is_string())
            list.emplace_back(c, c["token"].get<std::string>());
        }
      }
    } else if (ok) {
      auto top = logprobs->find("top_logprobs");
      ok = top != logprobs->end() && top->is_array();
      for (size_t i = 0; ok && i < top->size(); ++i) {
        const auto& entry = (*top)[i];
        if (!entry.is_object()) {
          ok = false;
          break;
        }
        auto& list = positions.emplace_back();
        for (const auto& [token, value] : entry.items()) list.emplace_back(nlohmann::json{{"logprob", value}}, token);
      }
    }
    if (ok && !positions.empty() && fill_topk(t, tokenizer, options.logprobs, positions)) {
      if (t.completion_tokens == 0) t.completion_tokens = static_cast<int64_t>(positions.size());
    } else {
      topk_dropped = true;
    }
  }
  if (t.completion_tokens == 0) t.completion_tokens = static_cast<int64_t>(tokenizer.encode(t.text).size());
  return t;
}

namespace {

struct CurlGlobal {
  CurlGlobal() { curl_global_init(CURL_GLOBAL_DEFAULT); }
};

size_t append_body(char* data, size_t size, size_t count, void* out) {
  static_cast<std::string*>(out)->append(data, size * count);
  return size * count;
}

struct Job {
  size_t index = 0;  // into the pool's jobs
  int attempt = 0;  // attempts made so far
  Clock::time_point not_before{};
};

struct InFlight {
  Job job;
  CURL* easy = nullptr;
  curl_slist* headers = nullptr;
  std::string body;
  std::string reply;
  char error[CURL_ERROR_SIZE] = {};
  ~InFlight() {
    if (headers != nullptr) curl_slist_free_all(headers);
    if (easy != nullptr) curl_easy_cleanup(easy);
  }
};

bool retryable_status(long status) { return status == 408 || status == 409 || status == 429 || status >= 500; }

}  // namespace

namespace {

// What a request pool does with its jobs.
struct PoolJobs {
  size_t count = 0;
  std::function<std::string(size_t)> body;                    // the request body of job i
  std::function<std::string(size_t)> label;                   // "prompt p sample 1", for logs
  std::function<void(size_t, const std::string&)> succeeded;  // a 200 reply; throws Error to retry, UnusableReply to stop
  std::function<void(size_t, const std::string&)> failed;     // the problem after the last attempt
  std::function<void()> before_stop;                          // before an Error ends the stage (flush stores)
};

// Sends every job's request to `url`, up to teacher.concurrency at once, with the
// retries and back-off described in remote.h. Returns the retries made.
int64_t run_requests(const TeacherOptions& teacher, const std::string& url, const std::string& what, PoolJobs& jobs) {
  static CurlGlobal global;
  const std::string api_key =
      teacher.api_key_env.empty() ? "" : read_api_key(teacher.api_key_env, "distill.teacher.api_key_env");
  std::deque<Job> queue;
  for (size_t i = 0; i < jobs.count; ++i) queue.push_back({i, 0, {}});
  std::unique_ptr<CURLM, decltype(&curl_multi_cleanup)> multi(curl_multi_init(), &curl_multi_cleanup);
  BRIGADE_CHECK(multi != nullptr, what, ": cannot initialise libcurl");
  std::vector<std::unique_ptr<InFlight>> active;
  int64_t retried = 0;

  auto start_request = [&](const Job& job) {
    auto r = std::make_unique<InFlight>();
    r->job = job;
    r->job.attempt += 1;
    r->body = jobs.body(job.index);
    r->easy = curl_easy_init();
    BRIGADE_CHECK(r->easy != nullptr, what, ": cannot create a libcurl handle");
    r->headers = curl_slist_append(r->headers, "Content-Type: application/json");
    if (!api_key.empty()) r->headers = curl_slist_append(r->headers, ("Authorization: Bearer " + api_key).c_str());
    curl_easy_setopt(r->easy, CURLOPT_URL, url.c_str());
    curl_easy_setopt(r->easy, CURLOPT_HTTPHEADER, r->headers);
    curl_easy_setopt(r->easy, CURLOPT_POSTFIELDS, r->body.c_str());
    curl_easy_setopt(r->easy, CURLOPT_POSTFIELDSIZE, static_cast<long>(r->body.size()));
    curl_easy_setopt(r->easy, CURLOPT_WRITEFUNCTION, append_body);
    curl_easy_setopt(r->easy, CURLOPT_WRITEDATA, &r->reply);
    curl_easy_setopt(r->easy, CURLOPT_ERRORBUFFER, r->error);
    curl_easy_setopt(r->easy, CURLOPT_TIMEOUT_MS, static_cast<long>(std::ceil(teacher.timeout * 1000)));
    curl_easy_setopt(r->easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(r->easy, CURLOPT_PRIVATE, r.get());
    curl_multi_add_handle(multi.get(), r->easy);
    active.push_back(std::move(r));
  };

  // Handles a finished transfer: hands a good reply on, queues a retry, or fails the job.
  auto complete = [&](InFlight& r, CURLcode code) {
    long status = 0;
    curl_easy_getinfo(r.easy, CURLINFO_RESPONSE_CODE, &status);
    std::string problem;
    bool retry = true;
    if (code != CURLE_OK) {
      problem = std::string(curl_easy_strerror(code)) + (r.error[0] != '\0' ? std::string(": ") + r.error : "");
    } else if (status == 401 || status == 403 || status == 404) {
      jobs.before_stop();
      BRIGADE_FAIL(what, ": ", url, " answered HTTP ", status, " (", redact(r.reply, api_key), ")",
                   status == 404                  ? "; check distill.teacher.url and distill.teacher.api"
                   : teacher.api_key_env.empty() ? "; the server wants an API key: set distill.teacher.api_key_env"
                                                  : "; check the API key in $" + teacher.api_key_env);
    } else if (status != 200) {
      problem = "HTTP " + std::to_string(status) + ": " + redact(r.reply, api_key);
      retry = retryable_status(status);
    } else {
      try {
        jobs.succeeded(r.job.index, r.reply);
        return;
      } catch (const UnusableReply& e) {
        jobs.before_stop();
        BRIGADE_FAIL(what, ": ", url, ": ", e.what(), " (reply: ", redact(r.reply, api_key), ")");
      } catch (const Error& e) {
        problem = std::string(e.what()) + " (reply: " + redact(r.reply, api_key) + ")";
      }
    }
    if (retry && r.job.attempt <= teacher.retries) {
      Job again = r.job;
      double wait = teacher.backoff * std::pow(2.0, again.attempt - 1);
      curl_off_t retry_after = 0;
      if (curl_easy_getinfo(r.easy, CURLINFO_RETRY_AFTER, &retry_after) == CURLE_OK && retry_after > 0)
        wait = std::min<double>(static_cast<double>(retry_after), 600.0);
      again.not_before = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(wait));
      log_debug(what, ": ", jobs.label(again.index), ": ", problem, "; retry ", again.attempt, " in ", wait, " s");
      ++retried;
      queue.push_back(again);
      return;
    }
    jobs.failed(r.job.index, problem + " (after " + std::to_string(r.job.attempt) + " attempt" +
                                  (r.job.attempt == 1 ? "" : "s") + ")");
  };

  while (!queue.empty() || !active.empty()) {
    // Start what is due, up to the concurrency limit.
    const auto now = Clock::now();
    for (size_t scanned = queue.size(); scanned > 0 && static_cast<int64_t>(active.size()) < teacher.concurrency;
         --scanned) {
      Job job = queue.front();
      queue.pop_front();
      if (job.not_before <= now) start_request(job);
      else queue.push_back(job);
    }
    int running = 0;
    curl_multi_perform(multi.get(), &running);
    int pending = 0;
    while (CURLMsg* msg = curl_multi_info_read(multi.get(), &pending)) {
      if (msg->msg != CURLMSG_DONE) continue;
      InFlight* r = nullptr;
      curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &r);
      const CURLcode code = msg->data.result;
      curl_multi_remove_handle(multi.get(), msg->easy_handle);
      auto it = std::find_if(active.begin(), active.end(), [&](const auto& p) { return p.get() == r; });
      std::unique_ptr<InFlight> owned = std::move(*it);
      active.erase(it);
      complete(*owned, code);
    }
    // Wait for traffic, or until the next retry is due (at most 100 ms).
    int wait_ms = 100;
    if (active.empty() && !queue.empty()) {
      auto next = std::min_element(queue.begin(), queue.end(),
                                   [](const Job& a, const Job& b) { return a.not_before < b.not_before; })->not_before;
      wait_ms = static_cast<int>(std::clamp<int64_t>(
          std::chrono::duration_cast<std::chrono::milliseconds>(next - Clock::now()).count(), 0, 100));
    }
    if (!active.empty() || wait_ms > 0) curl_multi_poll(multi.get(), nullptr, 0, wait_ms, nullptr);
  }
  return retried;
}

}  // namespace

RemoteStats generate_traces_remote(const TeacherOptions& teacher, const data::Tokenizer& tokenizer,
                                   const std::vector<Prompt>& prompts, const GenerateOptions& options,
                                   const fs::path& dir, bool progress) {
  const std::string url = endpoint(teacher);
  TraceWriter store(dir, options.logprobs);
  RemoteStats stats;
  const auto missing = missing_samples(store, prompts, options.samples, stats);
  log_info("generate: ", missing.size(), " requests to ", url, " (", teacher.concurrency, " at a time, timeout ",
           teacher.timeout, " s, ", teacher.retries, " retries)");
  int64_t finished = 0;
  int64_t new_tokens = 0;
  auto last_flush = Clock::now();
  const auto start = Clock::now();
  Progress bar("generate", static_cast<int64_t>(missing.size()), stderr_is_terminal());

  auto store_trace = [&](size_t job, Trace t) {
    t.prompt_id = prompts[missing[job].prompt].id;
    t.sample = missing[job].sample;
    store.append(t);
    ++finished;
    if (t.failed()) {
      ++stats.failed;
      log_warn("generate: prompt ", t.prompt_id, " sample ", t.sample, " failed: ", t.error);
    } else {
      ++stats.generated;
      new_tokens += t.completion_tokens;
      if (t.finish_reason == "length") ++stats.truncated;
    }
    if (progress) {
      const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
      char status[80];
      std::snprintf(status, sizeof status, "%s tok/s, %lld failed",
                    human_count(static_cast<double>(new_tokens) / std::max(seconds, 1e-3)).c_str(),
                    static_cast<long long>(stats.failed));
      bar.tick(finished, status);
    }
    if (Clock::now() - last_flush > std::chrono::seconds(1)) {
      store.flush();
      last_flush = Clock::now();
    }
  };
  PoolJobs jobs;
  jobs.count = missing.size();
  jobs.body = [&](size_t i) {
    const Prompt& prompt = prompts[missing[i].prompt];
    return remote_request(teacher, options, prompt, sample_seed(options.seed, prompt.id, missing[i].sample)).dump();
  };
  jobs.label = [&](size_t i) {
    return "prompt " + prompts[missing[i].prompt].id + " sample " + std::to_string(missing[i].sample);
  };
  jobs.succeeded = [&](size_t i, const std::string& reply) {
    bool dropped = false;
    Trace t = parse_remote_reply(teacher, options, tokenizer, reply, dropped);
    stats.topk_dropped += dropped ? 1 : 0;
    store_trace(i, std::move(t));
  };
  jobs.failed = [&](size_t i, const std::string& problem) {
    Trace failed;
    failed.finish_reason = "error";
    failed.error = problem;
    store_trace(i, std::move(failed));
  };
  jobs.before_stop = [&] { store.flush(); };
  stats.retried = run_requests(teacher, url, "generate", jobs);
  store.flush();
  if (progress) bar.finish();
  return stats;
}

nlohmann::json scoring_request(const TeacherOptions& teacher, const std::vector<int64_t>& ids, int64_t k) {
  // extra_body first (checked in validate()): the fields scoring relies on win.
  nlohmann::json body = teacher.extra_body.empty() ? nlohmann::json::object() : nlohmann::json::parse(teacher.extra_body);
  if (!teacher.model.empty()) body["model"] = teacher.model;
  body["prompt"] = ids;
  body["echo"] = true;
  body["logprobs"] = k;
  body["max_tokens"] = 1;  // vLLM refuses 0; the one new token is not used
  body["temperature"] = 0.0;
  body["n"] = 1;
  return body;
}

std::optional<std::pair<torch::Tensor, torch::Tensor>> parse_scoring_reply(const data::Tokenizer& tokenizer,
                                                                           const std::string& body,
                                                                           const std::vector<int64_t>& ids,
                                                                           size_t first, int64_t k) {
  BRIGADE_CHECK(first >= 1 && first < ids.size(), "scoring: first position ", first, " outside 1..", ids.size() - 1);
  const nlohmann::json reply = parse_reply(body);
  const auto& choice = reply["choices"][0];
  auto logprobs = choice.find("logprobs");
  const auto* tokens = logprobs != choice.end() && logprobs->is_object() && logprobs->contains("tokens")
                           ? &(*logprobs)["tokens"] : nullptr;
  const auto* top = logprobs != choice.end() && logprobs->is_object() && logprobs->contains("top_logprobs")
                        ? &(*logprobs)["top_logprobs"] : nullptr;
  const size_t echoed = tokens != nullptr && tokens->is_array() ? tokens->size() : 0;
  if (echoed < ids.size() || top == nullptr || !top->is_array() || top->size() < ids.size())
    throw UnusableReply("the reply holds logprobs for " + std::to_string(echoed) + " tokens of a " +
                        std::to_string(ids.size()) + "-token prompt: the server does not return the prompt's " +
                        "logprobs with \"echo\" (vLLM and brigade serve do; llama.cpp's server does not)");
  std::vector<std::vector<std::pair<nlohmann::json, std::string>>> positions;
  for (size_t i = first; i < ids.size(); ++i) {
    // The server must have read the student's ids as the student's tokens.
    const std::string want = tokenizer.decode(std::vector<int64_t>{ids[i]});
    const auto& got = (*tokens)[i];
    if (!tokenizer.special_id(want) && got.is_string() && token_bytes_from_text(got.get<std::string>()) != want) {
      throw UnusableReply("the teacher's tokenizer is not the student's: prompt token " + std::to_string(i) +
                          " (student id " + std::to_string(ids[i]) + ", " + nlohmann::json(want).dump(
                              -1, ' ', false, nlohmann::json::error_handler_t::replace) +
                          ") came back as " + got.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) +
                          "; on-policy scoring sends the student's token ids and needs a teacher with the same vocabulary");
    }
    const auto& entry = (*top)[i];
    if (!entry.is_object()) return std::nullopt;
    auto& list = positions.emplace_back();
    for (const auto& [token, value] : entry.items()) list.emplace_back(nlohmann::json{{"logprob", value}}, token);
  }
  Trace t;
  if (!fill_topk(t, tokenizer, k, positions)) return std::nullopt;
  return std::make_pair(t.topk_ids, t.topk_logprobs);
}

ScoreStats score_with_teacher_remote(const TeacherOptions& teacher, const data::Tokenizer& tokenizer,
                                     const std::vector<Prompt>& prompts, const fs::path& samples_dir, int64_t k,
                                     const fs::path& out_dir, bool progress) {
  BRIGADE_CHECK(k >= 1, "on-policy scoring needs k >= 1");
  // Echo is an API of /v1/completions only, whatever distill.teacher.api says.
  TeacherOptions completions = teacher;
  completions.api = "completions";
  const std::string url = endpoint(completions);
  const TraceReader samples(samples_dir);
  TraceWriter out(out_dir, k);
  ScoreStats stats;
  struct Request {
    const Trace* trace;
    std::vector<int64_t> ids;  // [BOS] + prompt + completion + EOS
    size_t first;              // the entry that predicts the completion's first token
  };
  std::vector<Request> requests;
  for (auto& s : samples_to_score(tokenizer, prompts, samples, out, stats)) {
    Request r{s.trace, std::move(s.context), 0};
    r.first = r.ids.size();
    r.ids.insert(r.ids.end(), s.completion.begin(), s.completion.end());
    r.ids.push_back(tokenizer.eos_id());
    requests.push_back(std::move(r));
  }
  log_info("on-policy: ", requests.size(), " samples to score at ", url, " (", teacher.concurrency, " at a time)");
  Progress bar("on-policy: teacher scoring", static_cast<int64_t>(requests.size()), stderr_is_terminal());
  int64_t finished = 0;
  auto last_flush = Clock::now();
  auto tick = [&] {
    ++finished;
    if (progress) bar.tick(finished, "");
    if (Clock::now() - last_flush > std::chrono::seconds(1)) {
      out.flush();
      last_flush = Clock::now();
    }
  };
  PoolJobs jobs;
  jobs.count = requests.size();
  jobs.body = [&](size_t i) { return scoring_request(teacher, requests[i].ids, k).dump(); };
  jobs.label = [&](size_t i) {
    return "prompt " + requests[i].trace->prompt_id + " sample " + std::to_string(requests[i].trace->sample);
  };
  jobs.succeeded = [&](size_t i, const std::string& reply) {
    const Request& r = requests[i];
    auto records = parse_scoring_reply(tokenizer, reply, r.ids, r.first, k);
    if (records) {
      Trace t = *r.trace;
      t.topk_ids = records->first;
      t.topk_logprobs = records->second;
      out.append(t);
      ++stats.scored;
    } else {
      ++stats.topk_dropped;
    }
    tick();
  };
  jobs.failed = [&](size_t i, const std::string& problem) {
    // A request the server refuses as such (HTTP 4xx: too long for its context, say)
    // would be refused again: the sample is left out for good. Anything else is asked
    // again by the next run.
    if (problem.starts_with("HTTP 4")) {
      log_warn("on-policy: scoring ", jobs.label(i), " refused: ", problem, "; the sample is left out");
      ++stats.refused;
    } else {
      log_warn("on-policy: scoring ", jobs.label(i), " failed: ", problem, "; it is left out (a rerun asks again)");
      ++stats.failed;
    }
    tick();
  };
  jobs.before_stop = [&] { out.flush(); };
  stats.retried = run_requests(teacher, url, "on-policy scoring", jobs);
  out.flush();
  if (progress) bar.finish();
  return stats;
}

}  // namespace brigade::distill
