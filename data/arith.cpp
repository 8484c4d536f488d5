#include "data/arith.h"

#include <algorithm>

#include "core/error.h"
#include "core/hash.h"

namespace brigade::data {

namespace {

// Every product term stays below this, so a sum of up to 8 terms fits in int64
// (8e18 < 9.22e18). Two operands (each < 1e9) never reach it.
constexpr int64_t kTermLimit = 1'000'000'000'000'000'000;

// Counter-based generator: draw k is hash(key, k), so a problem depends only on its key.
class Rng {
 public:
  explicit Rng(uint64_t key) : key_(key) {}
  // Uniform in [lo, hi] (the modulo bias is far below anything a test could see).
  int64_t uniform(int64_t lo, int64_t hi) {
    uint64_t span = static_cast<uint64_t>(hi - lo) + 1;
    return lo + static_cast<int64_t>(hash_combine(key_, counter_++) % span);
  }

 private:
  uint64_t key_;
  uint64_t counter_ = 0;
};

int64_t pow10(int n) {
  int64_t p = 1;
  for (int i = 0; i < n; ++i) p *= 10;
  return p;
}

int digit_count(int64_t v) {
  int n = 1;
  while (v >= 10) {
    v /= 10;
    ++n;
  }
  return n;
}

int64_t draw_operand(Rng& rng, const ArithmeticOptions& o) {
  int digits = static_cast<int>(rng.uniform(o.min_digits, o.max_digits));
  if (digits == 1) return rng.uniform(0, 9);
  return rng.uniform(pow10(digits - 1), pow10(digits) - 1);
}

std::string str(int64_t v) { return std::to_string(v); }

// Appends the lines computing a*b (a, b >= 0) and returns the product. When both
// factors have several digits and b has several nonzero places, it is long
// multiplication: one partial product per nonzero digit place of b, lowest first,
// then their running sum.
int64_t multiply(int64_t a, int64_t b, std::string& lines) {
  const int64_t product = a * b;
  std::vector<int64_t> parts;
  if (digit_count(a) > 1 && digit_count(b) > 1) {
    int64_t place = 1;
    for (int64_t rest = b; rest > 0; rest /= 10, place *= 10)
      if (rest % 10 != 0) parts.push_back((rest % 10) * place);
  }
  if (parts.size() < 2) {
    lines += str(a) + "*" + str(b) + " = " + str(product) + "\n";
    return product;
  }
  lines += str(a) + "*" + str(b) + " =";
  for (size_t k = 0; k < parts.size(); ++k)
    lines += (k == 0 ? " " : " + ") + str(a) + "*" + str(parts[k]);
  lines += "\n";
  for (int64_t part : parts) lines += str(a) + "*" + str(part) + " = " + str(a * part) + "\n";
  int64_t sum = a * parts[0];
  for (size_t k = 1; k < parts.size(); ++k) {
    int64_t next = sum + a * parts[k];
    lines += str(sum) + "+" + str(a * parts[k]) + " = " + str(next) + "\n";
    sum = next;
  }
  return sum;
}

}  // namespace

std::string ArithmeticProblem::text() const {
  return prompt + reasoning + "\\boxed{" + answer + "}";
}

void validate(const ArithmeticOptions& o) {
  BRIGADE_CHECK(o.num_problems >= 1, "data.synthetic.num_problems must be >= 1, got ",
                o.num_problems);
  BRIGADE_CHECK(o.eval_problems >= 0, "data.synthetic.eval_problems must be >= 0, got ",
                o.eval_problems);
  BRIGADE_CHECK(o.min_digits >= 1 && o.min_digits <= 9,
                "data.synthetic.min_digits must be in 1..9, got ", o.min_digits);
  BRIGADE_CHECK(o.max_digits >= 1 && o.max_digits <= 9,
                "data.synthetic.max_digits must be in 1..9, got ", o.max_digits);
  BRIGADE_CHECK(o.min_digits <= o.max_digits, "data.synthetic.min_digits (", o.min_digits,
                ") must be <= data.synthetic.max_digits (", o.max_digits, ")");
  BRIGADE_CHECK(o.min_operands >= 2 && o.min_operands <= 8,
                "data.synthetic.min_operands must be in 2..8, got ", o.min_operands);
  BRIGADE_CHECK(o.max_operands >= 2 && o.max_operands <= 8,
                "data.synthetic.max_operands must be in 2..8, got ", o.max_operands);
  BRIGADE_CHECK(o.min_operands <= o.max_operands, "data.synthetic.min_operands (", o.min_operands,
                ") must be <= data.synthetic.max_operands (", o.max_operands, ")");
  BRIGADE_CHECK(!o.ops.empty(), "data.synthetic.ops is empty; use any of \"+-*\"");
  BRIGADE_CHECK(o.ops.find_first_not_of("+-*") == std::string::npos, "data.synthetic.ops '", o.ops,
                "' may only contain '+', '-' and '*'");
}

namespace {

// The problem drawn from `key`; `negative`: whether a running value went below
// zero; `largest`: the largest value computed.
ArithmeticProblem draw_problem(const ArithmeticOptions& o, uint64_t key, bool& negative, int64_t& largest) {
  negative = false;
  largest = 0;
  Rng rng(key);
  const int operands = static_cast<int>(rng.uniform(o.min_operands, o.max_operands));

  // The expression as product terms joined by + and -: terms[i] are the factors of
  // term i, signs[i] the operator before it (signs[0] unused).
  std::vector<std::vector<int64_t>> terms{{draw_operand(rng, o)}};
  std::vector<char> signs{'+'};
  std::string expr = str(terms[0][0]);
  int64_t term_value = terms[0][0];
  for (int i = 1; i < operands; ++i) {
    const char op = o.ops[static_cast<size_t>(rng.uniform(0, static_cast<int64_t>(o.ops.size()) - 1))];
    const int64_t operand = draw_operand(rng, o);
    if (op == '*') {
      // A product that would leave int64 headroom ends the problem here instead.
      if (operand != 0 && term_value > (kTermLimit - 1) / operand) break;
      terms.back().push_back(operand);
      term_value *= operand;
    } else {
      terms.push_back({operand});
      signs.push_back(op);
      term_value = operand;
    }
    expr += op + str(operand);
  }

  // The expression as it stands: terms [0, reduced) by their values, the rest as
  // written. `first` replaces the value of term 0 (the running sum).
  auto restate = [&](const std::vector<int64_t>& values, size_t reduced, size_t from,
                     int64_t first) {
    std::string out = "so " + str(first);
    for (size_t i = from + 1; i < terms.size(); ++i) {
      out += signs[i];
      if (i < reduced) {
        out += str(values[i]);
      } else {
        for (size_t k = 0; k < terms[i].size(); ++k) {
          if (k > 0) out += '*';
          out += str(terms[i][k]);
        }
      }
    }
    return out + "\n";
  };

  std::string lines;
  std::vector<int64_t> values;
  for (size_t t = 0; t < terms.size(); ++t) {
    const auto& factors = terms[t];
    int64_t acc = factors[0];
    largest = std::max(largest, acc);
    for (size_t k = 1; k < factors.size(); ++k) {
      acc = multiply(acc, factors[k], lines);
      largest = std::max(largest, acc);
    }
    values.push_back(acc);
    if (factors.size() > 1 && terms.size() > 1) lines += restate(values, t + 1, 0, values[0]);
  }
  int64_t acc = values[0];
  for (size_t i = 1; i < values.size(); ++i) {
    const int64_t next = signs[i] == '+' ? acc + values[i] : acc - values[i];
    negative |= next < 0;
    largest = std::max(largest, next);
    lines += str(acc) + signs[i] + str(values[i]) + " = " + str(next) + "\n";
    acc = next;
    if (i + 1 < values.size()) lines += restate(values, values.size(), i, acc);
  }

  ArithmeticProblem problem;
  problem.prompt = "Problem: " + expr + "\n";
  problem.reasoning = "<think>\n" + lines + "</think>\n";
  problem.answer = str(acc);
  return problem;
}

}  // namespace

ArithmeticProblem make_arithmetic_problem(const ArithmeticOptions& o, uint64_t index) {
  validate(o);
  bool negative = false;
  int64_t largest = 0;
  const uint64_t key = hash_combine(o.seed, index);
  ArithmeticProblem problem = draw_problem(o, key, negative, largest);
  // Redraw (from keys that depend only on the index) until the problem's values
  // are in range.
  auto out_of_range = [&] { return (o.nonnegative && negative) || (o.max_value > 0 && largest > o.max_value); };
  for (uint64_t attempt = 1; out_of_range(); ++attempt) {
    BRIGADE_CHECK(attempt <= 10000, "data.synthetic: no problem with values in range (nonnegative ",
                  o.nonnegative ? "true" : "false", ", max_value ", o.max_value, ") in 10000 draws for ops '",
                  o.ops, "' and ", o.max_digits, "-digit operands; relax data.synthetic.nonnegative or max_value");
    problem = draw_problem(o, hash_combine(key, attempt), negative, largest);
  }
  return problem;
}

TokenCorpus make_arithmetic_corpus(const ArithmeticOptions& o, const Tokenizer& tokenizer,
                                   bool eval) {
  validate(o);
  const int64_t begin = eval ? o.num_problems : 0;
  const int64_t end = eval ? o.num_problems + o.eval_problems : o.num_problems;
  const std::vector<int64_t> start = sequence_start(tokenizer);
  const int64_t eos = tokenizer.eos_id();
  std::vector<int64_t> tokens;
  for (int64_t i = begin; i < end; ++i) {
    tokens.insert(tokens.end(), start.begin(), start.end());
    std::vector<int64_t> ids =
        tokenizer.encode(make_arithmetic_problem(o, static_cast<uint64_t>(i)).text());
    tokens.insert(tokens.end(), ids.begin(), ids.end());
    tokens.push_back(eos);
  }
  return TokenCorpus::from_tokens(std::move(tokens));
}

std::optional<std::string> extract_boxed(const std::string& text) {
  static constexpr std::string_view kOpen = "\\boxed{";
  const size_t at = text.rfind(kOpen);
  if (at == std::string::npos) return std::nullopt;
  // Match braces so "\boxed{\frac{1}{2}}" yields "\frac{1}{2}".
  const size_t begin = at + kOpen.size();
  int depth = 1;
  for (size_t i = begin; i < text.size(); ++i) {
    if (text[i] == '{') ++depth;
    if (text[i] == '}' && --depth == 0) return text.substr(begin, i - begin);
  }
  return std::nullopt;
}

}  // namespace brigade::data
