// Built-in synthetic corpus: step-by-step arithmetic reasoning problems, so brigade
// trains something meaningful with nothing downloaded.
//
// A document is
//   Problem: 47*23+5
//   <think>
//   47*23 = 47*3 + 47*20
//   47*3 = 141
//   47*20 = 940
//   141+940 = 1081
//   so 1081+5
//   1081+5 = 1086
//   </think>
//   \boxed{1086}
// Multiplications are done first (with partial products when both factors have more
// than one digit), then additions and subtractions left to right. After each product
// term and each sum step but the last, a "so" line restates the expression with what
// has been computed so far: the next step then reads its operands from the line just
// above instead of counting operands in the problem, which small models learn far
// faster (held-out accuracy of a 0.8M model after 600 steps: 9.5% without, 15% with).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "data/corpus.h"
#include "data/tokenizer.h"

namespace brigade::data {

struct ArithmeticOptions {
  int64_t num_problems = 20000;  // training documents
  int64_t eval_problems = 500;   // held-out documents (disjoint index range)
  int min_digits = 1;            // digits per operand
  int max_digits = 3;
  int min_operands = 2;
  int max_operands = 3;
  std::string ops = "+-*";       // operators to draw from, any of "+-*"
  bool nonnegative = false;      // only problems whose running values never go below zero
  int64_t max_value = 0;         // > 0: only problems whose every computed value is at most this
  uint64_t seed = 1234;
};

struct ArithmeticProblem {
  std::string prompt;     // "Problem: 47*23+5\n"
  std::string reasoning;  // "<think>\n...\n</think>\n"
  std::string answer;     // "1086"
  // prompt + reasoning + "\\boxed{" + answer + "}"
  std::string text() const;
};

// Throws an Error naming the field when options are out of range.
void validate(const ArithmeticOptions& options);

// Problem number `index` for these options: a pure function of (options, index).
ArithmeticProblem make_arithmetic_problem(const ArithmeticOptions& options, uint64_t index);

// Train documents are indices [0, num_problems), eval documents follow them.
// Each document is [BOS] + text + EOS (BOS per the tokenizer's convention,
// sequence_start); the mask is all ones.
TokenCorpus make_arithmetic_corpus(const ArithmeticOptions& options, const Tokenizer& tokenizer,
                                   bool eval);

// The answer inside the last \boxed{...} of `text`, if any.
std::optional<std::string> extract_boxed(const std::string& text);

}  // namespace brigade::data
