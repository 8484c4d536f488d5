#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "core/fs.h"
#include "data/arith.h"
#include "distill/verify.h"
#include "tests/testing.h"

namespace brigade::distill {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

Trace sample(const std::string& id, int64_t index, const std::string& text, const std::string& finish = "stop") {
  Trace t;
  t.prompt_id = id;
  t.sample = index;
  t.text = text;
  t.finish_reason = finish;
  t.prompt_tokens = 4;
  t.completion_tokens = static_cast<int64_t>(text.size());
  return t;
}

Prompt prompt(const std::string& id, std::optional<std::string> answer) {
  return Prompt{id, "Problem: " + id + "\n", std::move(answer)};
}

TEST(DistillVerify, ExtractBoxedTakesTheLastBalancedOne) {
  VerifyOptions boxed;
  EXPECT_EQ(extract_answer("so \\boxed{12} or \\boxed{ 13 }", boxed), "13");
  EXPECT_EQ(extract_answer("\\boxed{\\frac{1}{2}}", boxed), "\\frac{1}{2}");
  EXPECT_EQ(extract_answer("\\boxed{{a}{b{c}}}", boxed), "{a}{b{c}}");
  // A cut-off last \boxed falls back to the one before it.
  EXPECT_EQ(extract_answer("\\boxed{7} then \\boxed{8", boxed), "7");
  EXPECT_EQ(extract_answer("no answer here", boxed), std::nullopt);
  EXPECT_EQ(extract_answer("\\boxed{  }", boxed), std::nullopt) << "an empty answer is no answer";
  EXPECT_EQ(extract_answer("\\boxed{", boxed), std::nullopt);
}

TEST(DistillVerify, ExtractWithARegexUsesTheFirstGroupOfTheLastMatch) {
  VerifyOptions regex;
  regex.answer_pattern = R"(Answer:\s*(-?\d+))";
  EXPECT_EQ(extract_answer("Answer: 3\nAnswer:  -41 done", regex), "-41");
  EXPECT_EQ(extract_answer("no match", regex), std::nullopt);
  VerifyOptions no_group;
  no_group.answer_pattern = R"(Answer: \d+)";
  EXPECT_BRIGADE_ERROR(validate(no_group), "capture group");
  VerifyOptions broken;
  broken.answer_pattern = "(unclosed";
  EXPECT_BRIGADE_ERROR(Verifier{broken}, "not a valid regex");
  VerifyOptions negative;
  negative.max_chars = -1;
  EXPECT_BRIGADE_ERROR(validate(negative), "max_chars");
}

TEST(DistillVerify, AnswersMatchExactlyOrNumerically) {
  const double tol = 1e-6;
  EXPECT_TRUE(answers_match("1,086", "1086", tol));
  EXPECT_TRUE(answers_match("1086.0", "1086", tol));
  EXPECT_TRUE(answers_match("1086", "1,086", tol));
  EXPECT_TRUE(answers_match("1086.", "1086", tol)) << "a trailing period";
  EXPECT_TRUE(answers_match(" +1086 ", "1086", tol));
  EXPECT_TRUE(answers_match("1,234,567", "1234567", tol));
  EXPECT_TRUE(answers_match("-0.5", "-1/2", tol));
  EXPECT_TRUE(answers_match("3/4", "0.75", tol));
  EXPECT_TRUE(answers_match("\\frac{3}{4}", "0.75", tol));
  EXPECT_TRUE(answers_match("-\\dfrac{6}{8}", "-3/4", tol));
  EXPECT_TRUE(answers_match("0.3333333", "1/3", tol));
  EXPECT_TRUE(answers_match("x  +\n y", "x + y", tol)) << "whitespace collapsed";
  EXPECT_TRUE(answers_match("1000000.5", "1000000", 1e-6)) << "relative tolerance";

  EXPECT_FALSE(answers_match("1087", "1086", tol));
  EXPECT_FALSE(answers_match("1,08,6", "1086", tol)) << "misplaced separators are not a number";
  EXPECT_FALSE(answers_match("0.33", "1/3", tol));
  EXPECT_TRUE(answers_match("1/0", "1/0 ", tol)) << "equal text matches even if it is not a number";
  EXPECT_FALSE(answers_match("1/0", "0", tol));
  EXPECT_FALSE(answers_match("abc", "1086", tol));
  EXPECT_FALSE(answers_match("", "0", tol));
  EXPECT_FALSE(answers_match("1e3", "1000", tol)) << "no exponents";
  EXPECT_FALSE(answers_match("1000002", "1000000", 1e-6));
}

TEST(DistillVerify, CheckReasons) {
  Verifier verifier{VerifyOptions{}};
  const Prompt p = prompt("p", "1086");
  auto reason = [&](const Trace& t) { return verifier.check(t, p).reason; };

  EXPECT_EQ(reason(sample("p", 0, "<think>\n47*23 = 1081\n</think>\n\\boxed{1,086}")), "accepted");
  EXPECT_EQ(reason(sample("p", 1, "<think>x</think>\\boxed{1085}")), "wrong_answer");
  EXPECT_EQ(reason(sample("p", 2, "\\boxed{1086}")), "no_think");
  EXPECT_EQ(reason(sample("p", 3, "<think> still going \\boxed{1086}")), "unclosed_think");
  EXPECT_EQ(reason(sample("p", 4, "</think> \\boxed{1086} <think>")), "unclosed_think")
      << "</think> must come after <think>";
  EXPECT_EQ(reason(sample("p", 5, "<think>\\boxed{1086}</think> so the answer is 1086")), "no_answer")
      << "a \\boxed inside the think block does not count";
  EXPECT_EQ(reason(sample("p", 6, "<think>x</think>\\boxed{1086}", "length")), "truncated");
  EXPECT_EQ(reason(sample("p", 7, "", "error")), "error");
  // The same text again (modulo whitespace) is a duplicate; another prompt's is not.
  EXPECT_EQ(reason(sample("p", 8, "<think>\n47*23 = 1081\n</think>\n\\boxed{1,086}")), "duplicate");
  EXPECT_EQ(reason(sample("p", 9, "<think> 47*23 = 1081 </think> \\boxed{1,086} ")), "duplicate");
  EXPECT_EQ(reason(sample("p", 10, "<think>\n47*23 = 1081!\n</think>\n\\boxed{1086.0}")), "accepted");
  const Prompt q = prompt("q", "1086");
  EXPECT_EQ(verifier.check(sample("q", 0, "<think>\n47*23 = 1081\n</think>\n\\boxed{1,086}"), q).reason,
            "accepted");

  Verdict wrong = verifier.check(sample("q", 1, "<think>x</think>\\boxed{ 7 }"), q);
  EXPECT_FALSE(wrong.accepted);
  EXPECT_EQ(wrong.answer, "7");
  EXPECT_BRIGADE_ERROR(verifier.check(sample("q", 2, "x"), p), "was given prompt");

  const nlohmann::json stats = verifier.statistics();
  EXPECT_EQ(stats["total"], 13);
  EXPECT_EQ(stats["accepted"], 3);
  EXPECT_EQ(stats["reasons"]["accepted"], 3);
  EXPECT_EQ(stats["reasons"]["wrong_answer"], 2);
  EXPECT_EQ(stats["reasons"]["no_think"], 1);
  EXPECT_EQ(stats["reasons"]["unclosed_think"], 2);
  EXPECT_EQ(stats["reasons"]["no_answer"], 1);
  EXPECT_EQ(stats["reasons"]["truncated"], 1);
  EXPECT_EQ(stats["reasons"]["error"], 1);
  EXPECT_EQ(stats["reasons"]["duplicate"], 2);
  EXPECT_EQ(stats["reasons"]["too_long"], 0);
  EXPECT_EQ(stats["prompts"], 2);
  EXPECT_EQ(stats["prompts_with_accepted"], 2);
  EXPECT_DOUBLE_EQ(stats["acceptance_rate"].get<double>(), 3.0 / 13.0);
  EXPECT_EQ(stats["verified_by_format_only"]["samples"], 0);
}

TEST(DistillVerify, LengthLimitsAndOptionalThink) {
  VerifyOptions options;
  options.max_chars = 40;
  options.max_tokens = 10;
  Verifier verifier(options);
  const Prompt p = prompt("p", "5");
  Trace long_text = sample("p", 0, "<think>" + std::string(40, 'x') + "</think>\\boxed{5}");
  EXPECT_EQ(verifier.check(long_text, p).reason, "too_long");
  Trace many_tokens = sample("p", 1, "<think>y</think>\\boxed{5}");
  many_tokens.completion_tokens = 11;
  EXPECT_EQ(verifier.check(many_tokens, p).reason, "too_long");
  many_tokens.sample = 2;
  many_tokens.completion_tokens = 10;
  EXPECT_EQ(verifier.check(many_tokens, p).reason, "accepted");

  VerifyOptions relaxed;
  relaxed.require_think = false;
  Verifier loose(relaxed);
  EXPECT_EQ(loose.check(sample("p", 0, "just \\boxed{5}"), p).reason, "accepted");
  EXPECT_EQ(loose.check(sample("p", 1, "<think>\\boxed{5} unclosed"), p).reason, "accepted");

  // A chat template that opens the think block in the prompt.
  Verifier strict{VerifyOptions{}};
  Prompt opened{"r", "<|user|>1+4<|assistant|><think>\n", std::string("5")};
  EXPECT_EQ(strict.check(sample("r", 0, "1+4 = 5\n</think>\n\\boxed{5}"), opened).reason, "accepted");
}

TEST(DistillVerify, NoReferenceAnswerIsVerifiedByFormatOnlyAndCounted) {
  Verifier verifier{VerifyOptions{}};
  const Prompt open = prompt("open", std::nullopt);
  const Prompt ref = prompt("ref", "2");
  EXPECT_TRUE(verifier.check(sample("open", 0, "<think>?</think>\\boxed{anything}"), open).accepted);
  EXPECT_EQ(verifier.check(sample("open", 1, "<think>?</think> no box"), open).reason, "no_answer");
  EXPECT_TRUE(verifier.check(sample("ref", 0, "<think>1+1</think>\\boxed{2}"), ref).accepted);
  const nlohmann::json stats = verifier.statistics();
  EXPECT_EQ(stats["verified_by_format_only"]["samples"], 2);
  EXPECT_EQ(stats["verified_by_format_only"]["accepted_samples"], 1);
  EXPECT_EQ(stats["verified_by_format_only"]["prompts"], 1);
  EXPECT_NE(stats["verified_by_format_only"]["note"].get<std::string>().find("format alone"), std::string::npos);
  EXPECT_EQ(stats["accepted"], 2);
}

TEST(DistillVerify, ArithmeticDocumentsFromTheBuiltInCorpusAreAccepted) {
  // The teacher is trained on these documents: their completions must pass.
  data::ArithmeticOptions arith;
  Verifier verifier{VerifyOptions{}};
  for (uint64_t i = 0; i < 50; ++i) {
    const data::ArithmeticProblem problem = data::make_arithmetic_problem(arith, i);
    const Prompt p{std::to_string(i), problem.prompt, problem.answer};
    const std::string completion = problem.text().substr(problem.prompt.size());
    const Verdict verdict = verifier.check(sample(p.id, 0, completion), p);
    EXPECT_TRUE(verdict.accepted) << verdict.reason << " for " << problem.text();
  }
}

std::vector<nlohmann::json> read_jsonl(const fs::path& path) {
  std::vector<nlohmann::json> out;
  std::istringstream in(read_file(path));
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

TEST(DistillVerify, RunVerifyEndToEnd) {
  TempDir dir;
  const fs::path store = dir / "traces";
  const int64_t k = 2;
  auto with_topk = [&](Trace t, int64_t positions) {
    t.topk_ids = torch::arange(positions * k, torch::kInt32).reshape({positions, k});
    t.topk_logprobs = torch::full({positions, k}, -0.5f);
    return t;
  };
  {
    TraceWriter writer(store, k);
    writer.append(with_topk(sample("1", 0, "<think>a</think>\\boxed{3}"), 3));  // accepted, records [0, 3)
    writer.append(with_topk(sample("1", 1, "<think>b</think>\\boxed{4}"), 2));  // wrong
    writer.append(sample("2", 0, "", "error"));                                  // error, then retried:
    writer.append(with_topk(sample("2", 0, "<think>c</think>\\boxed{x+1}"), 4)); // accepted, records [5, 9)
    writer.append(sample("3", 0, "<think>d</think>\\boxed{9}", "length"));       // truncated
    writer.append(sample("ghost", 0, "<think>e</think>\\boxed{1}"));             // unknown prompt
    writer.append(sample("1", 2, "<think>a</think>\\boxed{3}"));                 // duplicate
  }
  const std::vector<Prompt> prompts = {prompt("1", "3"), prompt("2", std::nullopt), prompt("3", "9")};
  const fs::path out = dir / "verify";
  const nlohmann::json returned = run_verify(store, prompts, VerifyOptions{}, out);

  ASSERT_TRUE(fs::exists(out / "accepted.jsonl"));
  ASSERT_TRUE(fs::exists(out / "stats.json"));
  EXPECT_FALSE(fs::exists(out / "accepted.jsonl.tmp"));
  const std::vector<nlohmann::json> accepted = read_jsonl(out / "accepted.jsonl");
  ASSERT_EQ(accepted.size(), 2u);
  EXPECT_EQ(accepted[0]["prompt_id"], "1");
  EXPECT_EQ(accepted[0]["sample"], 0);
  EXPECT_EQ(accepted[0]["prompt"], "Problem: 1\n");
  EXPECT_EQ(accepted[0]["completion"], "<think>a</think>\\boxed{3}");
  EXPECT_EQ(accepted[0]["answer"], "3");
  EXPECT_EQ(accepted[0]["topk"], (nlohmann::json{{"offset", 0}, {"positions", 3}}));
  EXPECT_EQ(accepted[1]["prompt_id"], "2");
  EXPECT_EQ(accepted[1]["answer"], "x+1");
  EXPECT_EQ(accepted[1]["topk"], (nlohmann::json{{"offset", 5}, {"positions", 4}}));

  // The records the line points at are the sample's.
  TopkSidecar sidecar(store / kTopkFile);
  auto [ids, logprobs] = sidecar.read({5, 4});
  EXPECT_TRUE(torch::equal(ids, torch::arange(8, torch::kInt32).reshape({4, k})));

  const nlohmann::json stats = nlohmann::json::parse(read_file(out / "stats.json"));
  EXPECT_EQ(stats, returned);
  EXPECT_EQ(stats["total"], 6) << "the failed first try of 2/0 was superseded by its retry";
  EXPECT_EQ(stats["accepted"], 2);
  EXPECT_EQ(stats["reasons"]["wrong_answer"], 1);
  EXPECT_EQ(stats["reasons"]["truncated"], 1);
  EXPECT_EQ(stats["reasons"]["unknown_prompt"], 1);
  EXPECT_EQ(stats["reasons"]["duplicate"], 1);
  EXPECT_EQ(stats["reasons"]["error"], 0);
  EXPECT_EQ(stats["prompts_with_accepted"], 2);
  EXPECT_EQ(stats["verified_by_format_only"]["samples"], 1);
  EXPECT_EQ(stats["verified_by_format_only"]["prompts"], 1);
  EXPECT_EQ(stats["topk_k"], k);
  EXPECT_EQ(stats["trace_store"], store.string());
  EXPECT_EQ(stats["options"]["answer_pattern"], "boxed");

  // Running again gives the same files (no duplicates from a previous run).
  run_verify(store, prompts, VerifyOptions{}, out);
  EXPECT_EQ(read_jsonl(out / "accepted.jsonl").size(), 2u);
  EXPECT_BRIGADE_ERROR(run_verify(dir / "none", prompts, VerifyOptions{}, out), "no trace store");
}

}  // namespace
}  // namespace brigade::distill
