// `brigade serve`: a brigade checkpoint behind the OpenAI completions and chat
// completions API, so `brigade distill` (or any OpenAI client) can use it as a
// remote teacher. HTTP/1.1 with keep-alive on cpp-httplib; the requests of every
// client are decoded together in one continuous batch (model/continuous_batch.h):
// a request joins the running batch between two decode steps and leaves it when it
// ends, so a short request never waits for a long one to finish.
//
//   GET  /health                 {"status": "ok", "running", "queued"}
//   GET  /v1/models              the one model
//   POST /v1/completions         prompt (a string, or token ids used as given),
//                                max_tokens, temperature, top_p, seed, stop,
//                                logprobs (top-k, 0..20), echo, n = 1, stream
//   POST /v1/chat/completions    messages (and tools, plus template keywords such as
//                                enable_thinking) rendered with the model's own chat
//                                template (data/chat.h) with the assistant's turn
//                                opened; a model without one (brigade's byte
//                                tokenizer) gets the contents joined by "\n". The
//                                same sampling fields, logprobs + top_logprobs, stream
//
// The prompt is encoded as BOS + text, exactly as the local teacher sees it; a
// request with a seed is answered as the local teacher answers that seed (up to the
// rounding of a batched matrix product). Logprobs cover the completion's tokens
// (not the end-of-sequence token), with the model's distribution at temperature 1
// like a local teacher's. A token that is not whole UTF-8 is spelled "bytes:\xNN..."
// in the completions format (chat gives every token's bytes). `echo: true` returns
// the prompt before the completion and, with logprobs, the prompt's logprobs first
// (entry i: token i given those before it; the first entry null), the way
// lm-evaluation-harness and brigade distill's on-policy stage score a text;
// max_tokens may then be 0. `stream: true` sends server-sent events (`data: {chunk}`
// ... `data: [DONE]`), text held back while it could still turn into a stop string
// or ends inside a UTF-8 character.
//
// Bounds, each a 400 that names the limit and its option: the body size
// (--max-body-bytes), max_tokens (--max-tokens, and prompt + max_tokens within the
// model's context). More than --max-queue requests waiting for a batch row: 503.
// Bad requests get {"error": {"message", "type"}}.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <unordered_map>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "data/chat.h"
#include "data/tokenizer.h"
#include "distill/generate.h"
#include "launch/commands.h"
#include "model/continuous_batch.h"
#include "recipes/build.h"
#include "trainer/checkpoint.h"

namespace brigade::launch {
namespace {

struct HttpError {
  int status;
  std::string message;
};

nlohmann::json error_body(int status, const std::string& message) {
  return {{"error", {{"message", message}, {"type", status >= 500 ? "server_error" : "invalid_request_error"}}}};
}

// Text that may hold bytes of a character cut by a token boundary.
std::string dump(const nlohmann::json& j) { return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace); }

void reply(httplib::Response& res, int status, const nlohmann::json& body) {
  res.status = status;
  res.set_content(dump(body), "application/json");
}

int64_t unix_time() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Whether `text` is well-formed UTF-8 (no stray or cut multi-byte sequences).
bool valid_utf8(const std::string& text) {
  for (size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    const size_t need = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 0;
    if (need == 0 || (need > 1 && c < 0xC2) || i + need > text.size()) return false;
    for (size_t j = 1; j < need; ++j)
      if ((static_cast<unsigned char>(text[i + j]) & 0xC0) != 0x80) return false;
    i += need;
  }
  return true;
}

// Bytes at the end of `text` that begin a UTF-8 character not yet complete.
size_t incomplete_utf8_tail(const std::string& text) {
  for (size_t back = 1; back <= std::min<size_t>(3, text.size()); ++back) {
    const auto c = static_cast<unsigned char>(text[text.size() - back]);
    if ((c & 0xC0) == 0x80) continue;  // a continuation byte: look further back
    const size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    return need > back ? back : 0;
  }
  return 0;
}

// The longest end of `text` that is the start of a stop string (it may still grow
// into one, so it is not sent yet).
size_t stop_prefix_tail(const std::string& text, const std::vector<std::string>& stop) {
  size_t hold = 0;
  for (const auto& s : stop)
    for (size_t n = std::min(s.size() - 1, text.size()); n > hold; --n)
      if (text.compare(text.size() - n, n, s, 0, n) == 0) {
        hold = n;
        break;
      }
  return hold;
}

// The model's log-probabilities over a prompt: row i is the distribution of prompt
// token i + 1 given the tokens before it (temperature 1, no filters).
struct PromptScores {
  torch::Tensor topk_ids;       // [tokens - 1, k] int32
  torch::Tensor topk_logprobs;  // [tokens - 1, k] float32, descending
  torch::Tensor chosen;         // [tokens - 1] float32: the prompt token's own log-probability
};

// PromptScores of `prompt` under `model`, over the first `vocab_limit` ids (0: all).
PromptScores score_prompt(model::Transformer& model, const std::vector<int64_t>& prompt, int64_t k,
                          int64_t vocab_limit) {
  torch::NoGradGuard no_grad;
  const auto device = model->embed_tokens->weight.device();
  const auto ids = torch::tensor(prompt, torch::kLong);
  const auto n = ids.size(0) - 1;
  torch::Tensor logits = model->forward(ids.unsqueeze(0).to(device))[0].narrow(0, 0, n).to(torch::kCPU, torch::kFloat);
  if (vocab_limit > 0 && vocab_limit < logits.size(1)) logits = logits.narrow(1, 0, vocab_limit);
  const auto logprobs = torch::log_softmax(logits, -1);
  auto [values, indices] = logprobs.topk(std::min<int64_t>(k, logprobs.size(1)), -1);
  return {indices.to(torch::kInt32).contiguous(), values.contiguous(),
          logprobs.gather(1, ids.narrow(0, 1, n).unsqueeze(1)).squeeze(1).contiguous()};
}

// One request's tokens, written by the engine thread and read by the request's
// HTTP thread.
class Channel {
 public:
  void push(model::DecodedToken t) {
    {
      std::lock_guard lock(m_);
      tokens_.push_back(std::move(t));
      finished_ = finished_ || tokens_.back().finished;
    }
    cv_.notify_all();
  }
  void fail(std::string message) {
    {
      std::lock_guard lock(m_);
      error_ = std::move(message);
      finished_ = true;
    }
    cv_.notify_all();
  }
  // Waits until there are more than `seen` tokens or the sequence ended; copies the
  // new ones into `out`. False once nothing more will come.
  bool wait(size_t seen, std::vector<model::DecodedToken>& out, std::string& error) {
    std::unique_lock lock(m_);
    cv_.wait(lock, [&] { return tokens_.size() > seen || finished_; });
    for (size_t i = seen; i < tokens_.size(); ++i) out.push_back(tokens_[i]);
    error = error_;
    return !finished_;  // every token is in `out` by now
  }
  // The end of a request that decodes nothing (echo with max_tokens 0).
  void finish() {
    {
      std::lock_guard lock(m_);
      finished_ = true;
    }
    cv_.notify_all();
  }
  // The prompt's own log-probabilities (echo), set before any token arrives.
  void set_prompt_scores(PromptScores scores) {
    std::lock_guard lock(m_);
    prompt_scores_ = std::move(scores);
  }
  PromptScores prompt_scores() {
    std::lock_guard lock(m_);
    return prompt_scores_;
  }
  void cancel() { cancelled_ = true; }
  bool cancelled() const { return cancelled_; }

 private:
  PromptScores prompt_scores_;
  std::mutex m_;
  std::condition_variable cv_;
  std::vector<model::DecodedToken> tokens_;
  bool finished_ = false;
  std::string error_;
  std::atomic<bool> cancelled_{false};
};

// The decode loop: one thread owns the model and the continuous batch; HTTP
// threads submit requests and read their channels.
class Engine {
 public:
  Engine(model::Transformer model, int64_t max_batch, int64_t max_queue)
      : model_(std::move(model)), max_batch_(max_batch), max_queue_(max_queue), batch_(model_, max_batch) {
    thread_ = std::thread([this] { loop(); });
  }
  ~Engine() {
    {
      std::lock_guard lock(m_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  // nullptr when --max-queue requests already wait.
  // prompt_logprobs > 0: the prompt's top-k log-probabilities first (echo).
  std::shared_ptr<Channel> submit(std::vector<int64_t> prompt, const model::SamplingOptions& options, uint64_t seed,
                                  int64_t prompt_logprobs) {
    auto channel = std::make_shared<Channel>();
    {
      std::lock_guard lock(m_);
      if (static_cast<int64_t>(inbox_.size()) + queued_ >= max_queue_) return nullptr;
      inbox_.push_back({std::move(prompt), options, seed, prompt_logprobs, channel});
    }
    cv_.notify_all();
    return channel;
  }
  int64_t running() const { return running_; }
  int64_t queued() const { return queued_; }
  int64_t max_queue() const { return max_queue_; }

 private:
  struct Submission {
    std::vector<int64_t> prompt;
    model::SamplingOptions options;
    uint64_t seed;
    int64_t prompt_logprobs;
    std::shared_ptr<Channel> channel;
  };

  void loop() {
    while (true) {
      std::vector<Submission> arrived;
      {
        std::unique_lock lock(m_);
        cv_.wait(lock, [&] { return stop_ || !inbox_.empty() || !batch_.idle(); });
        if (stop_) return;
        arrived.swap(inbox_);
      }
      for (auto& s : arrived) {
        try {
          if (s.prompt_logprobs > 0)
            s.channel->set_prompt_scores(score_prompt(model_, s.prompt, s.prompt_logprobs, s.options.vocab_limit));
          if (s.options.max_new_tokens == 0) {
            s.channel->finish();
            continue;
          }
          active_[batch_.add(std::move(s.prompt), s.options, s.seed)] = s.channel;
        } catch (const std::exception& e) {
          s.channel->fail(e.what());
        }
      }
      // Clients that went away (or whose stop string came) leave the batch.
      for (auto it = active_.begin(); it != active_.end();) {
        if (it->second->cancelled()) {
          batch_.cancel(it->first);
          it = active_.erase(it);
        } else {
          ++it;
        }
      }
      try {
        for (auto& t : batch_.step()) {
          auto it = active_.find(t.sequence);
          if (it == active_.end()) continue;
          const bool finished = t.finished;
          it->second->push(std::move(t));
          if (finished) active_.erase(it);
        }
      } catch (const std::exception& e) {
        log_warn("serve: decoding failed: ", e.what(), "; the ", active_.size(), " requests in flight get a 500");
        for (auto& [id, channel] : active_) channel->fail(std::string("decoding failed: ") + e.what());
        active_.clear();
        batch_ = model::ContinuousBatch(model_, max_batch_);
      }
      std::lock_guard lock(m_);
      running_ = batch_.running();
      queued_ = batch_.queued();
    }
  }

  model::Transformer model_;
  int64_t max_batch_;
  int64_t max_queue_;
  model::ContinuousBatch batch_;                                  // the engine thread's only
  std::unordered_map<int64_t, std::shared_ptr<Channel>> active_;  // the engine thread's only
  std::mutex m_;
  std::condition_variable cv_;
  std::vector<Submission> inbox_;
  std::atomic<int64_t> running_{0}, queued_{0};
  bool stop_ = false;
  std::thread thread_;
};

struct Limits {
  int64_t max_tokens = 0;       // 0: the model's context
  int64_t max_body_bytes = 0;
};

// One parsed request.
struct Job {
  bool chat = false;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool echo = false;           // completions: the prompt, and its logprobs, come back before the completion
  std::string prompt_text;     // what echo returns
  size_t added_tokens = 0;     // BOS tokens the server put before a text prompt (not in prompt_text)
  std::vector<int64_t> prompt;
  model::SamplingOptions sampling;
  uint64_t seed = 0;
  std::vector<std::string> stop;
  int64_t logprobs = 0;
};

class Server {
 public:
  Server(const recipes::Recipe& recipe, std::string name, std::string api_key, Limits limits, Engine& engine)
      : name_(std::move(name)), api_key_(std::move(api_key)), limits_(limits), context_(recipe.model.max_seq_len),
        engine_(engine), tokenizer_(recipes::make_tokenizer(recipe.data.tokenizer)) {
    if (!tokenizer_->chat_template().empty())
      chat_template_.emplace(tokenizer_->chat_template(), "the chat template of " + tokenizer_->name());
  }

  void handle(const httplib::Request& req, httplib::Response& res) {
    try {
      route(req, res);
    } catch (const HttpError& e) {
      reply(res, e.status, error_body(e.status, e.message));
    } catch (const std::exception& e) {
      reply(res, 500, error_body(500, e.what()));
    }
  }

  // Before the body is read: a declared body over the limit is refused.
  bool body_too_large(const httplib::Request& req, httplib::Response& res) const {
    if (!req.has_header("Content-Length")) return false;
    uint64_t declared = 0;
    try {
      declared = std::stoull(req.get_header_value("Content-Length"));
    } catch (const std::exception&) {
      reply(res, 400, error_body(400, "Content-Length is not a number"));
      return true;
    }
    if (declared <= static_cast<uint64_t>(limits_.max_body_bytes)) return false;
    reply(res, 400, error_body(400, "the request body is " + std::to_string(declared) + " bytes; this server takes " +
                                        std::to_string(limits_.max_body_bytes) + " at most (--max-body-bytes)"));
    return true;
  }

 private:
  void route(const httplib::Request& req, httplib::Response& res) {
    const bool completions = req.path == "/v1/completions";
    const bool chat = req.path == "/v1/chat/completions";
    if (req.path == "/health")
      return reply(res, 200, {{"status", "ok"}, {"running", engine_.running()}, {"queued", engine_.queued()}});
    if (!api_key_.empty() && req.get_header_value("Authorization") != "Bearer " + api_key_)
      throw HttpError{401, "missing or wrong API key"};
    if (req.path == "/v1/models")
      return reply(res, 200, {{"object", "list"}, {"data", {{{"id", name_}, {"object", "model"}, {"owned_by", "brigade"},
                                                             {"max_model_len", context_}}}}});
    if (!completions && !chat) throw HttpError{404, "no route " + req.path};
    if (req.method != "POST") throw HttpError{405, req.path + " takes POST"};
    nlohmann::json body;
    try {
      body = nlohmann::json::parse(req.body);
    } catch (const nlohmann::json::exception& e) {
      throw HttpError{400, std::string("the body is not JSON: ") + e.what()};
    }
    if (!body.is_object()) throw HttpError{400, "the body is not a JSON object"};
    auto job = std::make_shared<Job>(parse(body, chat));
    auto channel = engine_.submit(job->prompt, job->sampling, job->seed, job->echo ? job->logprobs : 0);
    if (!channel)
      throw HttpError{503, std::to_string(engine_.max_queue()) +
                               " requests are already waiting for a batch row (--max-queue); try again later"};
    if (job->stream) return stream(job, channel, res);
    reply(res, 200, complete(*job, *channel));
  }

  template <typename T>
  static T field(const nlohmann::json& body, const char* key, T fallback) {
    auto it = body.find(key);
    if (it == body.end() || it->is_null()) return fallback;
    try {
      return it->get<T>();
    } catch (const nlohmann::json::exception&) {
      throw HttpError{400, std::string("\"") + key + "\" has the wrong type"};
    }
  }

  Job parse(const nlohmann::json& body, bool chat) const {
    Job job;
    job.chat = chat;
    std::string prompt;
    if (chat && chat_template_) {
      // The messages in the model's own format, ending with the assistant's turn opened.
      const auto ordered = nlohmann::ordered_json::parse(body.dump());
      try {
        job.prompt = data::chat_prompt_tokens(*tokenizer_, *chat_template_,
                                              data::chat_request(ordered, *tokenizer_, "the request"));
      } catch (const Error& e) {
        throw HttpError{400, e.message()};
      }
    } else if (chat) {
      auto messages = body.find("messages");
      if (messages == body.end() || !messages->is_array() || messages->empty())
        throw HttpError{400, "\"messages\" must be a non-empty array"};
      for (const auto& m : *messages) {
        if (!m.is_object() || !m.contains("content") || !m["content"].is_string())
          throw HttpError{400, "every message needs a string \"content\""};
        if (!prompt.empty()) prompt += "\n";
        prompt += m["content"].get<std::string>();
      }
    } else {
      // A string, token ids, or a batch of one of either.
      const nlohmann::json* p = body.contains("prompt") ? &body["prompt"] : nullptr;
      if (p != nullptr && p->is_array() && p->size() == 1 && ((*p)[0].is_string() || (*p)[0].is_array())) p = &(*p)[0];
      if (p != nullptr && p->is_string()) {
        prompt = p->get<std::string>();
      } else if (p != nullptr && p->is_array() && !p->empty()) {
        // Token ids, used as given (no BOS added), as OpenAI's API takes them.
        for (const auto& id : *p) {
          if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= tokenizer_->vocab_size())
            throw HttpError{400, "prompt token " + std::to_string(job.prompt.size()) + " is " + id.dump() +
                                     "; token ids lie in 0.." + std::to_string(tokenizer_->vocab_size() - 1)};
          job.prompt.push_back(id.get<int64_t>());
        }
        job.prompt_text = tokenizer_->decode(job.prompt);
      } else {
        throw HttpError{400, "\"prompt\" must be a string or an array of token ids"};
      }
    }
    if (job.prompt.empty()) {
      job.prompt = data::sequence_start(*tokenizer_);
      job.added_tokens = job.prompt.size();
      for (int64_t id : tokenizer_->encode(prompt)) job.prompt.push_back(id);
      job.prompt_text = prompt;
    }
    job.echo = !chat && field<bool>(body, "echo", false);
    if (chat && body.contains("echo")) throw HttpError{400, "\"echo\" is an option of /v1/completions"};
    const auto prompt_tokens = static_cast<int64_t>(job.prompt.size());
    const bool score_only = job.echo && field<int64_t>(body, "max_tokens", 16) == 0;
    if (prompt_tokens > context_ || (prompt_tokens == context_ && !score_only))
      throw HttpError{400, "the prompt has " + std::to_string(prompt_tokens) + " tokens; the model's context is " +
                               std::to_string(context_) + " tokens (model.max_seq_len)"};
    if (field<int64_t>(body, "n", 1) != 1) throw HttpError{400, "only n = 1 is supported"};
    job.stream = field<bool>(body, "stream", false);
    if (auto so = body.find("stream_options"); so != body.end() && so->is_object())
      job.include_usage = field<bool>(*so, "include_usage", false);

    auto& sampling = job.sampling;
    // Without max_tokens: OpenAI's 16 for completions; a chat turn may fill the
    // context (as vLLM does), within --max-tokens.
    const int64_t limit = std::min(limits_.max_tokens, context_ - prompt_tokens);
    const bool asked = body.contains("max_tokens") || body.contains("max_completion_tokens");
    sampling.max_new_tokens = field<int64_t>(body, "max_tokens", chat ? limit : std::min<int64_t>(16, limit));
    sampling.max_new_tokens = field<int64_t>(body, "max_completion_tokens", sampling.max_new_tokens);
    if (sampling.max_new_tokens < (job.echo ? 0 : 1))
      throw HttpError{400, job.echo ? "\"max_tokens\" must be >= 0" : "\"max_tokens\" must be >= 1 (0 with \"echo\")"};
    if (asked && sampling.max_new_tokens > limits_.max_tokens)
      throw HttpError{400, "\"max_tokens\" is " + std::to_string(sampling.max_new_tokens) +
                               "; this server allows " + std::to_string(limits_.max_tokens) + " (--max-tokens)"};
    if (asked && prompt_tokens + sampling.max_new_tokens > context_)
      throw HttpError{400, "the prompt's " + std::to_string(prompt_tokens) + " tokens plus \"max_tokens\" " +
                               std::to_string(sampling.max_new_tokens) + " exceed the model's context of " +
                               std::to_string(context_) + " tokens (model.max_seq_len)"};
    sampling.temperature = field<double>(body, "temperature", 1.0);
    sampling.top_p = field<double>(body, "top_p", 1.0);
    if (sampling.temperature < 0 || sampling.temperature > 10) throw HttpError{400, "\"temperature\" must be in [0, 10]"};
    if (sampling.top_p <= 0 || sampling.top_p > 1) throw HttpError{400, "\"top_p\" must be in (0, 1]"};
    if (chat) {
      if (field<bool>(body, "logprobs", false)) job.logprobs = std::max<int64_t>(1, field<int64_t>(body, "top_logprobs", 1));
    } else {
      job.logprobs = field<int64_t>(body, "logprobs", 0);
    }
    if (job.logprobs < 0 || job.logprobs > 20) throw HttpError{400, "logprobs must be in 0..20"};
    if (job.stream && job.logprobs > 0) throw HttpError{400, "logprobs are not supported with \"stream\": true"};
    if (job.stream && job.echo) throw HttpError{400, "\"echo\" is not supported with \"stream\": true"};
    sampling.logprobs = job.logprobs;
    if (auto s = body.find("stop"); s != body.end() && !s->is_null()) {
      if (s->is_string()) job.stop.push_back(*s);
      else if (s->is_array() && std::all_of(s->begin(), s->end(), [](const auto& v) { return v.is_string(); }))
        job.stop = s->get<std::vector<std::string>>();
      else throw HttpError{400, "\"stop\" must be a string or an array of strings"};
      std::erase_if(job.stop, [](const std::string& v) { return v.empty(); });
    }
    if (body.contains("seed") && !body["seed"].is_null()) job.seed = static_cast<uint64_t>(field<int64_t>(body, "seed", 0));
    else job.seed = std::random_device{}();
    sampling.stop_ids = {tokenizer_->eos_id()};
    // A chat turn ends with the template's end-of-turn token (<|im_end|>, <|eot_id|>).
    if (const auto end_of_turn = tokenizer_->special_id(data::kImEndToken); chat && chat_template_ && end_of_turn)
      sampling.stop_ids.push_back(*end_of_turn);
    sampling.vocab_limit = tokenizer_->vocab_size();
    return job;
  }

  // A request's tokens as they arrive: the text so far, and where it ends.
  struct Progress {
    std::vector<int64_t> ids;  // without a final stop id
    std::vector<model::DecodedToken> tokens;
    std::string text;
    std::optional<std::string> finish;  // "stop" | "length" once ended
    int64_t kept = 0;                   // tokens that make up `text`
  };

  // Takes in the newly arrived tokens; ends the request at a stop string (the
  // engine is told to drop it). An engine error becomes an HttpError.
  void advance(const Job& job, Channel& channel, Progress& p, bool& more) const {
    std::vector<model::DecodedToken> fresh;
    std::string error;
    more = channel.wait(p.tokens.size(), fresh, error);
    if (!error.empty()) throw HttpError{error.starts_with("decoding failed") ? 500 : 400, error};
    bool stopped = false, ended = false;
    for (auto& t : fresh) {
      stopped = t.stopped;
      ended = t.finished;
      if (!t.stopped) p.ids.push_back(t.token);
      p.tokens.push_back(std::move(t));
    }
    p.text = tokenizer_->decode(p.ids);
    p.kept = static_cast<int64_t>(p.ids.size());
    if (auto cut = distill::cut_at_stop(*tokenizer_, p.ids, p.text, job.stop)) {
      p.kept = *cut;
      p.finish = "stop";
      channel.cancel();
      more = false;
    } else if (ended) {
      p.finish = stopped ? "stop" : "length";
    }
    if (!more && !p.finish) p.finish = "length";
  }

  nlohmann::json usage(const Job& job, int64_t completion) const {
    const auto prompt = static_cast<int64_t>(job.prompt.size());
    return {{"prompt_tokens", prompt}, {"completion_tokens", completion}, {"total_tokens", prompt + completion}};
  }

  std::string id_of(const Job& job) { return (job.chat ? "chatcmpl-" : "cmpl-") + std::to_string(++requests_); }

  nlohmann::json complete(const Job& job, Channel& channel) {
    Progress p;
    bool more = true;
    while (more) advance(job, channel, p, more);
    nlohmann::json choice = {{"index", 0}, {"finish_reason", *p.finish}};
    if (job.chat) choice["message"] = {{"role", "assistant"}, {"content", p.text}};
    else choice["text"] = job.echo ? job.prompt_text + p.text : p.text;
    if (job.logprobs == 0) choice["logprobs"] = nullptr;
    else if (job.echo) choice["logprobs"] = logprob_json(job, p, channel.prompt_scores());
    else choice["logprobs"] = logprob_json(job, p, std::nullopt);
    return {{"id", id_of(job)},
            {"object", job.chat ? "chat.completion" : "text_completion"},
            {"created", unix_time()},
            {"model", name_},
            {"choices", nlohmann::json::array({choice})},
            {"usage", usage(job, p.kept)}};
  }

  // Server-sent events: a chunk per step that has text safe to send.
  void stream(std::shared_ptr<Job> job, std::shared_ptr<Channel> channel, httplib::Response& res) {
    struct State {
      Progress progress;
      size_t sent = 0;  // bytes of text sent
      bool opened = false, closed = false;
      std::string id;
      int64_t created = 0;
    };
    auto state = std::make_shared<State>();
    state->id = id_of(*job);
    state->created = unix_time();
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, job, channel, state](size_t, httplib::DataSink& sink) {
          auto& s = *state;
          auto chunk = [&](const std::string& text, const nlohmann::json& finish) {
            nlohmann::json choice = {{"index", 0}, {"finish_reason", finish}, {"logprobs", nullptr}};
            if (job->chat) {
              nlohmann::json delta = nlohmann::json::object();
              if (!s.opened) delta["role"] = "assistant";
              if (!text.empty() || finish.is_null()) delta["content"] = text;
              choice["delta"] = delta;
            } else {
              choice["text"] = text;
            }
            s.opened = true;
            nlohmann::json c = {{"id", s.id}, {"object", job->chat ? "chat.completion.chunk" : "text_completion"},
                                {"created", s.created}, {"model", name_}, {"choices", nlohmann::json::array({choice})}};
            if (job->include_usage) c["usage"] = nullptr;
            const std::string event = "data: " + dump(c) + "\n\n";
            return sink.write(event.data(), event.size());
          };
          bool more = true;
          try {
            advance(*job, *channel, s.progress, more);
          } catch (const HttpError& e) {
            const std::string event = "data: " + dump(error_body(e.status, e.message)) + "\n\n";
            sink.write(event.data(), event.size());
            sink.done();
            return true;
          }
          const auto& text = s.progress.text;
          size_t ready = text.size();
          if (more) ready -= std::max(incomplete_utf8_tail(text), stop_prefix_tail(text, job->stop));
          if (ready > s.sent || (!s.opened && job->chat)) {
            if (!chunk(text.substr(s.sent, ready > s.sent ? ready - s.sent : 0), nullptr)) {
              channel->cancel();
              return false;
            }
            s.sent = std::max(s.sent, ready);
          }
          if (more) return true;
          bool ok = chunk("", *s.progress.finish);
          if (ok && job->include_usage) {
            const std::string event =
                "data: " + dump({{"id", s.id}, {"object", job->chat ? "chat.completion.chunk" : "text_completion"},
                                 {"created", s.created}, {"model", name_}, {"choices", nlohmann::json::array()},
                                 {"usage", usage(*job, s.progress.kept)}}) + "\n\n";
            ok = sink.write(event.data(), event.size());
          }
          static const std::string kDone = "data: [DONE]\n\n";
          if (ok) ok = sink.write(kDone.data(), kDone.size());
          s.closed = true;
          sink.done();
          return ok;
        },
        [channel, state](bool) {
          if (!state->closed) channel->cancel();  // the client went away mid-stream
        });
  }

  std::string token_text(int64_t id) const { return tokenizer_->decode(std::vector<int64_t>{id}); }
  nlohmann::json token_bytes(int64_t id) const {
    nlohmann::json bytes = nlohmann::json::array();
    for (unsigned char c : token_text(id)) bytes.push_back(static_cast<int>(c));
    return bytes;
  }

  // A token as the completions format spells it: its text, or "bytes:\xNN..." for
  // a token that is not whole UTF-8 (a JSON string cannot carry its bytes, and the
  // replacement character would make distinct tokens one key).
  std::string completion_token_text(int64_t id) const {
    const std::string text = token_text(id);
    if (valid_utf8(text)) return text;
    std::string escaped = "bytes:";
    for (unsigned char c : text) {
      char hex[5];
      std::snprintf(hex, sizeof hex, "\\x%02x", c);
      escaped += hex;
    }
    return escaped;
  }

  // OpenAI's logprobs objects for the first `kept` generated tokens, after the
  // prompt's own when it is echoed (completions). The chosen token's own logprob is
  // known when it is among the top-k (null otherwise); the prompt's first token has
  // none (nothing comes before it).
  nlohmann::json logprob_json(const Job& job, const Progress& p, const std::optional<PromptScores>& prompt) const {
    auto top = [&](int64_t pos) {
      const auto& t = p.tokens[static_cast<size_t>(pos)];
      std::vector<std::pair<int64_t, float>> out;
      const auto ids = t.topk_ids.contiguous();
      const auto lps = t.topk_logprobs.contiguous();
      for (int64_t j = 0; j < ids.size(0); ++j) out.emplace_back(ids.data_ptr<int32_t>()[j], lps.data_ptr<float>()[j]);
      return out;
    };
    auto chosen_logprob = [&](int64_t pos) -> nlohmann::json {
      for (const auto& [id, lp] : top(pos))
        if (id == p.ids[static_cast<size_t>(pos)]) return lp;
      return nullptr;
    };
    if (job.chat) {
      nlohmann::json content = nlohmann::json::array();
      for (int64_t pos = 0; pos < p.kept; ++pos) {
        nlohmann::json alternatives = nlohmann::json::array();
        for (const auto& [id, lp] : top(pos))
          alternatives.push_back({{"token", token_text(id)}, {"logprob", lp}, {"bytes", token_bytes(id)}});
        const int64_t id = p.ids[static_cast<size_t>(pos)];
        content.push_back({{"token", token_text(id)}, {"logprob", chosen_logprob(pos)}, {"bytes", token_bytes(id)},
                           {"top_logprobs", alternatives}});
      }
      return {{"content", content}};
    }
    nlohmann::json tokens = nlohmann::json::array(), token_logprobs = nlohmann::json::array(),
                   top_logprobs = nlohmann::json::array(), offsets = nlohmann::json::array();
    size_t offset = 0;
    // Offsets index the returned text; a BOS the server added is not in it.
    auto add = [&](int64_t id, const nlohmann::json& logprob, const nlohmann::json& alternatives, bool in_text) {
      tokens.push_back(completion_token_text(id));
      token_logprobs.push_back(logprob);
      top_logprobs.push_back(alternatives);
      offsets.push_back(offset);
      if (in_text) offset += token_text(id).size();
    };
    if (prompt) {
      const auto n = static_cast<int64_t>(job.prompt.size());
      const int64_t k = prompt->topk_ids.size(1);
      const auto* ids = prompt->topk_ids.data_ptr<int32_t>();
      const auto* lps = prompt->topk_logprobs.data_ptr<float>();
      const auto* chosen = prompt->chosen.data_ptr<float>();
      for (int64_t pos = 0; pos < n; ++pos) {
        const bool in_text = static_cast<size_t>(pos) >= job.added_tokens;
        if (pos == 0) {
          add(job.prompt[0], nullptr, nullptr, in_text);
          continue;
        }
        nlohmann::json alternatives = nlohmann::json::object();
        for (int64_t j = 0; j < k; ++j) alternatives[completion_token_text(ids[(pos - 1) * k + j])] = lps[(pos - 1) * k + j];
        add(job.prompt[static_cast<size_t>(pos)], chosen[pos - 1], alternatives, in_text);
      }
      // The echoed text is the prompt as sent; the offsets of the completion follow it.
      offset = job.prompt_text.size();
    }
    for (int64_t pos = 0; pos < p.kept; ++pos) {
      nlohmann::json alternatives = nlohmann::json::object();
      for (const auto& [id, lp] : top(pos)) alternatives[completion_token_text(id)] = lp;
      add(p.ids[static_cast<size_t>(pos)], chosen_logprob(pos), alternatives, true);
    }
    return {{"tokens", tokens}, {"token_logprobs", token_logprobs}, {"top_logprobs", top_logprobs},
            {"text_offset", offsets}};
  }

  std::string name_;
  std::string api_key_;
  Limits limits_;
  int64_t context_;
  Engine& engine_;
  std::unique_ptr<data::Tokenizer> tokenizer_;
  std::optional<data::ChatTemplate> chat_template_;  // the model's own, when it ships one
  std::atomic<int64_t> requests_{0};
};

httplib::Server* g_server = nullptr;
extern "C" void stop_serving(int) {
  if (g_server != nullptr) g_server->stop();
}

}  // namespace

int serve_command(const ServeArgs& args) {
  BRIGADE_CHECK(args.max_batch >= 1, "serve: --max-batch must be >= 1, got ", args.max_batch);
  BRIGADE_CHECK(args.max_queue >= 0, "serve: --max-queue must be >= 0, got ", args.max_queue);
  BRIGADE_CHECK(args.max_body_bytes >= 1024, "serve: --max-body-bytes must be >= 1024, got ", args.max_body_bytes);
  BRIGADE_CHECK(args.max_tokens >= 0, "serve: --max-tokens must be >= 0, got ", args.max_tokens);
  const std::string api_key = args.api_key_env.empty() ? "" : distill::read_api_key(args.api_key_env, "serve: --api-key-env");
  const auto checkpoint = trainer::resolve_checkpoint(args.checkpoint);
  LoadedModel loaded = load_model(checkpoint, args.overrides);
  configure_threads(recipes::plan_placement(loaded.recipe, recipes::this_machine()).threads);
  const std::string name = args.model_name.empty() ? loaded.recipe.name : args.model_name;
  const int64_t context = loaded.recipe.model.max_seq_len;
  Limits limits{.max_tokens = args.max_tokens > 0 ? std::min(args.max_tokens, context) : context,
                .max_body_bytes = args.max_body_bytes};
  Engine engine(loaded.model, args.max_batch, args.max_queue);
  Server server(loaded.recipe, name, api_key, limits, engine);

  httplib::Server http;
  // A request holds its connection's thread while it waits for and decodes its
  // tokens: enough threads for a full batch, a full queue and a few quick calls.
  const auto threads = static_cast<size_t>(args.max_batch + args.max_queue + 4);
  http.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  http.set_read_timeout(30, 0);  // a client that stops sending mid-request is dropped
  http.set_write_timeout(30, 0);
  http.set_payload_max_length(static_cast<size_t>(args.max_body_bytes));
  http.set_pre_routing_handler([&server](const httplib::Request& req, httplib::Response& res) {
    return server.body_too_large(req, res) ? httplib::Server::HandlerResponse::Handled
                                           : httplib::Server::HandlerResponse::Unhandled;
  });
  auto handler = [&server](const httplib::Request& req, httplib::Response& res) { server.handle(req, res); };
  http.Get(".*", handler);
  http.Post(".*", handler);
  http.Put(".*", handler);
  http.Delete(".*", handler);
  // What httplib refuses itself (a body without Content-Length over the limit: 413;
  // headers too long) still answers in the API's error format.
  http.set_error_handler([&args](const httplib::Request&, httplib::Response& res) {
    if (!res.body.empty()) return;
    const int status = res.status == 413 ? 400 : res.status;
    reply(res, status, error_body(status, res.status == 413 ? "the request body is over this server's " +
                                                                std::to_string(args.max_body_bytes) +
                                                                " bytes (--max-body-bytes)"
                                                          : "HTTP " + std::to_string(res.status)));
  });
  int port = args.port;
  if (port == 0) {
    port = http.bind_to_any_port(args.host);
    BRIGADE_CHECK(port > 0, "serve: cannot bind ", args.host, " to a free port");
  } else {
    BRIGADE_CHECK(http.bind_to_port(args.host, port), "serve: cannot bind ", args.host, ":", port,
                  " (in use, or not an address of this machine)");
  }
  log_info("serve: ", checkpoint.string(), " as \"", name, "\" on http://", args.host, ":", port, "/v1",
           api_key.empty() ? "" : " (API key required)", "; continuous batching of up to ", args.max_batch,
           " requests, ", args.max_queue, " more queued");
  if (!args.port_file.empty()) write_file_atomic(args.port_file, std::to_string(port) + "\n");
  g_server = &http;
  for (int signal : {SIGINT, SIGTERM}) std::signal(signal, stop_serving);
  http.listen_after_bind();
  g_server = nullptr;
  log_info("serve: stopped");
  return 0;
}

}  // namespace brigade::launch
