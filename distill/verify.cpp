#include "distill/verify.h"

#include <fcntl.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <unordered_map>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"

namespace brigade::distill {

namespace fs = std::filesystem;

namespace {

constexpr std::string_view kThinkOpen = "<think>";
constexpr std::string_view kThinkClose = "</think>";
constexpr std::string_view kBoxed = "\\boxed{";

// Every reason a sample can get, so the statistics always list them all.
const char* const kReasons[] = {"accepted",  "error",        "truncated",    "too_long",
                                "no_think",  "unclosed_think", "no_answer",  "wrong_answer",
                                "duplicate", "unknown_prompt"};

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

// Trimmed, with every run of whitespace turned into one space.
std::string normalise_space(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  bool pending_space = false;
  for (char c : text) {
    if (is_space(c)) {
      pending_space = !out.empty();
      continue;
    }
    if (pending_space) out += ' ';
    pending_space = false;
    out += c;
  }
  return out;
}

std::string trim(std::string_view text) {
  size_t begin = 0, end = text.size();
  while (begin < end && is_space(text[begin])) ++begin;
  while (end > begin && is_space(text[end - 1])) --end;
  return std::string(text.substr(begin, end - begin));
}

// The content of the last \boxed{...} whose braces balance; earlier ones are tried
// when a later one is cut off.
std::optional<std::string> last_boxed(const std::string& text) {
  size_t search = text.size();
  while (search > 0) {
    const size_t at = text.rfind(kBoxed, search - 1);
    if (at == std::string::npos) return std::nullopt;
    const size_t begin = at + kBoxed.size();
    int depth = 1;
    for (size_t i = begin; i < text.size(); ++i) {
      if (text[i] == '{') ++depth;
      if (text[i] == '}' && --depth == 0) return text.substr(begin, i - begin);
    }
    search = at;
  }
  return std::nullopt;
}

// The answer in a GSM8K reference or completion: what follows the last "####" on its
// line, else the last number in the text.
std::optional<std::string> gsm8k_answer(const std::string& text) {
  const size_t mark = text.rfind("####");
  if (mark != std::string::npos) {
    const size_t begin = mark + 4;
    const size_t end = text.find('\n', begin);
    return text.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
  }
  static const std::regex kNumber(R"([+-]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?|[+-]?\.\d+)");
  std::optional<std::string> found;
  for (auto it = std::sregex_iterator(text.begin(), text.end(), kNumber); it != std::sregex_iterator(); ++it) {
    found = it->str();
  }
  return found;
}

bool is_builtin_pattern(const std::string& pattern) {
  return pattern == "boxed" || pattern == "gsm8k" || pattern == "exact";
}

std::optional<std::string> last_capture(const std::string& text, const std::regex& pattern) {
  std::optional<std::string> found;
  for (auto it = std::sregex_iterator(text.begin(), text.end(), pattern); it != std::sregex_iterator(); ++it) {
    if ((*it)[1].matched) found = (*it)[1].str();
  }
  return found;
}

std::optional<std::string> non_empty_trimmed(std::optional<std::string> answer) {
  if (!answer) return std::nullopt;
  std::string trimmed = trim(*answer);
  if (trimmed.empty()) return std::nullopt;
  return trimmed;
}

std::regex compile_pattern(const std::string& pattern) {
  std::regex regex;
  try {
    regex = std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    BRIGADE_FAIL("verify answer_pattern \"", pattern, "\" is not a valid regex: ", e.what());
  }
  BRIGADE_CHECK(regex.mark_count() >= 1, "verify answer_pattern \"", pattern,
                "\" needs a capture group around the answer, e.g. \"Answer: (\\S+)\"");
  return regex;
}

bool matches(const std::string& answer, const std::string& reference, const VerifyOptions& options);

// The answer in `region` per `options` (`pattern`: the compiled regex when the
// option is one).
std::optional<std::string> find_answer(const std::string& region, const VerifyOptions& options,
                                       const std::regex* pattern) {
  if (options.answer_pattern == "boxed") return non_empty_trimmed(last_boxed(region));
  if (options.answer_pattern == "gsm8k") return non_empty_trimmed(gsm8k_answer(region));
  if (options.answer_pattern == "exact") return non_empty_trimmed(region);
  BRIGADE_ASSERT(pattern != nullptr, "answer pattern '", options.answer_pattern, "' was not compiled");
  return non_empty_trimmed(last_capture(region, *pattern));
}

// What follows the last "</think>" (the whole text when there is none): a \boxed
// inside the reasoning does not count.
std::string after_reasoning(const std::string& text) {
  const size_t last_close = text.rfind(kThinkClose);
  return last_close == std::string::npos ? text : text.substr(last_close + kThinkClose.size());
}

double to_double(const std::string& digits) {
  std::string plain;
  for (char c : digits) {
    if (c != ',') plain += c;
  }
  return std::strtod(plain.c_str(), nullptr);
}

// `text` (whitespace already normalised) as a number, if it is one (see answers_match).
std::optional<double> parse_number(std::string text) {
  static const std::regex kDecimal(R"(^[+-]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?$)");
  static const std::regex kFraction(R"(^([+-]?\d+) ?/ ?(\d+)$)");
  static const std::regex kLatexFraction(R"(^([+-]?)\\[dt]?frac ?\{ ?([+-]?\d+) ?\} ?\{ ?(\d+) ?\}$)");
  if (text.size() > 1 && text.back() == '.' && std::isdigit(static_cast<unsigned char>(text[text.size() - 2]))) {
    text.pop_back();
  }
  std::smatch m;
  if (std::regex_match(text, m, kDecimal)) {
    if (text.find_first_of("0123456789") == std::string::npos) return std::nullopt;
    return to_double(text);
  }
  double numerator = 0, denominator = 0, sign = 1;
  if (std::regex_match(text, m, kFraction)) {
    numerator = to_double(m[1].str());
    denominator = to_double(m[2].str());
  } else if (std::regex_match(text, m, kLatexFraction)) {
    sign = m[1].str() == "-" ? -1 : 1;
    numerator = to_double(m[2].str());
    denominator = to_double(m[3].str());
  } else {
    return std::nullopt;
  }
  if (denominator == 0) return std::nullopt;
  return sign * numerator / denominator;
}

// True when the prompt itself ends by opening the think block (chat templates of
// reasoning models do), so the completion starts inside it.
bool prompt_opens_think(const std::string& prompt) {
  const std::string tail = trim(prompt);
  return tail.size() >= kThinkOpen.size() &&
         std::string_view(tail).substr(tail.size() - kThinkOpen.size()) == kThinkOpen;
}

// "1 sample", "3 samples"
std::string counted(int64_t n, const char* noun) {
  return std::to_string(n) + " " + noun + (n == 1 ? "" : "s");
}

// Writes a file through `path.tmp`, renamed into place by commit().
class AtomicOutput {
 public:
  explicit AtomicOutput(fs::path path) : path_(std::move(path)), tmp_(path_) {
    tmp_ += ".tmp";
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    BRIGADE_CHECK(fd_ >= 0, "cannot write ", tmp_.string(), ": ", std::strerror(errno));
  }
  ~AtomicOutput() {
    if (fd_ >= 0) {
      ::close(fd_);
      std::error_code ec;
      fs::remove(tmp_, ec);
    }
  }
  AtomicOutput(const AtomicOutput&) = delete;
  AtomicOutput& operator=(const AtomicOutput&) = delete;

  void write(const std::string& bytes) {
    buffer_ += bytes;
    if (buffer_.size() >= (1u << 20)) drain();
  }
  void commit() {
    drain();
    BRIGADE_CHECK(::fsync(fd_) == 0, "cannot fsync ", tmp_.string(), ": ", std::strerror(errno));
    ::close(fd_);
    fd_ = -1;
    fs::rename(tmp_, path_);
    fsync_dir(path_.parent_path());
  }

 private:
  void drain() {
    const char* p = buffer_.data();
    size_t left = buffer_.size();
    while (left > 0) {
      ssize_t n = ::write(fd_, p, left);
      if (n < 0 && errno == EINTR) continue;
      BRIGADE_CHECK(n > 0, "cannot write ", tmp_.string(), ": ", std::strerror(errno));
      p += n;
      left -= static_cast<size_t>(n);
    }
    buffer_.clear();
  }

  fs::path path_;
  fs::path tmp_;
  int fd_ = -1;
  std::string buffer_;
};

}  // namespace

void validate(const VerifyOptions& options) {
  BRIGADE_CHECK(!options.answer_pattern.empty(),
                "verify answer_pattern is empty: use \"boxed\" or a regex with a capture group");
  if (!is_builtin_pattern(options.answer_pattern)) compile_pattern(options.answer_pattern);
  BRIGADE_CHECK(options.max_chars >= 0, "verify max_chars must be >= 0 (0: no limit), got ", options.max_chars);
  BRIGADE_CHECK(options.max_tokens >= 0, "verify max_tokens must be >= 0 (0: no limit), got ", options.max_tokens);
  BRIGADE_CHECK(options.numeric_tolerance >= 0 && std::isfinite(options.numeric_tolerance),
                "verify numeric_tolerance must be a finite number >= 0, got ", options.numeric_tolerance);
}

std::optional<std::string> extract_answer(const std::string& text, const VerifyOptions& options) {
  if (is_builtin_pattern(options.answer_pattern)) return find_answer(text, options, nullptr);
  const std::regex pattern = compile_pattern(options.answer_pattern);
  return find_answer(text, options, &pattern);
}

namespace {
bool matches(const std::string& answer, const std::string& reference, const VerifyOptions& options) {
  if (options.answer_pattern == "exact") return normalise_space(answer) == normalise_space(reference);
  return answers_match(answer, reference, options.numeric_tolerance);
}
}  // namespace

Grade grade_completion(const std::string& completion, const std::string& reference, const VerifyOptions& options) {
  Grade grade;
  grade.answer = extract_answer(after_reasoning(completion), options);
  if (!grade.answer) return grade;
  grade.correct = matches(*grade.answer, reference, options);
  return grade;
}

namespace {
// Every occurrence of `from` in `text` replaced by `to`.
std::string replace_all(std::string text, std::string_view from, std::string_view to) {
  for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size())) {
    text.replace(at, from.size(), to);
  }
  return text;
}

// "\frac12" -> "\frac{1}{2}", "\sqrt3" -> "\sqrt{3}": a command's one-character
// arguments given without braces.
std::string brace_short_arguments(const std::string& text, std::string_view command, int arguments) {
  std::string out;
  size_t i = 0;
  while (i < text.size()) {
    if (text.compare(i, command.size(), command) != 0) {
      out += text[i++];
      continue;
    }
    out += command;
    i += command.size();
    for (int a = 0; a < arguments && i < text.size() && text[i] != '['; ++a) {
      if (text[i] == '{') {  // a braced argument: copy it whole
        int depth = 0;
        do {
          if (text[i] == '{') ++depth;
          if (text[i] == '}') --depth;
          out += text[i++];
        } while (i < text.size() && depth > 0);
      } else if (text[i] != '\\') {
        out += '{';
        out += text[i++];
        out += '}';
      }
    }
  }
  return out;
}
}  // namespace

std::string normalise_math_answer(const std::string& answer) {
  std::string s = normalise_space(answer);
  // Spacing and sizing commands carry no value.
  for (std::string_view cmd : {"\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\displaystyle"}) {
    s = replace_all(s, cmd, "");
  }
  s = replace_all(s, "\\dfrac", "\\frac");
  s = replace_all(s, "\\tfrac", "\\frac");
  for (std::string_view mark : {"^{\\circ}", "^\\circ", "\\circ", "\\degree", "\\%", "%", "\\$", "$"}) {
    s = replace_all(s, mark, "");
  }
  // A unit after a value: "10\text{ cm}", "10 \mbox{cm}^2".
  static const std::regex kTextUnit(R"(^(.*[0-9}])\s*\\(text|textbf|mbox|mathrm)\{[^{}]*\}(\^\{?[0-9]\}?)?$)");
  std::smatch m;
  if (std::regex_match(s, m, kTextUnit)) s = m[1].str();
  // \text{yes} -> yes
  static const std::regex kText(R"(\\(text|textbf|mbox|mathrm)\{([^{}]*)\})");
  s = std::regex_replace(s, kText, "$2");
  // A plain unit word after a number: "10 cm", "3.5 inches^2".
  static const std::regex kWordUnit(R"(^([+-]?[0-9][0-9,]*(\.[0-9]+)?) [A-Za-z]{2,}(\^[0-9])?$)");
  if (std::regex_match(s, m, kWordUnit)) s = m[1].str();
  // "x = 5", "k=\frac{1}{2}": the value of a single-letter variable.
  static const std::regex kAssignment(R"(^[A-Za-z] ?= ?(.+)$)");
  if (std::regex_match(s, m, kAssignment)) s = m[1].str();
  s = replace_all(s, " ", "");
  s = brace_short_arguments(s, "\\frac", 2);
  s = brace_short_arguments(s, "\\sqrt", 1);
  if (s.size() > 1 && s.back() == '.') s.pop_back();
  if (!s.empty() && s.front() == '.') s.insert(0, "0");
  if (s.size() > 1 && s[0] == '-' && s[1] == '.') s.insert(1, "0");
  return s;
}

bool answers_match(const std::string& got, const std::string& reference, double tolerance) {
  BRIGADE_CHECK(tolerance >= 0, "answer tolerance must be >= 0, got ", tolerance);
  if (normalise_space(got) == normalise_space(reference)) return true;
  const std::string a = normalise_math_answer(got);
  const std::string b = normalise_math_answer(reference);
  if (a == b) return true;
  const std::optional<double> x = parse_number(a);
  const std::optional<double> y = parse_number(b);
  if (!x || !y) return false;
  return std::fabs(*x - *y) <= tolerance * std::max(1.0, std::fabs(*y));
}

// ---------------------------------------------------------------- Verifier

Verifier::Verifier(VerifyOptions options) : options_(std::move(options)) {
  validate(options_);
  if (!is_builtin_pattern(options_.answer_pattern)) pattern_ = compile_pattern(options_.answer_pattern);
  for (const char* reason : kReasons) reasons_[reason] = 0;
}

Verdict Verifier::decide(const Trace& trace, const Prompt& prompt) {
  auto reject = [](const char* reason, std::optional<std::string> answer = std::nullopt) {
    return Verdict{false, reason, std::move(answer)};
  };
  const std::string& text = trace.text;
  if (trace.failed()) return reject("error");
  if (trace.finish_reason == "length") return reject("truncated");
  if (options_.max_chars > 0 && static_cast<int64_t>(text.size()) > options_.max_chars) return reject("too_long");
  if (options_.max_tokens > 0 && trace.completion_tokens > options_.max_tokens) return reject("too_long");

  const size_t open = text.find(kThinkOpen);
  const size_t close = text.find(kThinkClose, open == std::string::npos ? 0 : open + kThinkOpen.size());
  if (options_.require_think) {
    // A chat prompt's template may open the block itself (DeepSeek-R1's generation
    // prompt ends with "<think>"): there only the closing tag is required.
    if (open == std::string::npos && !prompt_opens_think(prompt.prompt) && !prompt.chat()) return reject("no_think");
    if (close == std::string::npos) return reject("unclosed_think");
  }
  std::optional<std::string> answer = find_answer(after_reasoning(text), options_, pattern_ ? &*pattern_ : nullptr);
  if (!answer) return reject("no_answer");
  if (prompt.answer && !matches(*answer, *prompt.answer, options_)) return reject("wrong_answer", std::move(answer));
  if (!accepted_texts_.insert(prompt.id + '\0' + normalise_space(text)).second) {
    return reject("duplicate", std::move(answer));
  }
  return Verdict{true, "accepted", std::move(answer)};
}

Verdict Verifier::check(const Trace& trace, const Prompt& prompt) {
  BRIGADE_CHECK(trace.prompt_id == prompt.id, "Verifier::check: trace of prompt \"", trace.prompt_id,
                "\" was given prompt \"", prompt.id, "\"");
  ++total_;
  prompts_seen_.insert(prompt.id);
  if (!prompt.answer) {
    ++format_only_samples_;
    format_only_prompts_.insert(prompt.id);
  }
  Verdict verdict = decide(trace, prompt);
  count(verdict.reason);
  if (verdict.accepted) {
    prompts_accepted_.insert(prompt.id);
    if (!prompt.answer) ++format_only_accepted_;
  }
  return verdict;
}

Verdict Verifier::reject_unknown_prompt(const Trace& trace) {
  ++total_;
  count("unknown_prompt");
  return Verdict{false, "unknown_prompt", std::nullopt};
}

void Verifier::count(const std::string& reason) { ++reasons_[reason]; }

nlohmann::json Verifier::statistics() const {
  const int64_t accepted = reasons_.at("accepted");
  nlohmann::json reasons = nlohmann::json::object();
  for (const auto& [reason, n] : reasons_) reasons[reason] = n;
  nlohmann::json format_only = {
      {"samples", format_only_samples_},
      {"accepted_samples", format_only_accepted_},
      {"prompts", static_cast<int64_t>(format_only_prompts_.size())},
  };
  format_only["note"] =
      format_only_samples_ == 0
          ? "every sample's prompt had a reference answer"
          : counted(format_only_samples_, "sample") + " of " +
                counted(static_cast<int64_t>(format_only_prompts_.size()), "prompt") +
                " had no reference answer: checked on format alone (think block, an answer, length), not on "
                "correctness";
  return {
      {"total", total_},
      {"accepted", accepted},
      {"acceptance_rate", total_ == 0 ? 0.0 : static_cast<double>(accepted) / static_cast<double>(total_)},
      {"reasons", reasons},
      {"prompts", static_cast<int64_t>(prompts_seen_.size())},
      {"prompts_with_accepted", static_cast<int64_t>(prompts_accepted_.size())},
      {"verified_by_format_only", format_only},
  };
}

// ---------------------------------------------------------------- run_verify

nlohmann::json run_verify(const fs::path& traces_dir, const std::vector<Prompt>& prompts,
                          const VerifyOptions& options, const fs::path& out_dir) {
  Verifier verifier(options);
  std::unordered_map<std::string, const Prompt*> by_id;
  for (const Prompt& prompt : prompts) {
    BRIGADE_CHECK(by_id.emplace(prompt.id, &prompt).second, "verify: prompt id \"", prompt.id,
                  "\" appears twice in the prompts");
  }
  const TraceReader reader(traces_dir);

  std::error_code ec;
  fs::create_directories(out_dir, ec);
  BRIGADE_CHECK(!ec, "cannot create ", out_dir.string(), ": ", ec.message());
  const fs::path stats_path = out_dir / "stats.json";
  fs::remove(stats_path, ec);  // until the new one is written, the stage is incomplete

  AtomicOutput accepted(out_dir / "accepted.jsonl");
  for (int64_t i = 0; i < reader.size(); ++i) {
    const Trace& trace = reader.traces()[static_cast<size_t>(i)];
    auto it = by_id.find(trace.prompt_id);
    if (it == by_id.end()) {
      verifier.reject_unknown_prompt(trace);
      continue;
    }
    const Verdict verdict = verifier.check(trace, *it->second);
    if (!verdict.accepted) continue;
    nlohmann::json line = {{"prompt_id", trace.prompt_id}, {"sample", trace.sample},
                           {"prompt", it->second->prompt}, {"completion", trace.text},
                           {"answer", *verdict.answer}};
    if (it->second->chat()) line["conversation"] = it->second->conversation;
    if (trace.topk_ids.defined()) {
      const TopkRange& range = reader.topk_range(i);
      line["topk"] = {{"offset", range.offset}, {"positions", range.positions}};
    }
    accepted.write(line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
  }
  accepted.commit();

  nlohmann::json stats = verifier.statistics();
  stats["trace_store"] = traces_dir.string();
  stats["topk_k"] = reader.k();
  stats["options"] = {{"answer_pattern", options.answer_pattern},
                      {"require_think", options.require_think},
                      {"max_chars", options.max_chars},
                      {"max_tokens", options.max_tokens},
                      {"numeric_tolerance", options.numeric_tolerance}};
  write_file_atomic(stats_path, stats.dump(2) + "\n");

  log_info("verify: accepted ", stats["accepted"].get<int64_t>(), " of ", stats["total"].get<int64_t>(),
           " samples (", stats["prompts_with_accepted"].get<int64_t>(), " of ", prompts.size(), " prompts)");
  if (stats["verified_by_format_only"]["samples"].get<int64_t>() > 0) {
    log_warn("verify: ", stats["verified_by_format_only"]["note"].get<std::string>());
  }
  return stats;
}

}  // namespace brigade::distill
