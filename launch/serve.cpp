// `brigade serve`: a brigade checkpoint behind the OpenAI completions and chat
// completions API, so `brigade distill` (or any OpenAI client) can use it as a
// remote teacher. HTTP/1.1, one request per connection, non-streaming; requests
// are decoded one at a time (a mutex around the model).
//
//   GET  /health                 {"status": "ok"}
//   GET  /v1/models              the one model
//   POST /v1/completions         prompt (a string), max_tokens, temperature, top_p,
//                                seed, stop, logprobs (top-k, 0..20), n = 1
//   POST /v1/chat/completions    messages (and tools, plus template keywords such as
//                                enable_thinking) rendered with the model's own chat
//                                template (data/chat.h) with the assistant's turn
//                                opened; a model without one (brigade's byte
//                                tokenizer) gets the contents joined by "\n". The
//                                same sampling fields, logprobs + top_logprobs
//
// The prompt is encoded as BOS + text, exactly as the local teacher sees it; a
// request with a seed is answered exactly as the local teacher answers that seed.
// Logprobs cover the completion's tokens (not the end-of-sequence token), with the
// model's distribution at temperature 1 like a local teacher's. Bad requests get a
// 400 with {"error": {"message", "type"}}.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <chrono>
#include <cstring>
#include <iostream>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"
#include "data/chat.h"
#include "data/tokenizer.h"
#include "distill/generate.h"
#include "launch/commands.h"
#include "recipes/build.h"
#include "model/generate.h"
#include "trainer/checkpoint.h"

namespace brigade::launch {
namespace {

constexpr size_t kMaxHeaderBytes = 64 * 1024;
constexpr size_t kMaxBodyBytes = 8 * 1024 * 1024;

struct HttpRequest {
  std::string method;
  std::string path;
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased
  std::string body;
  std::optional<std::string> header(const std::string& name) const {
    for (const auto& [k, v] : headers)
      if (k == name) return v;
    return std::nullopt;
  }
};

struct HttpError {
  int status;
  std::string message;
};

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t");
  const size_t e = s.find_last_not_of(" \t\r");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

bool send_all(int fd, const std::string& data) {
  size_t sent = 0;
  while (sent < data.size()) {
    const ssize_t n = ::send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return false;
    sent += static_cast<size_t>(n);
  }
  return true;
}

// Reads one request; an HttpError for malformed ones; nullopt if the peer left.
std::optional<HttpRequest> read_request(int fd) {
  std::string data;
  char buf[8192];
  size_t header_end = std::string::npos;
  while ((header_end = data.find("\r\n\r\n")) == std::string::npos) {
    if (data.size() > kMaxHeaderBytes) throw HttpError{431, "request headers too large"};
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return std::nullopt;
    data.append(buf, static_cast<size_t>(n));
  }
  HttpRequest req;
  const std::string head = data.substr(0, header_end);
  size_t line_end = head.find("\r\n");
  const std::string request_line = head.substr(0, line_end);
  const size_t sp1 = request_line.find(' ');
  const size_t sp2 = request_line.find(' ', sp1 + 1);
  if (sp1 == std::string::npos || sp2 == std::string::npos) throw HttpError{400, "malformed request line"};
  req.method = request_line.substr(0, sp1);
  req.path = request_line.substr(sp1 + 1, sp2 - sp1 - 1);
  if (const size_t q = req.path.find('?'); q != std::string::npos) req.path.resize(q);
  for (size_t at = line_end; at != std::string::npos && at < head.size();) {
    const size_t next = head.find("\r\n", at + 2);
    const std::string line = head.substr(at + 2, next == std::string::npos ? std::string::npos : next - at - 2);
    at = next;
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    req.headers.emplace_back(lower(trim(line.substr(0, colon))), trim(line.substr(colon + 1)));
  }
  if (req.header("transfer-encoding")) throw HttpError{411, "send the body with a Content-Length"};
  size_t length = 0;
  if (auto value = req.header("content-length")) {
    try {
      length = std::stoull(*value);
    } catch (const std::exception&) {
      throw HttpError{400, "bad Content-Length"};
    }
  }
  if (length > kMaxBodyBytes) throw HttpError{413, "request body over 8 MiB"};
  if (auto expect = req.header("expect"); expect && lower(*expect) == "100-continue")
    send_all(fd, "HTTP/1.1 100 Continue\r\n\r\n");
  req.body = data.substr(header_end + 4);
  while (req.body.size() < length) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return std::nullopt;
    req.body.append(buf, static_cast<size_t>(n));
  }
  req.body.resize(length);
  return req;
}

std::string reason_phrase(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 411: return "Length Required";
    case 413: return "Payload Too Large";
    case 431: return "Request Header Fields Too Large";
    default: return "Internal Server Error";
  }
}

void send_json(int fd, int status, const nlohmann::json& body) {
  const std::string text = body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  send_all(fd, "HTTP/1.1 " + std::to_string(status) + " " + reason_phrase(status) +
                   "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(text.size()) +
                   "\r\nConnection: close\r\n\r\n" + text);
}

nlohmann::json error_body(int status, const std::string& message) {
  return {{"error", {{"message", message}, {"type", status >= 500 ? "server_error" : "invalid_request_error"}}}};
}

class Server {
 public:
  Server(LoadedModel loaded, std::string name, std::string api_key)
      : recipe_(std::move(loaded.recipe)), model_(std::move(loaded.model)), name_(std::move(name)),
        api_key_(std::move(api_key)), tokenizer_(recipes::make_tokenizer(recipe_.data.tokenizer)) {
    if (!tokenizer_->chat_template().empty())
      chat_template_.emplace(tokenizer_->chat_template(), "the chat template of " + tokenizer_->name());
  }

  void handle(int fd) {
    try {
      auto req = read_request(fd);
      if (!req) return;
      auto [status, body] = route(*req);
      send_json(fd, status, body);
    } catch (const HttpError& e) {
      send_json(fd, e.status, error_body(e.status, e.message));
    } catch (const std::exception& e) {
      send_json(fd, 500, error_body(500, e.what()));
    }
  }

 private:
  std::pair<int, nlohmann::json> route(const HttpRequest& req) {
    const bool completions = req.path == "/v1/completions";
    const bool chat = req.path == "/v1/chat/completions";
    if (req.path == "/health") return {200, {{"status", "ok"}}};
    if (!api_key_.empty() && req.header("authorization") != "Bearer " + api_key_)
      throw HttpError{401, "missing or wrong API key"};
    if (req.path == "/v1/models")
      return {200, {{"object", "list"}, {"data", {{{"id", name_}, {"object", "model"}, {"owned_by", "brigade"}}}}}};
    if (!completions && !chat) throw HttpError{404, "no route " + req.path};
    if (req.method != "POST") throw HttpError{405, req.path + " takes POST"};
    nlohmann::json body;
    try {
      body = nlohmann::json::parse(req.body);
    } catch (const nlohmann::json::exception& e) {
      throw HttpError{400, std::string("the body is not JSON: ") + e.what()};
    }
    if (!body.is_object()) throw HttpError{400, "the body is not a JSON object"};
    return {200, complete(body, chat)};
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

  nlohmann::json complete(const nlohmann::json& body, bool chat) {
    std::string prompt;
    std::vector<int64_t> tokens;
    if (chat && chat_template_) {
      // The messages in the model's own format, ending with the assistant's turn opened.
      const auto ordered = nlohmann::ordered_json::parse(body.dump());
      try {
        tokens = data::chat_prompt_tokens(*tokenizer_, *chat_template_,
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
      auto p = body.find("prompt");
      if (p != body.end() && p->is_array() && p->size() == 1 && (*p)[0].is_string()) prompt = (*p)[0];
      else if (p != body.end() && p->is_string()) prompt = *p;
      else throw HttpError{400, "\"prompt\" must be a string"};
    }
    if (field<int64_t>(body, "n", 1) != 1) throw HttpError{400, "only n = 1 is supported"};
    if (field<bool>(body, "stream", false)) throw HttpError{400, "streaming is not supported"};
    model::SamplingOptions sampling;
    sampling.max_new_tokens = field<int64_t>(body, "max_tokens", chat ? 256 : 16);
    sampling.max_new_tokens = field<int64_t>(body, "max_completion_tokens", sampling.max_new_tokens);
    sampling.temperature = field<double>(body, "temperature", 1.0);
    sampling.top_p = field<double>(body, "top_p", 1.0);
    if (sampling.max_new_tokens < 1) throw HttpError{400, "\"max_tokens\" must be >= 1"};
    if (sampling.temperature < 0 || sampling.temperature > 10) throw HttpError{400, "\"temperature\" must be in [0, 10]"};
    if (sampling.top_p <= 0 || sampling.top_p > 1) throw HttpError{400, "\"top_p\" must be in (0, 1]"};
    int64_t logprobs = 0;
    if (chat) {
      if (field<bool>(body, "logprobs", false)) logprobs = std::max<int64_t>(1, field<int64_t>(body, "top_logprobs", 1));
    } else {
      logprobs = field<int64_t>(body, "logprobs", 0);
    }
    if (logprobs < 0 || logprobs > 20) throw HttpError{400, "logprobs must be in 0..20"};
    sampling.logprobs = logprobs;
    std::vector<std::string> stop;
    if (auto s = body.find("stop"); s != body.end() && !s->is_null()) {
      if (s->is_string()) stop.push_back(*s);
      else if (s->is_array() && std::all_of(s->begin(), s->end(), [](const auto& v) { return v.is_string(); }))
        stop = s->get<std::vector<std::string>>();
      else throw HttpError{400, "\"stop\" must be a string or an array of strings"};
    }
    uint64_t seed = 0;
    if (body.contains("seed") && !body["seed"].is_null()) seed = static_cast<uint64_t>(field<int64_t>(body, "seed", 0));
    else seed = std::random_device{}();

    if (tokens.empty()) {
      tokens = data::sequence_start(*tokenizer_);
      for (int64_t id : tokenizer_->encode(prompt)) tokens.push_back(id);
    }
    if (static_cast<int64_t>(tokens.size()) >= model_->options().max_seq_len)
      throw HttpError{400, "the prompt has " + std::to_string(tokens.size()) + " tokens; the context is " +
                               std::to_string(model_->options().max_seq_len)};
    sampling.stop_ids = {tokenizer_->eos_id()};
    // A chat turn ends with the template's end-of-turn token (<|im_end|>, <|eot_id|>).
    if (const auto end_of_turn = tokenizer_->special_id(data::kImEndToken); chat && chat_template_ && end_of_turn)
      sampling.stop_ids.push_back(*end_of_turn);
    sampling.vocab_limit = tokenizer_->vocab_size();

    model::Generation g;
    {
      std::lock_guard lock(model_mutex_);
      g = model::generate_batch(model_, {tokens}, sampling, {seed})[0];
    }
    std::vector<int64_t> text_ids = g.tokens;
    if (g.stopped) text_ids.pop_back();
    std::string text = tokenizer_->decode(text_ids);
    std::string finish = g.stopped ? "stop" : "length";
    auto kept = static_cast<int64_t>(text_ids.size());
    if (auto cut = distill::cut_at_stop(*tokenizer_, text_ids, text, stop)) {
      finish = "stop";
      kept = *cut;
    }

    nlohmann::json choice = {{"index", 0}, {"finish_reason", finish}};
    if (chat) choice["message"] = {{"role", "assistant"}, {"content", text}};
    else choice["text"] = text;
    if (logprobs > 0) choice["logprobs"] = logprob_json(g, text_ids, kept, chat);
    else choice["logprobs"] = nullptr;
    const auto id = ++requests_;
    return {{"id", (chat ? "chatcmpl-" : "cmpl-") + std::to_string(id)},
            {"object", chat ? "chat.completion" : "text_completion"},
            {"created", std::chrono::duration_cast<std::chrono::seconds>(
                            std::chrono::system_clock::now().time_since_epoch()).count()},
            {"model", name_},
            {"choices", nlohmann::json::array({choice})},
            {"usage", {{"prompt_tokens", tokens.size()}, {"completion_tokens", kept},
                       {"total_tokens", static_cast<int64_t>(tokens.size()) + kept}}}};
  }

  std::string token_text(int64_t id) const { return tokenizer_->decode(std::vector<int64_t>{id}); }
  nlohmann::json token_bytes(int64_t id) const {
    nlohmann::json bytes = nlohmann::json::array();
    for (unsigned char c : token_text(id)) bytes.push_back(static_cast<int>(c));
    return bytes;
  }

  // OpenAI's logprobs objects for the first `kept` generated tokens. The chosen
  // token's own logprob is known when it is among the top-k (null otherwise).
  nlohmann::json logprob_json(const model::Generation& g, const std::vector<int64_t>& ids, int64_t kept,
                              bool chat) const {
    const int64_t k = g.topk_ids.size(1);
    const auto* top_ids = g.topk_ids.contiguous().data_ptr<int32_t>();
    const auto* top_lp = g.topk_logprobs.contiguous().data_ptr<float>();
    auto chosen_logprob = [&](int64_t p) -> nlohmann::json {
      for (int64_t j = 0; j < k; ++j)
        if (top_ids[p * k + j] == ids[static_cast<size_t>(p)]) return top_lp[p * k + j];
      return nullptr;
    };
    if (chat) {
      nlohmann::json content = nlohmann::json::array();
      for (int64_t p = 0; p < kept; ++p) {
        nlohmann::json top = nlohmann::json::array();
        for (int64_t j = 0; j < k; ++j)
          top.push_back({{"token", token_text(top_ids[p * k + j])}, {"logprob", top_lp[p * k + j]},
                         {"bytes", token_bytes(top_ids[p * k + j])}});
        const int64_t id = ids[static_cast<size_t>(p)];
        content.push_back({{"token", token_text(id)}, {"logprob", chosen_logprob(p)}, {"bytes", token_bytes(id)},
                           {"top_logprobs", top}});
      }
      return {{"content", content}};
    }
    nlohmann::json tokens = nlohmann::json::array(), token_logprobs = nlohmann::json::array(),
                   top_logprobs = nlohmann::json::array(), offsets = nlohmann::json::array();
    size_t offset = 0;
    for (int64_t p = 0; p < kept; ++p) {
      const std::string text = token_text(ids[static_cast<size_t>(p)]);
      tokens.push_back(text);
      token_logprobs.push_back(chosen_logprob(p));
      offsets.push_back(offset);
      offset += text.size();
      nlohmann::json top = nlohmann::json::object();
      for (int64_t j = 0; j < k; ++j) top[token_text(top_ids[p * k + j])] = top_lp[p * k + j];
      top_logprobs.push_back(top);
    }
    return {{"tokens", tokens}, {"token_logprobs", token_logprobs}, {"top_logprobs", top_logprobs},
            {"text_offset", offsets}};
  }

  recipes::Recipe recipe_;
  model::Transformer model_;
  std::string name_;
  std::string api_key_;
  std::unique_ptr<data::Tokenizer> tokenizer_;
  std::optional<data::ChatTemplate> chat_template_;  // the model's own, when it ships one
  std::mutex model_mutex_;
  std::atomic<int64_t> requests_{0};
};

}  // namespace

int serve_command(const ServeArgs& args) {
  const std::string api_key = args.api_key_env.empty() ? "" : distill::read_api_key(args.api_key_env, "serve: --api-key-env");
  const auto checkpoint = trainer::resolve_checkpoint(args.checkpoint);
  LoadedModel loaded = load_model(checkpoint, args.overrides);
  const std::string name = args.model_name.empty() ? loaded.recipe.name : args.model_name;
  Server server(std::move(loaded), name, api_key);

  const int listen_fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  BRIGADE_CHECK(listen_fd >= 0, "serve: socket: ", std::strerror(errno));
  const int one = 1;
  ::setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(args.port));
  BRIGADE_CHECK(::inet_pton(AF_INET, args.host.c_str(), &addr.sin_addr) == 1, "serve: --host '", args.host,
                "' is not an IPv4 address");
  BRIGADE_CHECK(::bind(listen_fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0, "serve: cannot bind ",
                args.host, ":", args.port, ": ", std::strerror(errno));
  BRIGADE_CHECK(::listen(listen_fd, 128) == 0, "serve: listen: ", std::strerror(errno));
  socklen_t len = sizeof addr;
  ::getsockname(listen_fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const int port = ntohs(addr.sin_port);
  log_info("serve: ", checkpoint.string(), " as \"", name, "\" on http://", args.host, ":", port, "/v1",
           api_key.empty() ? "" : " (API key required)");
  if (!args.port_file.empty()) write_file_atomic(args.port_file, std::to_string(port) + "\n");

  while (true) {
    const int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      BRIGADE_FAIL("serve: accept: ", std::strerror(errno));
    }
    timeval timeout{30, 0};  // a client that stops sending mid-request is dropped
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    std::thread([&server, fd] {
      server.handle(fd);
      ::close(fd);
    }).detach();
  }
}

}  // namespace brigade::launch
