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
