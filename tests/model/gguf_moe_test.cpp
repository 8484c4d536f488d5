// GGUF export of Qwen3-MoE-style brigade models as llama.cpp's "qwen3moe": the
// expert metadata, the fused experts split into ffn_{gate,up,down}_exps as gguf-py
// and brigade's reader see them, the settings llama.cpp cannot express refused, and
// llama.cpp's greedy continuation equal to brigade's.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <iostream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "data/bpe.h"
#include "model/generate.h"
#include "model/gguf.h"
#include "model/gguf_export.h"
#include "tests/model/gguf_testing.h"
#include "tests/testing.h"

namespace brigade::model {
namespace {

namespace fs = std::filesystem;
using gguf::GgmlType;
using testing::TempDir;
using namespace gguf_testing;

constexpr int64_t kExperts = 4;
constexpr int64_t kTopK = 2;
constexpr int64_t kExpertFF = 64;

// Two blocks of Qwen3 attention, each with a qwen3_moe MLP: 4 experts of width 64,
// 2 per token, softmax scores renormalised over the top 2 (llama.cpp's qwen3moe
// always renormalises), no shared experts, no learned selection bias.
TransformerOptions moe_options(bool tied) {
  TransformerOptions o;
  o.vocab_size = 264;
  o.d_model = 64;
  o.n_layers = 2;
  o.n_heads = 4;
  o.n_kv_heads = 2;
  o.max_seq_len = 256;
  o.tie_embeddings = tied;
  o.qk_norm = true;
  o.rope_theta = 10000.0;
  o.norm_eps = 1e-6;
  o.init_std = 0.3;  // large weights: decisive routing and varied continuations
  o.moe.num_experts = kExperts;
  o.moe.top_k = kTopK;
  o.moe.expert_d_ff = kExpertFF;
  o.moe.num_shared_experts = 0;
  o.moe.score_function = moe::ScoreFunction::kSoftmax;
  o.moe.normalize_topk = true;
  o.moe.routed_scaling = 1.0;
  o.moe.first_k_dense = 0;
  o.moe.bias_update_rate = 0.0;
  return o;
}

torch::Tensor state_tensor(const Transformer& model, const std::string& name) {
  for (const auto& [n, t] : model->state_dict()) {
    if (n == name) return t;
  }
  ADD_FAILURE() << "no " << name << " in the state_dict";
  return {};
}

TEST(GgufMoe, TensorNames) {
  EXPECT_EQ(gguf_tensor_name("layers.1.mlp.gate.weight"), "blk.1.ffn_gate_inp.weight");
  EXPECT_EQ(gguf_tensor_name("layers.1.mlp.experts.down_proj"), "blk.1.ffn_down_exps.weight");
  // One brigade tensor, two GGUF ones (ffn_gate_exps, ffn_up_exps): no single name.
  EXPECT_BRIGADE_ERROR(gguf_tensor_name("layers.0.mlp.experts.gate_up_proj"), "no llama.cpp tensor name");
  // deepseek2's selection bias (qwen3moe has none: the exporter checks it is zero instead).
  EXPECT_EQ(gguf_tensor_name("layers.0.mlp.gate.e_score_correction_bias"), "blk.0.exp_probs_b.bias");
  EXPECT_EQ(gguf_tensor_name("layers.2.self_attn.kv_a_proj_with_mqa.weight"), "blk.2.attn_kv_a_mqa.weight");
  EXPECT_BRIGADE_ERROR(gguf_tensor_name("layers.0.self_attn.kv_b_proj.weight"), "no llama.cpp tensor name");
}

TEST(GgufMoe, RefusesWhatQwen3MoeCannotExpress) {
  TempDir dir;
  const auto tokenizer = data::BpeTokenizer::from_byte_tokenizer();
  const fs::path out = dir / "m.gguf";
  auto refuse = [&](const TransformerOptions& o, HfFamily family, const std::string& message) {
    Transformer model = make_model(o, 1);
    EXPECT_BRIGADE_ERROR(export_gguf(model, family, tokenizer, GgufQuant::kF32, out, "m"), message);
  };
  {
    // A selection bias moved by aux-loss-free balancing changes brigade's routing.
    Transformer model = make_model(moe_options(true), 1);
    torch::NoGradGuard no_grad;
    state_tensor(model, "layers.1.mlp.gate.e_score_correction_bias")[2] = 0.01f;
    EXPECT_BRIGADE_ERROR(export_gguf(model, HfFamily::kQwen3Moe, tokenizer, GgufQuant::kF32, out, "m"),
                         "layers.1.mlp.gate.e_score_correction_bias is not zero");
  }
  auto o = moe_options(true);
  o.moe.first_k_dense = 1;
  refuse(o, HfFamily::kQwen3Moe, "first_k_dense > 0, but llama.cpp's qwen3moe has MoE in every layer");
  o = moe_options(true);
  o.moe.score_function = moe::ScoreFunction::kSigmoid;
  refuse(o, HfFamily::kQwen3Moe, "model.moe.score_function is not softmax");
  o = moe_options(true);
  o.moe.normalize_topk = false;
  refuse(o, HfFamily::kQwen3Moe, "llama.cpp's qwen3moe always renormalises the top-k weights");
  o = moe_options(true);
  o.moe.num_shared_experts = 1;
  refuse(o, HfFamily::kQwen3Moe, "num_shared_experts > 0");
  o = moe_options(true);
  o.moe.routed_scaling = 2.5;
  refuse(o, HfFamily::kQwen3Moe, "routed_scaling != 1");
  o = moe_options(true);
  o.qk_norm = false;
  refuse(o, HfFamily::kQwen3Moe, "the attention is not Qwen3's");
  refuse(moe_options(true), HfFamily::kQwen3, "GGUF export covers dense llama/qwen2/qwen3 models only");
  o = moe_options(true);
  o.moe.num_experts = 0;
  refuse(o, HfFamily::kQwen3Moe, "qwen3moe: the model has no MoE layers");
  EXPECT_FALSE(fs::exists(out));
}

TEST(GgufMoe, ReaderAndGgufPySeeTheModel) {
  TempDir dir;
  const auto tokenizer = data::BpeTokenizer::from_byte_tokenizer();
  Transformer model = make_model(moe_options(false), 5);
  export_gguf(model, HfFamily::kQwen3Moe, tokenizer, GgufQuant::kF32, dir / "f32.gguf", "tiny-qwen3moe");
  export_gguf(model, HfFamily::kQwen3Moe, tokenizer, GgufQuant::kQ8_0, dir / "q8.gguf", "tiny-qwen3moe");

  // brigade's reader: the F32 file holds the model's tensors exactly, the fused
  // gate_up_proj [E, 2F, D] split into its gate rows and its up rows.
  GgufReader reader(dir / "f32.gguf");
  EXPECT_EQ(reader.metadata("general.architecture").as_string("a"), "qwen3moe");
  for (int layer = 0; layer < 2; ++layer) {
    const std::string p = "layers." + std::to_string(layer) + ".mlp.";
    const std::string b = "blk." + std::to_string(layer) + ".";
    const torch::Tensor gate_up = state_tensor(model, p + "experts.gate_up_proj");
    EXPECT_TRUE(torch::equal(reader.tensor(b + "ffn_gate_exps.weight"), gate_up.narrow(1, 0, kExpertFF))) << layer;
    EXPECT_TRUE(torch::equal(reader.tensor(b + "ffn_up_exps.weight"), gate_up.narrow(1, kExpertFF, kExpertFF)))
        << layer;
    EXPECT_TRUE(torch::equal(reader.tensor(b + "ffn_down_exps.weight"), state_tensor(model, p + "experts.down_proj")));
    EXPECT_TRUE(torch::equal(reader.tensor(b + "ffn_gate_inp.weight"), state_tensor(model, p + "gate.weight")));
  }
  // Q8_0: the 3-D experts quantized along their rows (D = 64 and F = 64 values: whole
  // blocks), the router kept F32 as llama.cpp's converter and quantizer keep it.
  GgufReader q8(dir / "q8.gguf");
  EXPECT_EQ(q8.info("blk.0.ffn_gate_exps.weight").type, GgmlType::kQ8_0);
  EXPECT_EQ(q8.info("blk.0.ffn_up_exps.weight").type, GgmlType::kQ8_0);
  EXPECT_EQ(q8.info("blk.0.ffn_down_exps.weight").type, GgmlType::kQ8_0);
  EXPECT_EQ(q8.info("blk.0.ffn_gate_inp.weight").type, GgmlType::kF32);
  const torch::Tensor down = state_tensor(model, "layers.1.mlp.experts.down_proj");
  EXPECT_LE((q8.tensor("blk.1.ffn_down_exps.weight") - down).abs().max().item<double>(),
            0.01 * down.abs().max().item<double>());

  auto run = run_check("inspect", dir / "q8.gguf");
  if (run.exit_code == 3) GTEST_SKIP() << "gguf python package missing: " << run.output;
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const auto seen = last_json_line(run.output);
  const auto& md = seen["metadata"];
  EXPECT_EQ(md["general.architecture"], "qwen3moe");
  EXPECT_EQ(md["general.name"], "tiny-qwen3moe");
  EXPECT_EQ(md["general.file_type"], 7);
  EXPECT_EQ(md["qwen3moe.block_count"], 2);
  EXPECT_EQ(md["qwen3moe.embedding_length"], 64);
  EXPECT_EQ(md["qwen3moe.attention.head_count"], 4);
  EXPECT_EQ(md["qwen3moe.attention.head_count_kv"], 2);
  EXPECT_EQ(md["qwen3moe.attention.key_length"], 16);
  EXPECT_EQ(md["qwen3moe.expert_count"], kExperts);
  EXPECT_EQ(md["qwen3moe.expert_used_count"], kTopK);
  EXPECT_EQ(md["qwen3moe.expert_feed_forward_length"], kExpertFF);
  EXPECT_EQ(seen["types"]["qwen3moe.expert_count"], "UINT32");
  EXPECT_EQ(seen["types"]["qwen3moe.expert_used_count"], "UINT32");
  EXPECT_EQ(seen["types"]["qwen3moe.expert_feed_forward_length"], "UINT32");

  std::map<std::string, std::pair<nlohmann::json, std::string>> tensors;
  for (const auto& t : seen["tensors"]) tensors[t["name"]] = {t["shape"], t["type"]};
  // Per block: attn_norm, q, k, v, q_norm, k_norm, output, ffn_norm, and the four MoE
  // tensors; no dense ffn_{gate,up,down}.
  EXPECT_EQ(tensors.size(), 3u + 2 * 12);
  EXPECT_FALSE(tensors.count("blk.0.ffn_gate.weight"));
  // ne is innermost first: torch [E, F, D] is ne [D, F, E].
  EXPECT_EQ(tensors["blk.1.ffn_gate_inp.weight"], std::make_pair(nlohmann::json({64, 4}), std::string("F32")));
  EXPECT_EQ(tensors["blk.1.ffn_gate_exps.weight"], std::make_pair(nlohmann::json({64, 64, 4}), std::string("Q8_0")));
  EXPECT_EQ(tensors["blk.1.ffn_up_exps.weight"], std::make_pair(nlohmann::json({64, 64, 4}), std::string("Q8_0")));
  EXPECT_EQ(tensors["blk.1.ffn_down_exps.weight"], std::make_pair(nlohmann::json({64, 64, 4}), std::string("Q8_0")));
  EXPECT_EQ(tensors["blk.0.attn_q_norm.weight"], std::make_pair(nlohmann::json({16}), std::string("F32")));
}

TEST(GgufMoe, ExpertShapesFollowExpertWidth) {
  // F != D, so a transposed expert tensor would show in the shape: gate/up [E, F, D] is
  // ne [D, F, E], down [E, D, F] ne [F, D, E].
  TempDir dir;
  auto o = moe_options(true);
  o.moe.expert_d_ff = 96;
  Transformer model = make_model(o, 3);
  export_gguf(model, HfFamily::kQwen3Moe, data::BpeTokenizer::from_byte_tokenizer(), GgufQuant::kF16,
              dir / "m.gguf", "m");
  GgufReader reader(dir / "m.gguf");
  EXPECT_EQ(reader.info("blk.0.ffn_gate_exps.weight").ne, (std::vector<int64_t>{64, 96, 4}));
  EXPECT_EQ(reader.info("blk.0.ffn_up_exps.weight").ne, (std::vector<int64_t>{64, 96, 4}));
  EXPECT_EQ(reader.info("blk.0.ffn_down_exps.weight").ne, (std::vector<int64_t>{96, 64, 4}));
  EXPECT_EQ(reader.info("blk.0.ffn_down_exps.weight").type, GgmlType::kF16);
  EXPECT_EQ(reader.info("blk.0.ffn_gate_inp.weight").type, GgmlType::kF32);
  EXPECT_EQ(reader.metadata("qwen3moe.expert_feed_forward_length").as_int("f"), 96);
}

// The greedy continuation after swapping experts 0 and 2 of every layer (the router
// left as is): when it differs from the original's, the continuation depends on
// which expert the router picks, so llama.cpp matching it checks the expert order.
std::vector<int64_t> greedy_with_swapped_experts(const TransformerOptions& o, uint64_t seed,
                                                 const std::vector<int64_t>& prompt, const SamplingOptions& greedy) {
  Transformer model = make_model(o, seed);
  {
    torch::NoGradGuard no_grad;
    for (auto& [name, t] : model->state_dict()) {
      if (!name.ends_with("experts.gate_up_proj") && !name.ends_with("experts.down_proj")) continue;
      const torch::Tensor first = t[0].clone();
      t[0].copy_(t[2]);
      t[2].copy_(first);
    }
  }
  return generate(model, prompt, greedy).tokens;
}

// F32 and F16 files (tied and untied) continue a prompt in llama.cpp with the same 32
// greedy tokens as brigade's generate (F16 against brigade on the fp16-rounded weights).
TEST(GgufMoe, LlamaCppMatchesBrigade) {
  if (!have_llama_cpp()) {
    GTEST_SKIP() << "llama-cpp-python is not installed in .venv (scripts/setup.sh installs it); "
                    "llama.cpp parity not checked";
  }
  const OneTorchThread one_thread;
  TempDir dir;
  const auto tokenizer = data::BpeTokenizer::from_byte_tokenizer();
  const std::vector<int64_t> prompt = {72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100};  // "Hello, world"
  constexpr int64_t kNew = 32;

  std::vector<std::pair<std::string, std::vector<int64_t>>> cases;
  nlohmann::json job = nlohmann::json::array();
  for (bool tied : {true, false}) {
    for (GgufQuant quant : {GgufQuant::kF32, GgufQuant::kF16}) {
      const std::string file = std::string(tied ? "tied" : "untied") + "_" + gguf_quant_name(quant) + ".gguf";
      Transformer model = make_model(moe_options(tied), tied ? 31 : 32);
      export_gguf(model, HfFamily::kQwen3Moe, tokenizer, quant, dir / file, "parity");
      if (quant == GgufQuant::kF16) round_to_fp16(model);
      SamplingOptions greedy;
      greedy.max_new_tokens = kNew;
      cases.emplace_back("qwen3moe " + file, generate(model, prompt, greedy).tokens);
      if (quant == GgufQuant::kF32) {
        EXPECT_NE(greedy_with_swapped_experts(moe_options(tied), tied ? 31 : 32, prompt, greedy),
                  cases.back().second)
            << file << ": the continuation does not depend on the routing";
      }
      job.push_back({{"path", (dir / file).string()}, {"n_ctx", 256}, {"prompt", prompt}, {"new_tokens", kNew}});
    }
  }
  expect_llama_cpp_greedy(dir.path(), job, cases, /*min_distinct=*/8);
}

Transformer deepseek_model(bool v3, uint64_t seed) {
  Transformer model = make_model(deepseek_options(v3), seed);
  if (v3) {
    torch::NoGradGuard no_grad;
    for (auto& [name, t] : model->state_dict())
      if (name.ends_with("e_score_correction_bias")) t.normal_(0.0, 0.5);
  }
  return model;
}

TEST(GgufDeepseek2, TensorsAndMetadata) {
  TempDir dir;
  const auto tokenizer = data::BpeTokenizer::from_byte_tokenizer();
  Transformer model = deepseek_model(true, 41);
  export_gguf(model, HfFamily::kDeepseekV3, tokenizer, GgufQuant::kF32, dir / "m.gguf", "t");
  GgufReader reader(dir / "m.gguf");
  EXPECT_EQ(reader.metadata("general.architecture").as_string("a"), "deepseek2");
  EXPECT_EQ(reader.metadata("deepseek2.attention.key_length").as_int("k"), 48);  // the latent row: 32 + 16
  EXPECT_EQ(reader.metadata("deepseek2.attention.key_length_mla").as_int("k"), 32);
  EXPECT_EQ(reader.metadata("deepseek2.expert_gating_func").as_int("k"), 2);
  EXPECT_EQ(reader.metadata("deepseek2.expert_group_used_count").as_int("k"), 2);
  EXPECT_EQ(reader.info("blk.1.attn_k_b.weight").ne, (std::vector<int64_t>{16, 32, 4}));
  EXPECT_EQ(reader.info("blk.1.attn_v_b.weight").ne, (std::vector<int64_t>{32, 16, 4}));
  EXPECT_EQ(reader.info("blk.1.ffn_gate_exps.weight").ne, (std::vector<int64_t>{64, 32, 8}));
  EXPECT_EQ(reader.info("blk.1.ffn_up_shexp.weight").ne, (std::vector<int64_t>{64, 32}));
  EXPECT_TRUE(torch::equal(reader.tensor("blk.2.exp_probs_b.bias"),
                           state_tensor(model, "layers.2.mlp.gate.e_score_correction_bias")));
  EXPECT_EQ(reader.file().find_tensor("blk.0.ffn_gate_inp.weight"), nullptr);  // the dense first layer
  // The rotary rows are interleaved pairs: row dn + 2i of a head is brigade's row dn + i.
  const auto q_b = state_tensor(model, "layers.0.self_attn.q_b_proj.weight");
  const auto written = reader.tensor("blk.0.attn_q_b.weight");
  EXPECT_TRUE(torch::equal(written[16 + 2], q_b[16 + 1]));
  EXPECT_TRUE(torch::equal(written[16 + 3], q_b[16 + 8 + 1]));
  EXPECT_TRUE(torch::equal(written[5], q_b[5]));  // a nope row stays

  // What llama.cpp's deepseek2 cannot express.
  auto o = deepseek_options(false);
  o.moe.num_groups = 4;
  o.moe.topk_group = 2;
  o.moe.group_score = moe::GroupScore::kMax;
  EXPECT_BRIGADE_ERROR(export_gguf(make_model(o, 1), HfFamily::kDeepseekV2, tokenizer, GgufQuant::kF32, dir / "x.gguf", "t"),
                       "group_score max");
  o = deepseek_options(true);
  o.n_layers = 26;
  EXPECT_BRIGADE_ERROR(export_gguf(make_model(o, 1), HfFamily::kDeepseekV3, tokenizer, GgufQuant::kF32, dir / "x.gguf", "t"),
                       "treats a model of 26 layers as DeepSeek-V2-Lite");
}

TEST(GgufDeepseek2, LlamaCppMatchesBrigade) {
  if (!have_llama_cpp()) {
    GTEST_SKIP() << "llama-cpp-python is not installed in .venv (scripts/setup.sh installs it); "
                    "llama.cpp parity not checked";
  }
  const OneTorchThread one_thread;
  TempDir dir;
  const auto tokenizer = data::BpeTokenizer::from_byte_tokenizer();
  const std::vector<int64_t> prompt = {72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100};  // "Hello, world"
  constexpr int64_t kNew = 32;
  std::vector<std::pair<std::string, std::vector<int64_t>>> cases;
  nlohmann::json job = nlohmann::json::array();
  for (bool v3 : {true, false}) {
    for (GgufQuant quant : {GgufQuant::kF32, GgufQuant::kF16}) {
      const std::string file = std::string(v3 ? "v3" : "v2") + "_" + gguf_quant_name(quant) + ".gguf";
      Transformer model = deepseek_model(v3, v3 ? 43 : 44);
      export_gguf(model, v3 ? HfFamily::kDeepseekV3 : HfFamily::kDeepseekV2, tokenizer, quant, dir / file, "parity");
      if (quant == GgufQuant::kF16) round_to_fp16(model);
      SamplingOptions greedy;
      greedy.max_new_tokens = kNew;
      cases.emplace_back("deepseek2 " + file, generate(model, prompt, greedy).tokens);
      if (v3 && quant == GgufQuant::kF32) {  // the selection bias decides the continuation, so it is tested
        Transformer unbiased = deepseek_model(true, 43);
        torch::NoGradGuard no_grad;
        for (auto& [name, t] : unbiased->state_dict())
          if (name.ends_with("e_score_correction_bias")) t.zero_();
        EXPECT_NE(generate(unbiased, prompt, greedy).tokens, cases.back().second);
      }
      job.push_back({{"path", (dir / file).string()}, {"n_ctx", 256}, {"prompt", prompt}, {"new_tokens", kNew}});
    }
  }
  expect_llama_cpp_greedy(dir.path(), job, cases, /*min_distinct=*/8);
}

// RoPE scaling through GGUF: linear and yarn on llama, DeepSeek's yarn (mscale =
// mscale_all_dim, the softmax scaled) on deepseek2; llama.cpp's greedy tokens equal
// brigade's, and the same model without the scaling continues differently.
TEST(GgufRopeScaling, LlamaCppMatchesBrigade) {
  if (!have_llama_cpp()) {
    GTEST_SKIP() << "llama-cpp-python is not installed in .venv (scripts/setup.sh installs it); "
                    "llama.cpp parity not checked";
  }
  const OneTorchThread one_thread;
  TempDir dir;
  const auto tokenizer = data::BpeTokenizer::from_byte_tokenizer();
  std::vector<int64_t> prompt;
  for (int i = 0; i < 40; ++i) prompt.push_back(72 + (i * 7) % 40);  // past the 32 original positions
  constexpr int64_t kNew = 24;
  struct Case {
    std::string label;
    TransformerOptions options;
    HfFamily family;
  };
  TransformerOptions llama;
  llama.vocab_size = 264;
  llama.d_model = 64;
  llama.n_layers = 2;
  llama.n_heads = 4;
  llama.n_kv_heads = 2;
  llama.d_ff = 96;
  llama.max_seq_len = 256;
  llama.norm_eps = 1e-6;
  llama.init_std = 0.3;
  std::vector<Case> cases;
  auto yarn = llama;
  yarn.rope_scaling.type = RopeScalingType::kYarn;
  yarn.rope_scaling.factor = 4.0;
  yarn.rope_scaling.original_max_seq_len = 32;
  cases.push_back({"llama yarn", yarn, HfFamily::kLlama});
  auto linear = llama;
  linear.rope_scaling.type = RopeScalingType::kLinear;
  linear.rope_scaling.factor = 2.0;
  cases.push_back({"llama linear", linear, HfFamily::kLlama});
  auto deepseek = deepseek_options(true);
  deepseek.rope_scaling = yarn.rope_scaling;
  deepseek.rope_scaling.mscale = deepseek.rope_scaling.mscale_all_dim = 1.0;
  cases.push_back({"deepseek2 yarn", deepseek, HfFamily::kDeepseekV3});

  nlohmann::json job = nlohmann::json::array();
  std::vector<std::vector<int64_t>> expected;
  SamplingOptions greedy;
  greedy.max_new_tokens = kNew;
  for (size_t i = 0; i < cases.size(); ++i) {
    const fs::path file = dir / ("case" + std::to_string(i) + ".gguf");
    Transformer model = make_model(cases[i].options, 50 + i);
    export_gguf(model, cases[i].family, tokenizer, GgufQuant::kF32, file, "parity");
    expected.push_back(generate(model, prompt, greedy).tokens);
    auto plain = cases[i].options;
    plain.rope_scaling = {};
    Transformer unscaled = make_model(plain, 50 + i);
    EXPECT_NE(generate(unscaled, prompt, greedy).tokens, expected.back()) << cases[i].label << ": scaling not tested";
    job.push_back({{"path", file.string()}, {"n_ctx", 256}, {"prompt", prompt}, {"new_tokens", kNew}});
  }
  std::vector<std::pair<std::string, std::vector<int64_t>>> labelled;
  for (size_t i = 0; i < cases.size(); ++i) labelled.emplace_back(cases[i].label, expected[i]);
  expect_llama_cpp_greedy(dir.path(), job, labelled, /*min_distinct=*/0);
}

}  // namespace
}  // namespace brigade::model
