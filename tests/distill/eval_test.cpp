// brigade eval's pieces: the unbiased pass@k estimator, the grader (GSM8K and MATH
// answers), problem sets and scoring a trace store.
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "distill/eval.h"
#include "distill/verify.h"
#include "tests/testing.h"

namespace brigade::distill {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

// pass@k by enumeration: the share of k-subsets of n samples (c correct) holding a
// correct one.
double pass_at_k_by_counting(int n, int c, int k) {
  int64_t subsets = 0, hits = 0;
  for (uint32_t mask = 0; mask < (1u << n); ++mask) {
    if (__builtin_popcount(mask) != k) continue;
    ++subsets;
    hits += (mask & ((1u << c) - 1)) != 0 ? 1 : 0;  // samples 0..c-1 are the correct ones
  }
  return static_cast<double>(hits) / static_cast<double>(subsets);
}

TEST(DistillEval, PassAtKIsTheUnbiasedEstimator) {
  for (int n = 1; n <= 10; ++n) {
    for (int c = 0; c <= n; ++c) {
      for (int k = 1; k <= n; ++k) {
        EXPECT_NEAR(pass_at_k(n, c, k), pass_at_k_by_counting(n, c, k), 1e-12) << n << " " << c << " " << k;
      }
    }
  }
  EXPECT_DOUBLE_EQ(pass_at_k(200, 0, 100), 0.0);
  EXPECT_DOUBLE_EQ(pass_at_k(200, 200, 1), 1.0);
  EXPECT_NEAR(pass_at_k(200, 30, 1), 0.15, 1e-12);
  EXPECT_BRIGADE_ERROR(pass_at_k(3, 1, 4), "1 <= k <= n");
  EXPECT_BRIGADE_ERROR(pass_at_k(3, 4, 1), "0 <= c <= n");
}

TEST(DistillEval, Gsm8kAnswersComeAfterTheMarkOrAreTheLastNumber) {
  const VerifyOptions gsm8k{.answer_pattern = "gsm8k"};
  EXPECT_EQ(extract_answer("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", gsm8k), "7");
  EXPECT_EQ(extract_answer("#### 1,234\nextra", gsm8k), "1,234");
  EXPECT_EQ(extract_answer("It costs $12.50 in all, then 3 more: 15.5", gsm8k), "15.5");
  EXPECT_EQ(extract_answer("no digits", gsm8k), std::nullopt);
  EXPECT_TRUE(grade_completion("so the total is 1234.", "1,234", gsm8k).correct);
  EXPECT_FALSE(grade_completion("so the total is 1235.", "1,234", gsm8k).correct);
  // The reasoning does not count: only what follows </think>.
  EXPECT_FALSE(grade_completion("<think>maybe 7</think> I am not sure", "7", gsm8k).correct);
}

TEST(DistillEval, MathAnswersAreNormalisedBeforeComparing) {
  const std::pair<const char*, const char*> same[] = {
      {"\\frac{1}{2}", "\\dfrac12"},
      {"\\frac{1}{2}", "0.5"},
      {"\\tfrac{3}{4}", "3/4"},
      {"\\left( 1, 2 \\right)", "(1,2)"},
      {"90^\\circ", "90"},
      {"10\\%", "10"},
      {"\\$5.00", "5"},
      {"10 \\text{ cm}", "10"},
      {"12 inches", "12"},
      {"x = 5", "5"},
      {"\\sqrt2", "\\sqrt{2}"},
      {"2\\sqrt{3}", "2 \\sqrt 3"},
      {".5", "0.5"},
      {"\\text{(B)}", "(B)"},
      {"1,\\!000", "1000"},
  };
  for (const auto& [a, b] : same) EXPECT_TRUE(answers_match(a, b, 1e-6)) << a << " vs " << b;
  const std::pair<const char*, const char*> different[] = {
      {"\\frac{1}{3}", "0.5"}, {"\\sqrt{3}", "\\sqrt{2}"}, {"(1,2)", "(2,1)"}, {"2x", "2"}, {"5", "-5"},
  };
  for (const auto& [a, b] : different) EXPECT_FALSE(answers_match(a, b, 1e-6)) << a << " vs " << b;
  const VerifyOptions boxed;
  const Grade g = grade_completion("<think>\\boxed{3}</think> so \\boxed{\\dfrac{1}{2}}.", "\\frac12", boxed);
  EXPECT_EQ(g.answer, "\\dfrac{1}{2}");
  EXPECT_TRUE(g.correct);
  const VerifyOptions exact{.answer_pattern = "exact"};
  EXPECT_TRUE(grade_completion("  Paris \n", "Paris", exact).correct);
  EXPECT_FALSE(grade_completion("0.5", "\\frac12", exact).correct) << "exact means exact";
}

void write_lines(const fs::path& file, const std::vector<std::string>& lines) {
  std::ofstream out(file);
  for (const auto& l : lines) out << l << "\n";
}

TEST(DistillEval, ProblemSetsOfEachFormat) {
  TempDir dir;
  write_lines(dir / "gsm8k.jsonl", {R"({"question": "2 apples and 3 more?", "answer": "2+3=5\n#### 5"})", "",
                                    R"({"question": "Q2", "answer": "#### 1,000", "id": 7})"});
  const ProblemSet g = read_problem_set(dir / "gsm8k.jsonl", "auto", "Question: {problem}\nAnswer:");
  EXPECT_EQ(g.format, "gsm8k");
  ASSERT_EQ(g.problems.size(), 2u);
  EXPECT_EQ(g.problems[0].id, "1");
  EXPECT_EQ(g.problems[0].prompt, "Question: 2 apples and 3 more?\nAnswer:");
  EXPECT_EQ(g.problems[0].answer, "5");
  EXPECT_EQ(g.problems[1].id, "7");
  EXPECT_EQ(g.problems[1].answer, "1,000");
  EXPECT_EQ(default_answer_pattern(g.format), "gsm8k");

  write_lines(dir / "math.jsonl", {R"({"problem": "Half?", "solution": "It is $\\boxed{\\frac{1}{2}}$."})",
                                   R"({"problem": "Two", "answer": "2"})"});
  const ProblemSet m = read_problem_set(dir / "math.jsonl", "auto");
  EXPECT_EQ(m.format, "math");
  EXPECT_EQ(m.problems[0].answer, "\\frac{1}{2}");
  EXPECT_EQ(m.problems[0].prompt, "Half?");
  EXPECT_EQ(m.problems[1].answer, "2");

  write_lines(dir / "mixed.jsonl", {R"({"problem": "a", "answer": "1"})", R"({"prompt": "b", "answer": "2"})"});
  EXPECT_BRIGADE_ERROR(read_problem_set(dir / "mixed.jsonl", "auto"), "mixed.jsonl:2: a prompt problem in a math");
  write_lines(dir / "bad.jsonl", {R"({"question": "a", "answer": "#### 1"})", "{not json"});
  EXPECT_BRIGADE_ERROR(read_problem_set(dir / "bad.jsonl", "auto"), "bad.jsonl:2: not valid JSON");
  write_lines(dir / "noref.jsonl", {R"({"problem": "a", "solution": "no box here"})"});
  EXPECT_BRIGADE_ERROR(read_problem_set(dir / "noref.jsonl", "math"), "noref.jsonl:1: the solution has no \\boxed{}");
  write_lines(dir / "dup.jsonl", {R"({"prompt": "a", "answer": "1", "id": "x"})", R"({"prompt": "b", "answer": "2", "id": "x"})"});
  EXPECT_BRIGADE_ERROR(read_problem_set(dir / "dup.jsonl", "auto"), "dup.jsonl:2: id \"x\" is empty or repeated");
  write_lines(dir / "empty.jsonl", {""});
  EXPECT_BRIGADE_ERROR(read_problem_set(dir / "empty.jsonl", "auto"), "has no problems");
  EXPECT_BRIGADE_ERROR(read_problem_set(dir / "math.jsonl", "auto", "no placeholder"), "has no {problem}");
  EXPECT_BRIGADE_ERROR(read_problem_set(dir / "missing.jsonl", "auto"), "cannot read the problem set");
}

TEST(DistillEval, ScoresATraceStoreWithTheUnbiasedEstimator) {
  TempDir dir;
  std::vector<Prompt> problems = {{.id = "a", .prompt = "A?", .answer = "4"},
                                  {.id = "b", .prompt = "B?", .answer = "\\frac{1}{2}"},
                                  {.id = "c", .prompt = "C?", .answer = "9"}};
  {
    TraceWriter store(dir / "traces", 0);
    auto add = [&](const std::string& id, int64_t s, const std::string& text, const std::string& finish = "stop") {
      Trace t;
      t.prompt_id = id;
      t.sample = s;
      t.text = text;
      t.finish_reason = finish;
      if (finish == "error") t.error = "server down";
      store.append(t);
    };
    // a: 3 of 4 right; b: 1 of 4 (0.5 as a fraction); c: none (one cut off, one failed, one missing)
    add("a", 0, "\\boxed{4}");
    add("a", 1, "\\boxed{4.0}");
    add("a", 2, "\\boxed{5}");
    add("a", 3, "<think>\\boxed{5}</think>\\boxed{4}");
    add("b", 0, "\\boxed{0.5}");
    for (int64_t s = 1; s < 4; ++s) add("b", s, "no answer");
    add("c", 0, "\\boxed{9", "length");
    add("c", 1, "", "error");
    add("c", 2, "\\boxed{8}");
    store.flush();
  }
  const auto score = score_trace_store(dir / "traces", problems, 4, {4, 1, 2}, VerifyOptions{}, dir / "samples.jsonl");
  EXPECT_EQ(score.correct, (std::vector<int64_t>{3, 1, 0}));
  ASSERT_EQ(score.pass.size(), 3u);
  EXPECT_EQ(score.pass[0].first, 1);
  EXPECT_NEAR(score.pass[0].second, (0.75 + 0.25 + 0) / 3, 1e-12);
  EXPECT_NEAR(score.pass[1].second, (1.0 + 0.5 + 0) / 3, 1e-12);  // pass@2: 1 - C(3,2)/C(4,2) = 0.5 for b
  EXPECT_NEAR(score.pass[2].second, 2.0 / 3, 1e-12);
  EXPECT_EQ(score.failed, 2);     // c/1 failed, c/3 missing
  EXPECT_EQ(score.truncated, 1);
  EXPECT_EQ(score.no_answer, 4);  // b/1..3 and the cut-off c/0
  std::istringstream in(read_file(dir / "samples.jsonl"));
  int lines = 0, correct = 0;
  for (std::string line; std::getline(in, line); ++lines) correct += nlohmann::json::parse(line)["correct"].get<bool>();
  EXPECT_EQ(lines, 12);
  EXPECT_EQ(correct, 4);
  EXPECT_NE(score.markdown("m").find("| m | 3 | 4 | 33.3% | 50.0% | 66.7% |"), std::string::npos) << score.markdown("m");
  EXPECT_BRIGADE_ERROR(score_trace_store(dir / "traces", problems, 4, {5}, VerifyOptions{}), "pass@5 needs 1 <= k <= 4");
}

}  // namespace
}  // namespace brigade::distill
