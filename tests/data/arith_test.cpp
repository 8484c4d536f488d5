#include <gtest/gtest.h>

#include <cctype>
#include <regex>
#include <sstream>

#include "data/arith.h"
#include "tests/testing.h"

namespace brigade::data {
namespace {

using i128 = __int128;

// An independent evaluator for "47*23+5": a sum of signed products, in 128 bits so an
// int64 overflow in the generator would show up as a mismatch.
i128 evaluate(const std::string& expr) {
  i128 total = 0;
  i128 term = 0;
  char sign = '+';
  size_t i = 0;
  auto number = [&]() {
    EXPECT_TRUE(i < expr.size() && std::isdigit(static_cast<unsigned char>(expr[i]))) << expr;
    i128 v = 0;
    while (i < expr.size() && std::isdigit(static_cast<unsigned char>(expr[i])))
      v = v * 10 + (expr[i++] - '0');
    return v;
  };
  if (expr.starts_with("-")) {  // a restated expression may start below zero
    sign = '-';
    ++i;
  }
  term = number();
  while (i < expr.size()) {
    char op = expr[i++];
    i128 v = number();
    if (op == '*') {
      term *= v;
    } else {
      total += sign == '+' ? term : -term;
      sign = op;
      term = v;
    }
  }
  total += sign == '+' ? term : -term;
  return total;
}

std::string str(i128 v) {
  if (v == 0) return "0";
  bool negative = v < 0;
  if (negative) v = -v;
  std::string s;
  while (v > 0) {
    s.insert(s.begin(), static_cast<char>('0' + static_cast<int>(v % 10)));
    v /= 10;
  }
  return negative ? "-" + s : s;
}

int64_t to_int(const std::string& s) { return std::stoll(s); }

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// Checks the document layout and that every reasoning line is true arithmetic.
void check_problem(const ArithmeticProblem& p) {
  SCOPED_TRACE(p.text());
  ASSERT_TRUE(p.prompt.starts_with("Problem: "));
  ASSERT_TRUE(p.prompt.ends_with("\n"));
  const std::string expr = p.prompt.substr(9, p.prompt.size() - 10);
  EXPECT_EQ(str(evaluate(expr)), p.answer);
  EXPECT_EQ(p.text(), p.prompt + p.reasoning + "\\boxed{" + p.answer + "}");
  EXPECT_EQ(extract_boxed(p.text()), p.answer);

  std::vector<std::string> lines = lines_of(p.reasoning);
  ASSERT_GE(lines.size(), 3u);
  EXPECT_EQ(lines.front(), "<think>");
  EXPECT_EQ(lines.back(), "</think>");
  static const std::regex binary(R"((-?\d+)([-+*])(\d+) = (-?\d+))");
  static const std::regex split(R"((\d+)\*(\d+) = (\d+\*\d+(?: \+ \d+\*\d+)+))");
  static const std::regex part(R"((\d+)\*(\d+))");
  std::string last_result;
  for (size_t k = 1; k + 1 < lines.size(); ++k) {
    const std::string& line = lines[k];
    std::smatch m;
    if (std::regex_match(line, m, split)) {
      // "a*b = a*p1 + a*p2": the parts are b's nonzero digit places, lowest first.
      const int64_t a = to_int(m[1]);
      const int64_t b = to_int(m[2]);
      const std::string rhs = m[3];
      int64_t sum = 0;
      int64_t previous = 0;
      for (std::sregex_iterator it(rhs.begin(), rhs.end(), part), end; it != end; ++it) {
        EXPECT_EQ(to_int((*it)[1]), a) << line;
        const int64_t p = to_int((*it)[2]);
        EXPECT_GT(p, previous) << line;
        std::string digits = std::to_string(p);
        EXPECT_NE(digits[0], '0') << line;
        EXPECT_EQ(digits.find_first_not_of('0', 1), std::string::npos) << line;
        sum += p;
        previous = p;
      }
      EXPECT_EQ(sum, b) << line;
      continue;
    }
    if (line.starts_with("so ")) {
      // The expression restated with what is computed so far: the same value.
      EXPECT_EQ(str(evaluate(line.substr(3))), p.answer) << line;
      continue;
    }
    ASSERT_TRUE(std::regex_match(line, m, binary)) << "unexpected line: " << line;
    const i128 x = to_int(m[1]);
    const i128 y = to_int(m[3]);
    const char op = m.str(2)[0];
    const i128 want = op == '+' ? x + y : op == '-' ? x - y : x * y;
    EXPECT_EQ(str(want), m.str(4)) << line;
    last_result = m[4];
  }
  EXPECT_EQ(last_result, p.answer);
}

TEST(Arithmetic, DocumentFormatHandChecked) {
  // These texts were checked by hand; they also pin the generator, so a change to it
  // (which would change every recipe's data) shows up here.
  ArithmeticOptions o;
  EXPECT_EQ(make_arithmetic_problem(o, 0).text(),
            "Problem: 54-115\n"
            "<think>\n"
            "54-115 = -61\n"
            "</think>\n"
            "\\boxed{-61}");
  EXPECT_EQ(make_arithmetic_problem(o, 3).text(),
            "Problem: 498*33+255\n"
            "<think>\n"
            "498*33 = 498*3 + 498*30\n"
            "498*3 = 1494\n"
            "498*30 = 14940\n"
            "1494+14940 = 16434\n"
            "so 16434+255\n"
            "16434+255 = 16689\n"
            "</think>\n"
            "\\boxed{16689}");
  ArithmeticProblem p5 = make_arithmetic_problem(o, 5);  // multiplication before addition
  EXPECT_EQ(p5.prompt, "Problem: 0+7*4\n");
  EXPECT_EQ(p5.reasoning, "<think>\n7*4 = 28\nso 0+28\n0+28 = 28\n</think>\n");
  EXPECT_EQ(p5.answer, "28");
}

TEST(Arithmetic, LongMultiplicationLayout) {
  // Two-digit by two-digit products are split like the header's example.
  ArithmeticOptions o;
  o.min_digits = o.max_digits = 2;
  o.min_operands = o.max_operands = 2;
  o.ops = "*";
  int split = 0;
  for (uint64_t i = 0; i < 50; ++i) {
    ArithmeticProblem p = make_arithmetic_problem(o, i);
    check_problem(p);
    std::smatch m;
    ASSERT_TRUE(std::regex_match(p.prompt, m, std::regex(R"(Problem: (\d\d)\*(\d\d)\n)")))
        << p.prompt;
    const int64_t a = to_int(m[1]);
    const int64_t b = to_int(m[2]);
    std::string expected = "<think>\n";
    if (b % 10 == 0) {
      expected += std::to_string(a) + "*" + std::to_string(b) + " = " + std::to_string(a * b) + "\n";
    } else {
      const int64_t ones = b % 10;
      const int64_t tens = b - ones;
      expected += std::to_string(a) + "*" + std::to_string(b) + " = " + std::to_string(a) + "*" +
                  std::to_string(ones) + " + " + std::to_string(a) + "*" + std::to_string(tens) +
                  "\n";
      expected += std::to_string(a) + "*" + std::to_string(ones) + " = " +
                  std::to_string(a * ones) + "\n";
      expected += std::to_string(a) + "*" + std::to_string(tens) + " = " +
                  std::to_string(a * tens) + "\n";
      expected += std::to_string(a * ones) + "+" + std::to_string(a * tens) + " = " +
                  std::to_string(a * b) + "\n";
      ++split;
    }
    expected += "</think>\n";
    EXPECT_EQ(p.reasoning, expected);
    EXPECT_EQ(p.answer, std::to_string(a * b));
  }
  EXPECT_GT(split, 30);
}

TEST(Arithmetic, FiveHundredRandomProblemsAreCorrect) {
  ArithmeticOptions o;
  o.max_operands = 5;
  bool saw_negative = false;
  bool saw_split = false;
  for (uint64_t i = 0; i < 500; ++i) {
    ArithmeticProblem p = make_arithmetic_problem(o, i);
    check_problem(p);
    saw_negative |= p.answer[0] == '-';
    saw_split |= p.reasoning.find(" + ") != std::string::npos;
  }
  EXPECT_TRUE(saw_negative);
  EXPECT_TRUE(saw_split);
}

TEST(Arithmetic, NegativeIntermediatesPrintCorrectly) {
  ArithmeticOptions o;
  o.ops = "-";
  o.min_operands = o.max_operands = 4;
  int negative_lines = 0;
  for (uint64_t i = 0; i < 100; ++i) {
    ArithmeticProblem p = make_arithmetic_problem(o, i);
    check_problem(p);
    for (const std::string& line : lines_of(p.reasoning)) negative_lines += line.starts_with("-");
  }
  EXPECT_GT(negative_lines, 50);
}

TEST(Arithmetic, RespectsOptions) {
  ArithmeticOptions o;
  o.min_digits = 2;
  o.max_digits = 4;
  o.min_operands = 3;
  o.max_operands = 6;
  o.ops = "+-";
  static const std::regex operand(R"(\d+)");
  for (uint64_t i = 0; i < 200; ++i) {
    ArithmeticProblem p = make_arithmetic_problem(o, i);
    check_problem(p);
    const std::string expr = p.prompt.substr(9, p.prompt.size() - 10);
    EXPECT_EQ(expr.find('*'), std::string::npos) << expr;
    int count = 0;
    for (std::sregex_iterator it(expr.begin(), expr.end(), operand), end; it != end; ++it) {
      ++count;
      const size_t digits = it->str().size();
      EXPECT_GE(digits, 2u) << expr;
      EXPECT_LE(digits, 4u) << expr;
      EXPECT_NE(it->str()[0], '0') << expr;
    }
    EXPECT_GE(count, 3) << expr;
    EXPECT_LE(count, 6) << expr;
  }
}

TEST(Arithmetic, ValueRangeKeepsEveryComputedNumberInside) {
  ArithmeticOptions o;
  o.min_digits = o.max_digits = 1;
  o.min_operands = o.max_operands = 4;
  o.nonnegative = true;
  o.max_value = 99;
  static const std::regex number(R"(\d+)");
  int products = 0;
  for (uint64_t i = 0; i < 500; ++i) {
    ArithmeticProblem p = make_arithmetic_problem(o, i);
    check_problem(p);
    products += p.prompt.find('*') != std::string::npos ? 1 : 0;
    // No negative result or restated value, and no number above 99.
    EXPECT_EQ(p.reasoning.find("= -"), std::string::npos) << p.text();
    EXPECT_EQ(p.reasoning.find("so -"), std::string::npos) << p.text();
    for (std::sregex_iterator it(p.reasoning.begin(), p.reasoning.end(), number), end; it != end; ++it)
      EXPECT_LE(std::stoll(it->str()), 99) << p.text();
  }
  EXPECT_GT(products, 100);  // the range leaves the products in
  // The same index without the range differs only where the range redrew it.
  ArithmeticOptions free = o;
  free.nonnegative = false;
  free.max_value = 0;
  int same = 0;
  for (uint64_t i = 0; i < 100; ++i) same += make_arithmetic_problem(o, i).text() == make_arithmetic_problem(free, i).text();
  EXPECT_GT(same, 20);
  EXPECT_LT(same, 100);
  // A range no problem can meet is an error, not a hang.
  o.min_digits = o.max_digits = 2;
  o.max_value = 5;
  EXPECT_BRIGADE_ERROR(make_arithmetic_problem(o, 0), "no problem with values in range");
}

TEST(Arithmetic, LargeProductsStayExact) {
  // Eight nine-digit factors would overflow int64; the generator stops a product early.
  ArithmeticOptions o;
  o.min_digits = o.max_digits = 9;
  o.min_operands = o.max_operands = 8;
  o.ops = "*+";
  for (uint64_t i = 0; i < 200; ++i) check_problem(make_arithmetic_problem(o, i));
}

TEST(Arithmetic, PureFunctionOfOptionsAndIndex) {
  ArithmeticOptions o;
  EXPECT_EQ(make_arithmetic_problem(o, 42).text(), make_arithmetic_problem(o, 42).text());
  EXPECT_NE(make_arithmetic_problem(o, 42).text(), make_arithmetic_problem(o, 43).text());
  ArithmeticOptions reseeded = o;
  reseeded.seed = 99;
  int differ = 0;
  for (uint64_t i = 0; i < 20; ++i)
    differ += make_arithmetic_problem(o, i).text() != make_arithmetic_problem(reseeded, i).text();
  EXPECT_GE(differ, 18);
}

TEST(Arithmetic, ValidateNamesTheField) {
  auto bad = [](auto edit) {
    ArithmeticOptions o;
    edit(o);
    return o;
  };
  EXPECT_NO_THROW(validate(ArithmeticOptions{}));
  EXPECT_BRIGADE_ERROR(validate(bad([](auto& o) { o.min_digits = 0; })),
                       "data.synthetic.min_digits must be in 1..9, got 0");
  EXPECT_BRIGADE_ERROR(validate(bad([](auto& o) { o.max_digits = 10; })),
                       "data.synthetic.max_digits must be in 1..9, got 10");
  EXPECT_BRIGADE_ERROR(validate(bad([](auto& o) { o.min_digits = 4; })),
                       "data.synthetic.min_digits (4) must be <= data.synthetic.max_digits (3)");
  EXPECT_BRIGADE_ERROR(validate(bad([](auto& o) { o.min_operands = 1; })),
                       "data.synthetic.min_operands must be in 2..8, got 1");
  EXPECT_BRIGADE_ERROR(validate(bad([](auto& o) { o.max_operands = 9; })),
                       "data.synthetic.max_operands must be in 2..8, got 9");
  EXPECT_BRIGADE_ERROR(validate(bad([](auto& o) { o.min_operands = 5; })),
                       "data.synthetic.min_operands (5) must be <= data.synthetic.max_operands (3)");
  EXPECT_BRIGADE_ERROR(validate(bad([](auto& o) { o.ops = ""; })), "data.synthetic.ops is empty");
  EXPECT_BRIGADE_ERROR(validate(bad([](auto& o) { o.ops = "+/"; })),
                       "data.synthetic.ops '+/' may only contain");
  EXPECT_BRIGADE_ERROR(validate(bad([](auto& o) { o.num_problems = 0; })),
                       "data.synthetic.num_problems must be >= 1, got 0");
  EXPECT_BRIGADE_ERROR(validate(bad([](auto& o) { o.eval_problems = -1; })),
                       "data.synthetic.eval_problems must be >= 0, got -1");
  EXPECT_BRIGADE_ERROR(make_arithmetic_problem(bad([](auto& o) { o.ops = "x"; }), 0),
                       "data.synthetic.ops");
}

TEST(Arithmetic, CorpusDocuments) {
  ArithmeticOptions o;
  o.num_problems = 5;
  o.eval_problems = 3;
  ByteTokenizer tok;
  TokenCorpus train = make_arithmetic_corpus(o, tok, false);
  TokenCorpus eval = make_arithmetic_corpus(o, tok, true);

  auto expected_tokens = [&](int64_t begin, int64_t end) {
    std::vector<int64_t> out;
    for (int64_t i = begin; i < end; ++i) {
      out.push_back(tok.bos_id());
      for (unsigned char c : make_arithmetic_problem(o, static_cast<uint64_t>(i)).text())
        out.push_back(c);
      out.push_back(tok.eos_id());
    }
    return out;
  };
  auto all_tokens = [](const TokenCorpus& c, std::vector<uint8_t>& mask) {
    std::vector<int64_t> t(static_cast<size_t>(c.size()));
    mask.resize(t.size());
    c.read(0, c.size(), t.data(), mask.data());
    return t;
  };
  std::vector<uint8_t> mask;
  EXPECT_EQ(all_tokens(train, mask), expected_tokens(0, 5));
  EXPECT_EQ(std::count(mask.begin(), mask.end(), 1), train.size());
  EXPECT_EQ(all_tokens(eval, mask), expected_tokens(5, 8));
  EXPECT_LE(train.vocab_bound(), tok.vocab_size());
  EXPECT_EQ(train.vocab_bound(), tok.eos_id() + 1);

  o.eval_problems = 0;
  EXPECT_EQ(make_arithmetic_corpus(o, tok, true).size(), 0);
}

TEST(ExtractBoxed, LastBoxWins) {
  EXPECT_EQ(extract_boxed("so \\boxed{12} no wait \\boxed{-7}."), "-7");
  EXPECT_EQ(extract_boxed("\\boxed{}"), "");
  EXPECT_EQ(extract_boxed("\\boxed{\\frac{1}{2}}"), "\\frac{1}{2}");
  EXPECT_EQ(extract_boxed("the answer is 5"), std::nullopt);
  EXPECT_EQ(extract_boxed("\\boxed{12"), std::nullopt);
  EXPECT_EQ(extract_boxed("boxed{3}"), std::nullopt);
}

}  // namespace
}  // namespace brigade::data
