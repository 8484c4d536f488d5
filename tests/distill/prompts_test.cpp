#include <gtest/gtest.h>

#include <fstream>

#include "core/fs.h"
#include "distill/prompts.h"
#include "tests/testing.h"

namespace brigade::distill {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

fs::path write_text(const TempDir& dir, const std::string& name, const std::string& content) {
  fs::path path = dir / name;
  std::ofstream(path, std::ios::binary) << content;
  return path;
}

TEST(DistillPrompts, ReadsValidLinesWithStringAndIntegerIds) {
  TempDir dir;
  fs::path path = write_text(dir, "p.jsonl",
                             "{\"id\": \"a\", \"prompt\": \"Problem: 1+2\\n\", \"answer\": \"3\"}\n"
                             "{\"id\": 7, \"prompt\": \"Problem: 2*3\\n\", \"extra\": [1, 2]}\n"
                             "{\"id\": -2, \"prompt\": \"x\", \"answer\": null}\r\n");
  PromptSet set = read_prompts(path);
  ASSERT_EQ(set.prompts.size(), 3u);
  EXPECT_TRUE(set.skipped.empty());
  EXPECT_EQ(set.prompts[0].id, "a");
  EXPECT_EQ(set.prompts[0].prompt, "Problem: 1+2\n");
  ASSERT_TRUE(set.prompts[0].answer.has_value());
  EXPECT_EQ(*set.prompts[0].answer, "3");
  EXPECT_EQ(set.prompts[1].id, "7");
  EXPECT_FALSE(set.prompts[1].answer.has_value());
  EXPECT_EQ(set.prompts[2].id, "-2");
  EXPECT_FALSE(set.prompts[2].answer.has_value());
  EXPECT_EQ(set.describe_skipped(path), "");
}

TEST(DistillPrompts, MalformedLinesAreSkippedWithLineNumbersAndReasons) {
  TempDir dir;
  const std::string huge(3 << 20, 'x');  // a 3 MiB prompt on one line is fine
  fs::path path = write_text(
      dir, "p.jsonl",
      "{\"id\": \"ok1\", \"prompt\": \"one\"}\n"           // 1
      "\n"                                                 // 2 blank: ignored silently
      "   \t\n"                                            // 3 blank
      "{\"id\": \"bad\", \"prompt\": \"unterminated}\n"    // 4 not JSON
      "[1, 2, 3]\n"                                        // 5 not an object
      "{\"prompt\": \"no id\"}\n"                          // 6
      "{\"id\": 1.5, \"prompt\": \"float id\"}\n"          // 7
      "{\"id\": \"x\"}\n"                                  // 8 no prompt
      "{\"id\": \"y\", \"prompt\": 42}\n"                  // 9 prompt not a string
      "{\"id\": \"z\", \"prompt\": \"p\", \"answer\": 3}\n"  // 10 answer not a string
      "{\"id\": \"ok1\", \"prompt\": \"again\"}\n"         // 11 duplicate id
      "{\"id\": \"\", \"prompt\": \"p\"}\n"                // 12 empty id
      "{\"id\": \"big\", \"prompt\": \"" + huge + "\"}\n"  // 13 huge
      "{\"id\": \"utf\", \"prompt\": \"\xff\xfe\"}\n"      // 14 invalid UTF-8: not JSON
      "{\"id\": \"last\", \"prompt\": \"no newline\"}");   // 15
  PromptSet set = read_prompts(path);

  ASSERT_EQ(set.prompts.size(), 3u);
  EXPECT_EQ(set.prompts[0].id, "ok1");
  EXPECT_EQ(set.prompts[0].prompt, "one") << "the first definition of a duplicated id wins";
  EXPECT_EQ(set.prompts[1].id, "big");
  EXPECT_EQ(set.prompts[1].prompt.size(), huge.size());
  EXPECT_EQ(set.prompts[2].id, "last");

  std::vector<int64_t> lines;
  for (const auto& [line, reason] : set.skipped) lines.push_back(line);
  EXPECT_EQ(lines, (std::vector<int64_t>{4, 5, 6, 7, 8, 9, 10, 11, 12, 14}));
  EXPECT_EQ(set.skipped[0].second, "not valid JSON");
  EXPECT_EQ(set.skipped[1].second, "not a JSON object");
  EXPECT_EQ(set.skipped[2].second, "no \"id\"");
  EXPECT_EQ(set.skipped[3].second, "\"id\" is not a string or integer");
  EXPECT_EQ(set.skipped[4].second, "no \"prompt\" string (or \"messages\" list)");
  EXPECT_EQ(set.skipped[5].second, "no \"prompt\" string (or \"messages\" list)");
  EXPECT_EQ(set.skipped[6].second, "\"answer\" is not a string");
  EXPECT_EQ(set.skipped[7].second, "duplicate id \"ok1\", first on line 1");
  EXPECT_EQ(set.skipped[8].second, "empty \"id\"");
  EXPECT_EQ(set.skipped[9].second, "not valid JSON");

  const std::string summary = set.describe_skipped(path);
  EXPECT_EQ(summary.rfind("skipped 10 malformed lines in " + path.string() +
                              ": 4 (not valid JSON), 5 (not a JSON object), 6 (no \"id\"),", 0),
            0u)
      << summary;
  EXPECT_NE(summary.find("14 (not valid JSON)"), std::string::npos) << summary;
  EXPECT_EQ(summary.find("more"), std::string::npos) << "10 lines are all listed: " << summary;
}

TEST(DistillPrompts, DescribeSkippedListsAtMostTenLines) {
  PromptSet set;
  for (int64_t line = 1; line <= 13; ++line) set.skipped.emplace_back(line, "not valid JSON");
  const std::string summary = set.describe_skipped("f.jsonl");
  EXPECT_EQ(summary.rfind("skipped 13 malformed lines in f.jsonl: 1 (not valid JSON), ", 0), 0u) << summary;
  EXPECT_NE(summary.find("10 (not valid JSON), ... and 3 more"), std::string::npos) << summary;
  EXPECT_EQ(summary.find("11 ("), std::string::npos) << summary;

  PromptSet one;
  one.skipped.emplace_back(2, "no \"prompt\" string");
  EXPECT_EQ(one.describe_skipped("f.jsonl"), "skipped 1 malformed line in f.jsonl: 2 (no \"prompt\" string)");
}

TEST(DistillPrompts, MissingFileIsAnErrorNamingIt) {
  TempDir dir;
  EXPECT_BRIGADE_ERROR(read_prompts(dir / "nope.jsonl"), "nope.jsonl");
  EXPECT_BRIGADE_ERROR(read_prompts(dir.path()), "prompts file not found");
}

TEST(DistillPrompts, WriteThenReadRoundTrips) {
  TempDir dir;
  std::vector<Prompt> prompts = {
      {.id = "0", .prompt = "Problem: 47*23+5\n", .answer = std::string("1086")},
      {.id = "q\"uote", .prompt = "line one\nline two\t\\boxed{}"},
  };
  fs::path path = dir / "prompts.jsonl";
  write_prompts(path, prompts);
  EXPECT_FALSE(fs::exists(dir / "prompts.jsonl.tmp"));
  PromptSet set = read_prompts(path);
  ASSERT_EQ(set.prompts.size(), 2u);
  EXPECT_TRUE(set.skipped.empty());
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(set.prompts[i].id, prompts[i].id);
    EXPECT_EQ(set.prompts[i].prompt, prompts[i].prompt);
    EXPECT_EQ(set.prompts[i].answer, prompts[i].answer);
  }
  // Exactly one line per prompt.
  const std::string content = read_file(path);
  EXPECT_EQ(std::count(content.begin(), content.end(), '\n'), 2);
}

}  // namespace
}  // namespace brigade::distill
