// The remote teacher (distill.teacher.url) against real HTTP servers: `brigade
// serve` (the same model as a local teacher, so the samples must match it token for
// token) and tests/distill/faulty_server.py, which fails, stalls, answers garbage
// or demands a key.
#include <gtest/gtest.h>

#include <unistd.h>

#include <fstream>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "distill/onpolicy.h"
#include "distill/prompts.h"
#include "distill/remote.h"
#include "distill/traces.h"
#include "launch/commands.h"
#include "recipes/build.h"
#include "tests/testing.h"

namespace brigade {
namespace {

namespace fs = std::filesystem;
using testing::Background;
using testing::run_brigade;
using testing::run_command;
using testing::TempDir;
using testing::wait_for;

const std::string kSmall =
    " --set model.d_model=32 --set model.n_layers=2 --set model.n_heads=4 --set model.n_kv_heads=2"
    " --set model.d_ff=64 --set data.seq_len=64 --set model.max_seq_len=128 --set data.synthetic.num_problems=400"
    " --set data.synthetic.eval_problems=30 --set trainer.micro_batch_size=8 --set trainer.warmup_steps=5"
    " --set trainer.eval_every=0 --set trainer.checkpoint_every=0 --set trainer.eval_batches=1 --set trainer.threads=1";

const std::string kRecipe = std::string(BRIGADE_SOURCE_DIR) + "/recipes/distill-arith.yaml";
const std::string kFaultyServer = std::string(BRIGADE_SOURCE_DIR) + "/tests/distill/faulty_server.py";

std::vector<nlohmann::json> lines(const fs::path& file) {
  std::vector<nlohmann::json> out;
  if (!fs::exists(file)) return out;
  std::istringstream in(read_file(file));
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  }
  return out;
}

void write_prompts(const fs::path& file, int n) {
  std::ofstream out(file);
  for (int i = 0; i < n; ++i) out << "{\"id\": \"p" << i << "\", \"prompt\": \"Problem: " << i << "+" << i + 3 << "*2\\n\"}\n";
}

// Waits for a server's port file; "" on timeout.
std::string wait_for_port(const fs::path& port_file) {
  std::string port;
  wait_for([&] {
    if (!fs::exists(port_file)) return false;
    port = read_file(port_file);
    while (!port.empty() && port.back() == '\n') port.pop_back();
    return !port.empty();
  }, 120);
  return port;
}

// Every file under `dir` and the text `output`: does any contain `secret`?
bool leaks(const fs::path& dir, const std::string& output, const std::string& secret) {
  if (output.find(secret) != std::string::npos) return true;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file() && read_file(entry.path()).find(secret) != std::string::npos) return true;
  }
  return false;
}

std::map<std::pair<std::string, int64_t>, nlohmann::json> by_sample(const std::vector<nlohmann::json>& traces) {
  std::map<std::pair<std::string, int64_t>, nlohmann::json> out;
  for (const auto& t : traces) out[{t["prompt_id"].get<std::string>(), t["sample"].get<int64_t>()}] = t;
  return out;
}

TEST(CliDistillRemote, BrigadeServeAnswersLikeTheLocalTeacher) {
  TempDir dir;
  auto teacher = run_brigade("train " + std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-dense.yaml" + kSmall +
                             " --set trainer.lr=0.01 --set trainer.max_steps=300 --run-dir " + (dir / "teacher").string());
  ASSERT_EQ(teacher.exit_code, 0) << teacher.output;
  write_prompts(dir / "prompts.jsonl", 6);
  const std::string key = "sekrit-6d1f0a";
  Background server("env BRIGADE_TEST_SERVE_KEY=" + key + " " + BRIGADE_BINARY + " serve --checkpoint " +
                        (dir / "teacher").string() + " --port 0 --port-file " + (dir / "port").string() +
                        " --api-key-env BRIGADE_TEST_SERVE_KEY",
                    dir / "serve.log");
  const std::string port = wait_for_port(dir / "port");
  ASSERT_FALSE(port.empty()) << read_file(dir / "serve.log");

  const std::string common = "distill " + kRecipe + kSmall + " --set distill.prompts=" + (dir / "prompts.jsonl").string() +
                             " --set distill.generate.samples=2 --set distill.generate.max_new_tokens=40"
                             " --set distill.generate.logprobs=4 --set distill.generate.temperature=0.6"
                             " --set distill.eval.problems=4 --set distill.eval.k=2";
  auto local = run_brigade(common + " --set distill.teacher.checkpoint=" + (dir / "teacher").string() +
                           " --stage generate --run-dir " + (dir / "local").string());
  ASSERT_EQ(local.exit_code, 0) << local.output;
  const auto local_traces = by_sample(lines(dir / "local" / "distill" / "generate" / "traces.jsonl"));
  ASSERT_EQ(local_traces.size(), 12u);
  const distill::TopkSidecar local_topk(dir / "local" / "distill" / "generate" / "traces.topk.bin");

  for (const std::string api : {"completions", "chat"}) {
    SCOPED_TRACE(api);
    const fs::path run = dir / ("remote_" + api);
    const std::string remote = common + " --set distill.teacher.url=http://127.0.0.1:" + port + "/v1" +
                               " --set distill.teacher.api=" + api + " --set distill.teacher.concurrency=3" +
                               " --set distill.teacher.api_key_env=BRIGADE_TEST_CLIENT_KEY --run-dir " + run.string();
    // Without the key the server refuses, and the run stops at once with the reason.
    auto refused = run_command("env BRIGADE_TEST_CLIENT_KEY=wrong " + std::string(BRIGADE_BINARY) + " " + remote +
                               " --stage generate");
    EXPECT_NE(refused.exit_code, 0);
    EXPECT_NE(refused.output.find("HTTP 401"), std::string::npos) << refused.output;
    auto unset = run_brigade(remote + " --stage generate");
    EXPECT_NE(unset.exit_code, 0);
    EXPECT_NE(unset.output.find("BRIGADE_TEST_CLIENT_KEY, which is not set"), std::string::npos) << unset.output;

    // One on-policy round, scored by the server through /v1/completions whatever the api.
    auto r = run_command("env BRIGADE_TEST_CLIENT_KEY=" + key + " " + std::string(BRIGADE_BINARY) + " " + remote +
                         " --set distill.kd.loss=forward_kl --set trainer.max_steps=5 --set distill.onpolicy.rounds=1"
                         " --set distill.onpolicy.steps_per_round=2 --set distill.onpolicy.prompts_per_round=6"
                         " --set distill.onpolicy.samples=1 --set distill.onpolicy.topk=8 --set distill.onpolicy.lambda=0.5");
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("| student (SFT + KD forward_kl + on-policy reverse_kl) |"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("onpolicy: round_000: the teacher scored"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find(" 0 failed requests"), std::string::npos) << r.output;
    const fs::path work = run / "distill";
    const auto remote_traces = by_sample(lines(work / "generate" / "traces.jsonl"));
    ASSERT_EQ(remote_traces.size(), 12u);
    const distill::TopkSidecar remote_topk(work / "generate" / "traces.topk.bin");
    ASSERT_EQ(remote_topk.k(), 4);
    for (const auto& [id, want] : local_traces) {
      const auto& got = remote_traces.at(id);
      EXPECT_EQ(got["text"], want["text"]) << id.first << " " << id.second;
      EXPECT_EQ(got["finish_reason"], want["finish_reason"]);
      // The server reports no logprobs for the end-of-sequence token.
      const int64_t positions = got["topk"]["positions"].get<int64_t>();
      EXPECT_EQ(positions, want["topk"]["positions"].get<int64_t>() - (want["finish_reason"] == "stop" ? 1 : 0));
      const auto [got_ids, got_lp] = remote_topk.read({got["topk"]["offset"].get<int64_t>(), positions});
      const auto [want_ids, want_lp] = local_topk.read({want["topk"]["offset"].get<int64_t>(), positions});
      EXPECT_TRUE(torch::equal(got_ids, want_ids));
      EXPECT_TRUE(torch::allclose(got_lp, want_lp, 0, 1e-5));
    }
    // Every accepted document carries the teacher's top-k into the KD targets.
    const auto build = nlohmann::json::parse(read_file(work / "build" / "build.json"));
    EXPECT_EQ(build["kd_misaligned"].get<int64_t>(), 0) << build.dump(1);
    EXPECT_EQ(build["kd_documents"].get<int64_t>(), build["documents"].get<int64_t>());
    EXPECT_FALSE(leaks(run, r.output + refused.output, key));
  }

  // On-policy scoring of the same samples: the server's echoed prompt logprobs are
  // the local teacher's records (byte tokens outside UTF-8 and special tokens among
  // the candidates included).
  const auto prompts = distill::read_prompts(dir / "prompts.jsonl").prompts;
  auto loaded = launch::load_model(dir / "teacher", {});
  const auto tokenizer = recipes::make_tokenizer(loaded.recipe.data.tokenizer);
  const fs::path samples = dir / "local" / "distill" / "generate";
  const int64_t k = 12;
  const auto local_stats = distill::score_with_teacher(loaded.model, *tokenizer, prompts, samples, k, 4, dir / "scored_local");
  distill::TeacherOptions options;
  options.url = "http://127.0.0.1:" + port + "/v1";
  options.api = "chat";
  options.api_key_env = "BRIGADE_TEST_SCORE_KEY";
  ::setenv("BRIGADE_TEST_SCORE_KEY", key.c_str(), 1);
  const auto remote_stats =
      distill::score_with_teacher_remote(options, *tokenizer, prompts, samples, k, dir / "scored_remote", false);
  EXPECT_GT(local_stats.scored, 0);
  EXPECT_EQ(remote_stats.scored, local_stats.scored);
  EXPECT_EQ(remote_stats.topk_dropped + remote_stats.failed + remote_stats.retried, 0);
  const distill::TraceReader want_store(dir / "scored_local"), got_store(dir / "scored_remote");
  std::map<std::pair<std::string, int64_t>, const distill::Trace*> got_by_sample;
  for (const auto& t : got_store.traces()) got_by_sample[{t.prompt_id, t.sample}] = &t;
  int64_t positions = 0;
  for (const auto& want : want_store.traces()) {
    SCOPED_TRACE(want.prompt_id + " " + std::to_string(want.sample));
    ASSERT_TRUE(got_by_sample.contains({want.prompt_id, want.sample}));
    const auto& got = *got_by_sample[{want.prompt_id, want.sample}];
    ASSERT_TRUE(got.topk_ids.sizes() == want.topk_ids.sizes());
    EXPECT_TRUE(torch::allclose(got.topk_logprobs, want.topk_logprobs, 0, 1e-5));
    // The same candidates, rank by rank, except where two of them tie within rounding.
    const auto values = want.topk_logprobs;
    const auto tied = torch::zeros_like(values, torch::kBool);
    tied.narrow(1, 0, k - 1).logical_or_((values.narrow(1, 0, k - 1) - values.narrow(1, 1, k - 1)).abs() < 1e-5);
    tied.narrow(1, 1, k - 1).logical_or_((values.narrow(1, 0, k - 1) - values.narrow(1, 1, k - 1)).abs() < 1e-5);
    EXPECT_TRUE(torch::all((got.topk_ids == want.topk_ids).logical_or(tied)).item<bool>());
    positions += want.topk_ids.size(0);
  }
  std::cout << "[ measured ] on-policy scoring through brigade serve: " << local_stats.scored << " samples, "
            << positions << " positions of top-" << k << " equal to the local teacher's\n";
  EXPECT_TRUE(server.running()) << read_file(dir / "serve.log");
}

// llama.cpp's OpenAI-compatible server (llama-cpp-python's llama_cpp.server) running
// the teacher exported as GGUF: greedy samples and top-k logprobs must match the
// local teacher's, so the export and the remote client agree with the format's tools.
TEST(CliDistillRemote, LlamaCppServerServesTheExportedTeacher) {
  const std::string python = BRIGADE_VENV_PYTHON;
  if (run_command(python + " -c 'import llama_cpp.server.app' 2>&1").exit_code != 0)
    GTEST_SKIP() << "llama-cpp-python[server] missing from .venv (scripts/setup.sh installs it)";
  TempDir dir;
  auto teacher = run_brigade("train " + std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-dense.yaml" + kSmall +
                             " --set trainer.lr=0.01 --set trainer.max_steps=300 --run-dir " + (dir / "teacher").string());
  ASSERT_EQ(teacher.exit_code, 0) << teacher.output;
  auto exported = run_brigade("export --checkpoint " + (dir / "teacher").string() + " --format gguf --quant f32 --out " +
                              (dir / "teacher.gguf").string());
  ASSERT_EQ(exported.exit_code, 0) << exported.output;
  write_prompts(dir / "prompts.jsonl", 6);

  // A port of our own (llama_cpp.server has no port-file option): probe for a free one.
  std::string port;
  for (int attempt = 0; attempt < 20 && port.empty(); ++attempt) {
    const std::string p = std::to_string(20000 + (getpid() * 7 + attempt * 131) % 30000);
    if (run_command("python3 -c 'import socket; socket.socket().bind((\"127.0.0.1\", " + p + "))' 2>&1").exit_code == 0)
      port = p;
  }
  ASSERT_FALSE(port.empty());
  Background server(python + " -m llama_cpp.server --model " + (dir / "teacher.gguf").string() +
                        " --host 127.0.0.1 --port " + port + " --n_threads 1 --n_ctx 512" +
                        " --type_k 0 --type_v 0",  // an F32 KV cache (the default F16 moves logprobs ~1e-3)
                    dir / "llama_server.log");
  ASSERT_TRUE(wait_for([&] {
    return run_command("curl -sf http://127.0.0.1:" + port + "/v1/models >/dev/null 2>&1").exit_code == 0;
  }, 120)) << read_file(dir / "llama_server.log");

  const std::string common = "distill " + kRecipe + kSmall + " --set distill.prompts=" + (dir / "prompts.jsonl").string() +
                             " --set distill.generate.samples=1 --set distill.generate.max_new_tokens=40"
                             " --set distill.generate.logprobs=3 --set distill.generate.temperature=0"
                             " --stage generate";
  auto local = run_brigade(common + " --set distill.teacher.checkpoint=" + (dir / "teacher").string() + " --run-dir " +
                           (dir / "local").string());
  ASSERT_EQ(local.exit_code, 0) << local.output;
  // llama_cpp.server penalises repeated tokens by default (repeat_penalty 1.1), even
  // greedy: turn it off for plain greedy decoding.
  auto remote = run_brigade(common + " --set distill.teacher.url=http://127.0.0.1:" + port + "/v1" +
                            " --set 'distill.teacher.extra_body={repeat_penalty: 1.0}' --run-dir " +
                            (dir / "remote").string());
  ASSERT_EQ(remote.exit_code, 0) << remote.output << read_file(dir / "llama_server.log");
  const auto local_traces = by_sample(lines(dir / "local" / "distill" / "generate" / "traces.jsonl"));
  const auto remote_traces = by_sample(lines(dir / "remote" / "distill" / "generate" / "traces.jsonl"));
  ASSERT_EQ(local_traces.size(), 6u);
  ASSERT_EQ(remote_traces.size(), 6u);
  const distill::TopkSidecar local_topk(dir / "local" / "distill" / "generate" / "traces.topk.bin");
  const distill::TopkSidecar remote_topk(dir / "remote" / "distill" / "generate" / "traces.topk.bin");
  double worst = 0;
  for (const auto& [id, want] : local_traces) {
    const auto& got = remote_traces.at(id);
    EXPECT_EQ(got["text"], want["text"]) << id.first;
    EXPECT_EQ(got["finish_reason"], want["finish_reason"]) << id.first;
    ASSERT_TRUE(got.contains("topk")) << got.dump();
    const int64_t positions = std::min(got["topk"]["positions"].get<int64_t>(), want["topk"]["positions"].get<int64_t>());
    EXPECT_GE(positions, want["topk"]["positions"].get<int64_t>() - 1);  // at most the EOS row is missing
    const auto [got_ids, got_lp] = remote_topk.read({got["topk"]["offset"].get<int64_t>(), positions});
    const auto [want_ids, want_lp] = local_topk.read({want["topk"]["offset"].get<int64_t>(), positions});
    // The best candidate is the token both chose; the others may swap where they tie.
    EXPECT_TRUE(torch::equal(got_ids.select(1, 0), want_ids.select(1, 0))) << id.first;
    worst = std::max(worst, (got_lp.select(1, 0) - want_lp.select(1, 0)).abs().max().item<double>());
  }
  EXPECT_LT(worst, 1e-4);
  std::cout << "[ measured ] llama.cpp server vs local teacher: max |top-1 logprob diff| " << worst << "\n";
}

// The faulty server on a fixed port, so a rerun asks the same URL (same stage inputs).
struct Faulty {
  Faulty(const TempDir& dir, const std::string& mode, const std::string& port = "0")
      : port_file(dir / ("port_" + mode)),
        process("python3 " + kFaultyServer + " " + mode + " " + port_file.string() + " " + (dir / "requests.jsonl").string() +
                    " --port " + port,
                dir / ("server_" + mode + ".log")) {
    this->port = wait_for_port(port_file);
  }
  fs::path port_file;
  Background process;
  std::string port;
};

TEST(CliDistillRemote, FailedRequestsAreRetriedRecordedAndAskedForAgain) {
  TempDir dir;
  write_prompts(dir / "prompts.jsonl", 3);
  std::string port;
  auto distill = [&](const std::string& extra) {
    return run_brigade("distill " + kRecipe + " --set distill.prompts=" + (dir / "prompts.jsonl").string() +
                       " --set distill.generate.samples=1 --set distill.teacher.url=http://127.0.0.1:" + port +
                       "/v1 --set distill.teacher.retries=2 --set distill.teacher.backoff=0.05 --stage generate" +
                       extra + " --run-dir " + (dir / "run").string());
  };
  const fs::path traces = dir / "run" / "distill" / "generate" / "traces.jsonl";
  {
    Faulty server(dir, "error");
    ASSERT_FALSE(server.port.empty());
    port = server.port;
    auto r = distill("");
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.output.find("3 of 3 samples failed after 2 retries"), std::string::npos) << r.output;
    // One request and two retries per prompt, then a failed record each.
    EXPECT_EQ(lines(dir / "requests.jsonl").size(), 9u);
    const auto stored = lines(traces);
    ASSERT_EQ(stored.size(), 3u);
    for (const auto& t : stored) {
      EXPECT_EQ(t["finish_reason"], "error");
      EXPECT_NE(t["error"].get<std::string>().find("HTTP 503"), std::string::npos) << t.dump();
      EXPECT_NE(t["error"].get<std::string>().find("after 3 attempts"), std::string::npos) << t.dump();
    }
  }
  // The server recovers on the same address: the next run asks for exactly the failed samples.
  fs::remove(dir / "requests.jsonl");
  {
    Faulty server(dir, "flaky", port);
    ASSERT_EQ(server.port, port);
    auto r = distill("");
    ASSERT_EQ(r.exit_code, 0) << r.output;
    // flaky: each prompt's first request fails, the retry succeeds.
    EXPECT_EQ(lines(dir / "requests.jsonl").size(), 6u);
    EXPECT_NE(r.output.find("3 new samples, 3 retries, 0 failed"), std::string::npos) << r.output;
    const auto stored = by_sample(lines(traces));  // the last line per sample wins
    ASSERT_EQ(stored.size(), 3u);
    for (const auto& [id, t] : stored) EXPECT_EQ(t["finish_reason"], "stop") << id.first;
    // Done: a third run asks nothing.
    fs::remove(dir / "requests.jsonl");
    auto again = distill("");
    ASSERT_EQ(again.exit_code, 0) << again.output;
    EXPECT_NE(again.output.find("generate: done"), std::string::npos) << again.output;
    EXPECT_TRUE(lines(dir / "requests.jsonl").empty());
  }
}

TEST(CliDistillRemote, StallingAndGarbageServersFailCleanly) {
  TempDir dir;
  write_prompts(dir / "prompts.jsonl", 4);
  for (const std::string mode : {"stall", "garbage"}) {
    SCOPED_TRACE(mode);
    Faulty server(dir, mode);
    ASSERT_FALSE(server.port.empty());
    const auto start = std::chrono::steady_clock::now();
    auto r = run_brigade("distill " + kRecipe + " --set distill.prompts=" + (dir / "prompts.jsonl").string() +
                         " --set distill.generate.samples=1 --set distill.teacher.url=http://127.0.0.1:" + server.port +
                         "/v1 --set distill.teacher.api=chat --set distill.teacher.timeout=0.5"
                         " --set distill.teacher.retries=1 --set distill.teacher.backoff=0 --set distill.teacher.concurrency=4"
                         " --stage generate --run-dir " + (dir / ("run_" + mode)).string());
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.output.find("4 of 4 samples failed after 1 retries"), std::string::npos) << r.output;
    const auto stored = lines(dir / ("run_" + mode) / "distill" / "generate" / "traces.jsonl");
    ASSERT_EQ(stored.size(), 4u);
    const std::string why = mode == "stall" ? "Timeout" : "not JSON";
    for (const auto& t : stored) EXPECT_NE(t["error"].get<std::string>().find(why), std::string::npos) << t.dump();
    // Two rounds of four concurrent 0.5 s timeouts, not 30 s stalls.
    EXPECT_LT(seconds, 20.0);
  }
}

// `brigade serve` under load (tests/e2e/serve_client.py drives it): requests sent
// together are decoded in one continuous batch and answered as each is alone,
// greedy or seeded; a streamed answer (completions and chat, with a stop string)
// is the non-streamed text chunk by chunk; oversized requests get a 400 that names
// the limit; a full queue gets a 503 and nothing else is lost.
TEST(CliServe, ContinuousBatchingStreamingAndBounds) {
  TempDir dir;
  auto model = run_brigade("train " + std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-dense.yaml" + kSmall +
                           " --set trainer.lr=0.01 --set trainer.max_steps=60 --run-dir " + (dir / "model").string());
  ASSERT_EQ(model.exit_code, 0) << model.output;
  const std::string client = "python3 " + std::string(BRIGADE_SOURCE_DIR) + "/tests/e2e/serve_client.py ";
  {
    Background server(std::string(BRIGADE_BINARY) + " serve --checkpoint " + (dir / "model").string() +
                          " --port 0 --port-file " + (dir / "port").string() + " --max-batch 8 --max-body-bytes 4096",
                      dir / "serve.log");
    const std::string port = wait_for_port(dir / "port");
    ASSERT_FALSE(port.empty()) << read_file(dir / "serve.log");
    auto out = run_command(client + port + " check 2>&1");
    ASSERT_EQ(out.exit_code, 0) << out.output << read_file(dir / "serve.log");
    const auto r = nlohmann::json::parse(out.output);
    EXPECT_EQ(r["greedy_together"], r["greedy_alone"]);
    EXPECT_EQ(r["sampled_together"], r["sampled_alone"]);
    EXPECT_EQ(r["streamed"]["text"], r["plain"]["text"]);
    EXPECT_EQ(r["streamed"]["finish_reason"], r["plain"]["finish_reason"]);
    EXPECT_TRUE(r["streamed"]["done"].get<bool>());
    // Text, then the finish_reason (how many text chunks depends on how far the
    // decoder is ahead of the connection).
    EXPECT_GE(r["streamed"]["events"].get<int>(), 2);
    EXPECT_EQ(r["chat_streamed"]["text"], r["chat_plain"]);
    EXPECT_EQ(r["stop_streamed"]["text"], r["stop_plain"]);
    EXPECT_EQ(r["stop_streamed"]["finish_reason"], "stop");
    EXPECT_EQ(r["stop_plain"].get<std::string>().find(r["stop"].get<std::string>()), std::string::npos);
    auto expect_400 = [&](const char* what, const std::string& needle) {
      const auto& b = r["bad"][what];
      EXPECT_EQ(b["status"], 400) << what;
      EXPECT_NE(b["body"].get<std::string>().find(needle), std::string::npos) << what << ": " << b["body"];
    };
    expect_400("max_tokens", "this server allows 128 (--max-tokens)");
    expect_400("context", "exceed the model's context of 128 tokens");
    expect_400("body", "4096 at most (--max-body-bytes)");
    expect_400("stream_logprobs", "not supported with \\\"stream\\\"");
    expect_400("not_json", "the body is not JSON");
    expect_400("echo_stream", "\\\"echo\\\" is not supported with \\\"stream\\\"");
    expect_400("echo_chat", "\\\"echo\\\" is an option of /v1/completions");
    expect_400("token_range", "prompt token 2 is 99999; token ids lie in 0..");
    expect_400("max_tokens_zero", "must be >= 1 (0 with \\\"echo\\\")");
    // echo with max_tokens 0 scores the prompt alone: BOS + its bytes, every entry but
    // the first with 3 candidates, offsets indexing the echoed text.
    const auto& echo = r["echo"];
    const std::string prompt7 = "Problem: 7+10*2-3\n";
    EXPECT_EQ(echo["scored_text"], prompt7);
    EXPECT_EQ(echo["scored_finish"], "length");
    EXPECT_EQ(echo["scored_tokens"].get<size_t>(), prompt7.size() + 1);
    EXPECT_TRUE(echo["scored_first"].is_null());
    EXPECT_EQ(echo["scored_sizes"], nlohmann::json::array({3}));
    EXPECT_EQ(echo["scored_offsets_end"].get<size_t>(), prompt7.size());
    EXPECT_EQ(echo["text"].get<std::string>(), prompt7 + r["plain"]["text"].get<std::string>());
  }
  // One row and one waiting place: of 8 simultaneous requests some are refused
  // with a 503 naming --max-queue; every other one is answered in full.
  Background server(std::string(BRIGADE_BINARY) + " serve --checkpoint " + (dir / "model").string() +
                        " --port 0 --port-file " + (dir / "port1").string() + " --max-batch 1 --max-queue 1",
                    dir / "serve1.log");
  const std::string port = wait_for_port(dir / "port1");
  ASSERT_FALSE(port.empty()) << read_file(dir / "serve1.log");
  auto out = run_command(client + port + " flood 2>&1");
  ASSERT_EQ(out.exit_code, 0) << out.output;
  int refused = 0, answered = 0;
  for (const auto& r : nlohmann::json::parse(out.output)) {
    if (r["status"] == 503) {
      ++refused;
      EXPECT_NE(r["body"].get<std::string>().find("(--max-queue)"), std::string::npos) << r["body"];
    } else {
      EXPECT_EQ(r["status"], 200) << r["body"];
      const auto body = nlohmann::json::parse(r["body"].get<std::string>());
      EXPECT_GT(body["usage"]["completion_tokens"].get<int>(), 0);
      ++answered;
    }
  }
  EXPECT_GE(refused, 1);
  EXPECT_GE(answered, 2);  // the running one and the queued one
  EXPECT_TRUE(server.running()) << read_file(dir / "serve1.log");
}

}  // namespace
}  // namespace brigade
