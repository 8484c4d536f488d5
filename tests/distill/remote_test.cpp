// The remote teacher's requests and reply parsing (the HTTP side is tested in
// tests/e2e/remote_teacher_test.cpp).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "data/tokenizer.h"
#include "distill/remote.h"
#include "recipes/recipe.h"
#include "tests/testing.h"

namespace brigade::distill {
namespace {

struct Fixture {
  data::ByteTokenizer tokenizer;
  TeacherOptions teacher;
  GenerateOptions options;
  Fixture() {
    teacher.url = "http://127.0.0.1:1/v1";
    teacher.model = "m";
  }
  Trace parse(const nlohmann::json& reply, bool& dropped) {
    return parse_remote_reply(teacher, options, tokenizer, reply.dump(), dropped);
  }
};

TEST(RemoteTeacher, RequestsCarryTheSamplingOptionsAndA31BitSeed) {
  Fixture f;
  f.options.max_new_tokens = 77;
  f.options.temperature = 0.5;
  f.options.top_p = 0.9;
  f.options.logprobs = 3;
  f.options.stop = {"</answer>"};
  const Prompt prompt{"p1", "Problem: 1+2\n", "3"};
  auto completions = remote_request(f.teacher, f.options, prompt, 0xffffffffffULL);
  EXPECT_EQ(completions["prompt"], "Problem: 1+2\n");
  EXPECT_EQ(completions["max_tokens"], 77);
  EXPECT_EQ(completions["temperature"], 0.5);
  EXPECT_EQ(completions["top_p"], 0.9);
  EXPECT_EQ(completions["logprobs"], 3);
  EXPECT_EQ(completions["model"], "m");
  EXPECT_EQ(completions["stop"], nlohmann::json::array({"</answer>"}));
  EXPECT_EQ(completions["seed"].get<int64_t>(), 0x7fffffff);
  EXPECT_FALSE(completions.contains("messages"));
  f.teacher.api = "chat";
  auto chat = remote_request(f.teacher, f.options, prompt, 5);
  EXPECT_EQ(chat["messages"][0]["role"], "user");
  EXPECT_EQ(chat["messages"][0]["content"], "Problem: 1+2\n");
  EXPECT_EQ(chat["logprobs"], true);
  EXPECT_EQ(chat["top_logprobs"], 3);
  EXPECT_FALSE(chat.contains("prompt"));
}

TEST(RemoteTeacher, CompletionsTopLogprobsBecomeSortedStudentIds) {
  Fixture f;
  f.options.logprobs = 2;
  nlohmann::json reply = {
      {"choices", {{{"text", "ab"}, {"finish_reason", "length"},
                    {"logprobs", {{"tokens", {"a", "b"}},
                                  {"top_logprobs", {{{"x", -2.0}, {"a", -0.1}, {"zz", -0.5}}, {{"b", -0.2}, {"<|eos|>", -1.5}}}}}}}}},
      {"usage", {{"prompt_tokens", 5}, {"completion_tokens", 2}}}};
  bool dropped = true;
  Trace t = f.parse(reply, dropped);
  EXPECT_FALSE(dropped);
  EXPECT_EQ(t.text, "ab");
  EXPECT_EQ(t.finish_reason, "length");
  EXPECT_EQ(t.prompt_tokens, 5);
  EXPECT_EQ(t.completion_tokens, 2);
  ASSERT_TRUE(t.topk_ids.defined());
  // "zz" is two byte tokens: not a candidate. The rest, most likely first.
  EXPECT_EQ(t.topk_ids[0][0].item<int>(), 'a');
  EXPECT_EQ(t.topk_ids[0][1].item<int>(), 'x');
  EXPECT_EQ(t.topk_ids[1][0].item<int>(), 'b');
  EXPECT_EQ(t.topk_ids[1][1].item<int64_t>(), f.tokenizer.eos_id());
  EXPECT_FLOAT_EQ(t.topk_logprobs[1][1].item<float>(), -1.5f);

  // Too few mappable candidates at a position: stored without top-k.
  reply["choices"][0]["logprobs"]["top_logprobs"][1] = {{"b", -0.2}, {"bcd", -1.0}};
  t = f.parse(reply, dropped);
  EXPECT_TRUE(dropped);
  EXPECT_FALSE(t.topk_ids.defined());
  EXPECT_EQ(t.text, "ab");
}

TEST(RemoteTeacher, ChatRepliesUseTheCandidatesBytes) {
  Fixture f;
  f.teacher.api = "chat";
  f.options.logprobs = 1;
  // "\xc3" alone is not UTF-8: the server sends its bytes.
  nlohmann::json top = {{{"token", "?"}, {"logprob", -0.3}, {"bytes", {0xc3}}}};
  nlohmann::json reply = {{"choices", {{{"message", {{"role", "assistant"}, {"content", "hi"}}},
                                        {"finish_reason", "stop"},
                                        {"logprobs", {{"content", {{{"token", "h"}, {"logprob", -0.3}, {"top_logprobs", top}}}}}}}}}};
  bool dropped = true;
  Trace t = f.parse(reply, dropped);
  EXPECT_FALSE(dropped);
  EXPECT_EQ(t.text, "hi");
  EXPECT_EQ(t.finish_reason, "stop");
  EXPECT_EQ(t.topk_ids[0][0].item<int>(), 0xc3);
  EXPECT_EQ(t.completion_tokens, 1);  // no usage: the positions with logprobs
}

TEST(RemoteTeacher, ScoringEchoesTheStudentsIdsAndReadsThePromptLogprobs) {
  Fixture f;
  f.teacher.extra_body = R"({"echo": false, "repeat_penalty": 1.0})";
  // [BOS] "Q" | completion "a", "\xc3" | EOS: entries 2..4 are the records.
  const std::vector<int64_t> ids = {f.tokenizer.bos_id(), 'Q', 'a', 0xc3, f.tokenizer.eos_id()};
  const auto request = scoring_request(f.teacher, ids, 2);
  EXPECT_EQ(request["prompt"], nlohmann::json(ids));
  EXPECT_EQ(request["echo"], true);  // extra_body cannot turn off what scoring needs
  EXPECT_EQ(request["repeat_penalty"], 1.0);
  EXPECT_EQ(request["logprobs"], 2);
  EXPECT_EQ(request["max_tokens"], 1);
  EXPECT_EQ(request["model"], "m");

  nlohmann::json tokens = {"<|bos|>", "Q", "a", "bytes:\\xc3", "<|eos|>", "x"};
  nlohmann::json top = {nullptr,
                        {{"Q", -0.1}},
                        {{"b", -1.0}, {"a", -0.5}, {"bytes:\\xc4", -2.0}},  // three: the top two are kept
                        {{"bytes:\\xc3", -0.2}, {"<|eos|>", -3.0}},
                        {{"<|eos|>", -0.01}, {"\n", -5.0}},
                        {{"x", -0.1}, {"y", -0.2}}};  // the new token's: not used
  auto reply = [&] {
    return nlohmann::json{{"choices", {{{"text", "Qa"}, {"logprobs", {{"tokens", tokens}, {"top_logprobs", top}}}}}}}.dump();
  };
  auto records = parse_scoring_reply(f.tokenizer, reply(), ids, 2, 2);
  ASSERT_TRUE(records.has_value());
  const auto& [top_ids, logprobs] = *records;
  ASSERT_EQ(top_ids.size(0), 3);
  EXPECT_EQ(top_ids[0][0].item<int>(), 'a');
  EXPECT_EQ(top_ids[0][1].item<int>(), 'b');
  EXPECT_FLOAT_EQ(logprobs[0][1].item<float>(), -1.0f);
  EXPECT_EQ(top_ids[1][0].item<int>(), 0xc3);  // the escaped byte token
  EXPECT_EQ(top_ids[1][1].item<int64_t>(), f.tokenizer.eos_id());
  EXPECT_EQ(top_ids[2][0].item<int64_t>(), f.tokenizer.eos_id());
  EXPECT_EQ(top_ids[2][1].item<int>(), '\n');

  // A position with fewer than k candidates: no records (counted by the caller).
  top[3] = {{"bytes:\\xc3", -0.2}};
  EXPECT_FALSE(parse_scoring_reply(f.tokenizer, reply(), ids, 2, 2).has_value());
  // A server that does not echo the prompt's logprobs, or echoes other tokens, is unusable.
  tokens = {"x"};
  EXPECT_THROW(parse_scoring_reply(f.tokenizer, reply(), ids, 2, 2), UnusableReply);
  tokens = {"<|bos|>", "Q", "A", "bytes:\\xc3", "<|eos|>", "x"};
  try {
    parse_scoring_reply(f.tokenizer, reply(), ids, 2, 2);
    ADD_FAILURE() << "another vocabulary must stop the stage";
  } catch (const UnusableReply& e) {
    EXPECT_NE(std::string(e.what()).find("prompt token 2 (student id 97, \"a\") came back as \"A\""), std::string::npos)
        << e.what();
  }
  // Not the API's JSON: an Error, retried.
  EXPECT_THROW(parse_scoring_reply(f.tokenizer, "{\"choices\": 3}", ids, 2, 2), Error);
  EXPECT_EQ(token_bytes_from_text("bytes:\\x41\\xff"), "A\xff");
  EXPECT_EQ(token_bytes_from_text("bytes:x"), "bytes:x");  // not an escape: the text itself
}

TEST(RemoteTeacher, StopStringsCutTheText) {
  Fixture f;
  f.options.stop = {"\\boxed", "###"};
  bool dropped = false;
  Trace t = f.parse({{"choices", {{{"text", "<think>x</think>###more\\boxed{1}"}, {"finish_reason", "length"}}}}}, dropped);
  EXPECT_EQ(t.text, "<think>x</think>");
  EXPECT_EQ(t.finish_reason, "stop");
  std::string text = "no stop here";
  EXPECT_FALSE(apply_stop_strings(text, f.options.stop));
  EXPECT_EQ(text, "no stop here");
}

TEST(RemoteTeacher, MalformedRepliesAreErrorsThatSayWhatIsMissing) {
  Fixture f;
  bool dropped = false;
  EXPECT_BRIGADE_ERROR(parse_remote_reply(f.teacher, f.options, f.tokenizer, "<html>", dropped), "not JSON");
  EXPECT_BRIGADE_ERROR(f.parse(nlohmann::json::array(), dropped), "not a JSON object");
  EXPECT_BRIGADE_ERROR(f.parse({{"choices", nlohmann::json::array()}}, dropped), "no \"choices\"");
  EXPECT_BRIGADE_ERROR(f.parse({{"choices", {{{"text", 3}}}}}, dropped), "no string \"text\"");
  EXPECT_BRIGADE_ERROR(f.parse({{"error", {{"message", "overloaded"}}}}, dropped), "overloaded");
  f.teacher.api = "chat";
  EXPECT_BRIGADE_ERROR(f.parse({{"choices", {{{"text", "a"}}}}}, dropped), "no \"message\"");
}

TEST(RemoteTeacher, OptionsAreValidated) {
  DistillOptions o;
  o.teacher.url = "ftp://x";
  EXPECT_BRIGADE_ERROR(o.validate(), "must start with http://");
  o.teacher.url = "http://x/v1";
  o.teacher.api = "responses";
  EXPECT_BRIGADE_ERROR(o.validate(), "distill.teacher.api is 'responses'");
  o.teacher.api = "chat";
  o.teacher.concurrency = 0;
  EXPECT_BRIGADE_ERROR(o.validate(), "distill.teacher.concurrency");
  o.teacher.concurrency = 4;
  o.teacher.checkpoint = "runs/x";
  EXPECT_BRIGADE_ERROR(o.validate(), "not both");
  o.teacher.checkpoint.clear();
  o.validate();
  o.teacher.extra_body = "{\"repeat_penalty\": 1.0";
  EXPECT_BRIGADE_ERROR(o.validate(), "distill.teacher.extra_body is not valid JSON");
  o.teacher.extra_body = "[1, 2]";
  EXPECT_BRIGADE_ERROR(o.validate(), "distill.teacher.extra_body must be a JSON object");
  o.teacher.extra_body = "{\"prompt\": \"x\"}";
  EXPECT_BRIGADE_ERROR(o.validate(), "extra_body sets 'prompt', which brigade sets itself");
  o.teacher.extra_body = "{\"repeat_penalty\": 1.0, \"top_p\": 0.5}";
  o.validate();
}

TEST(RemoteTeacher, ExtraBodyIsMergedIntoEveryRequest) {
  Fixture f;
  f.teacher.extra_body = "{\"repeat_penalty\": 1.0, \"top_p\": 0.5}";
  auto body = remote_request(f.teacher, f.options, Prompt{"p1", "Problem: 1+2\n", "3"}, 5);
  EXPECT_EQ(body["repeat_penalty"], 1.0);
  EXPECT_EQ(body["top_p"], 0.5);  // the server-specific value wins
  EXPECT_EQ(body["prompt"], "Problem: 1+2\n");
}

// A mapping in YAML or a JSON string: both become the same JSON text.
TEST(RemoteTeacher, ExtraBodyReadsFromYaml) {
  auto r = recipes::parse_recipe("distill:\n  teacher:\n    url: http://x/v1\n    extra_body: {repeat_penalty: 1.0, tag: \"7\", on: true}\n",
                                 "inline");
  EXPECT_EQ(nlohmann::json::parse(r.distill.teacher.extra_body),
            nlohmann::json({{"repeat_penalty", 1.0}, {"tag", "7"}, {"on", true}}));
  auto again = recipes::parse_recipe(recipes::dump_recipe(r), "dump");
  EXPECT_EQ(nlohmann::json::parse(again.distill.teacher.extra_body), nlohmann::json::parse(r.distill.teacher.extra_body));
  EXPECT_TRUE(recipes::parse_recipe("", "empty").distill.teacher.extra_body.empty());
}

}  // namespace
}  // namespace brigade::distill
