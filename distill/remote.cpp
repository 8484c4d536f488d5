#include "distill/remote.h"

#include <curl/curl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <deque>
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

// The id of a candidate token: its bytes must be one token of `tokenizer`.
std::optional<int64_t> candidate_id(const data::Tokenizer& tokenizer, const nlohmann::json& candidate,
                                    const std::string& text) {
  std::string bytes = text;
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

Trace parse_remote_reply(const TeacherOptions& teacher, const GenerateOptions& options,
                         const data::Tokenizer& tokenizer, const std::string& body, bool& topk_dropped) {
  topk_dropped = false;
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
  const auto& choice = (*choices)[0];
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
  size_t prompt = 0;
  int64_t sample = 0;
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

RemoteStats generate_traces_remote(const TeacherOptions& teacher, const data::Tokenizer& tokenizer,
                                   const std::vector<Prompt>& prompts, const GenerateOptions& options,
                                   const fs::path& dir, bool progress) {
  static CurlGlobal global;
  const std::string api_key =
      teacher.api_key_env.empty() ? "" : read_api_key(teacher.api_key_env, "distill.teacher.api_key_env");
  const std::string url = endpoint(teacher);

  TraceWriter store(dir, options.logprobs);
  RemoteStats stats;
  std::deque<Job> queue;
  for (const auto& m : missing_samples(store, prompts, options.samples, stats)) queue.push_back({m.prompt, m.sample, 0, {}});
  log_info("generate: ", queue.size(), " requests to ", url, " (", teacher.concurrency, " at a time, timeout ",
           teacher.timeout, " s, ", teacher.retries, " retries)");

  std::unique_ptr<CURLM, decltype(&curl_multi_cleanup)> multi(curl_multi_init(), &curl_multi_cleanup);
  BRIGADE_CHECK(multi != nullptr, "generate: cannot initialise libcurl");
  std::vector<std::unique_ptr<InFlight>> active;
  const int64_t total = static_cast<int64_t>(queue.size());
  int64_t finished = 0;
  int64_t new_tokens = 0;
  auto last_flush = Clock::now();
  const auto start = Clock::now();
  Progress bar("generate", total, stderr_is_terminal());

  auto start_request = [&](const Job& job) {
    auto r = std::make_unique<InFlight>();
    r->job = job;
    r->job.attempt += 1;
    const Prompt& prompt = prompts[job.prompt];
    r->body = remote_request(teacher, options, prompt, sample_seed(options.seed, prompt.id, job.sample)).dump();
    r->easy = curl_easy_init();
    BRIGADE_CHECK(r->easy != nullptr, "generate: cannot create a libcurl handle");
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

  auto store_trace = [&](const Job& job, Trace t) {
    t.prompt_id = prompts[job.prompt].id;
    t.sample = job.sample;
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

  // Handles a finished transfer; false-free: fatal replies throw.
  auto complete = [&](InFlight& r, CURLcode code) {
    long status = 0;
    curl_easy_getinfo(r.easy, CURLINFO_RESPONSE_CODE, &status);
    std::string problem;
    bool retry = true;
    if (code != CURLE_OK) {
      problem = std::string(curl_easy_strerror(code)) + (r.error[0] != '\0' ? std::string(": ") + r.error : "");
    } else if (status == 401 || status == 403 || status == 404) {
      store.flush();
      BRIGADE_FAIL("generate: ", url, " answered HTTP ", status, " (", redact(r.reply, api_key), ")",
                   status == 404                  ? "; check distill.teacher.url and distill.teacher.api"
                   : teacher.api_key_env.empty() ? "; the server wants an API key: set distill.teacher.api_key_env"
                                                  : "; check the API key in $" + teacher.api_key_env);
    } else if (status != 200) {
      problem = "HTTP " + std::to_string(status) + ": " + redact(r.reply, api_key);
      retry = retryable_status(status);
    } else {
      try {
        bool dropped = false;
        Trace t = parse_remote_reply(teacher, options, tokenizer, r.reply, dropped);
        stats.topk_dropped += dropped ? 1 : 0;
        store_trace(r.job, std::move(t));
        return;
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
      log_debug("generate: prompt ", prompts[again.prompt].id, " sample ", again.sample, ": ", problem,
                "; retry ", again.attempt, " in ", wait, " s");
      ++stats.retried;
      queue.push_back(again);
      return;
    }
    Trace failed;
    failed.finish_reason = "error";
    failed.error = problem + " (after " + std::to_string(r.job.attempt) + " attempt" +
                   (r.job.attempt == 1 ? "" : "s") + ")";
    store_trace(r.job, std::move(failed));
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
  store.flush();
  if (progress) bar.finish();
  return stats;
}

}  // namespace brigade::distill
