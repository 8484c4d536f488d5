// Hugging Face checkpoints against transformers: import, export, sharding, dtypes,
// model.init_from, and bad checkpoints.
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/fs.h"
#include "launch/commands.h"
#include "data/tokenizer.h"
#include "model/generate.h"
#include "model/hf.h"
#include "model/safetensors.h"
#include "precision/quantize.h"
#include "recipes/build.h"
#include "recipes/recipe.h"
#include "tests/model/gguf_testing.h"
#include "tests/testing.h"

namespace brigade::model {
namespace {
namespace fs = std::filesystem;
using testing::TempDir;

const std::string kScript = std::string(BRIGADE_SOURCE_DIR) + "/tests/model/hf_reference.py";

// Runs the transformers side; skips the test when transformers is missing.
#define RUN_REFERENCE(args)                                                                 \
  do {                                                                                      \
    auto run_ = testing::run_command(std::string(BRIGADE_VENV_PYTHON) + " " + kScript + " " + \
                                     (args) + " 2>&1");                                     \
    if (run_.exit_code == 3) GTEST_SKIP() << "transformers missing from .venv: " << run_.output; \
    ASSERT_EQ(run_.exit_code, 0) << run_.output;                                            \
  } while (0)

Transformer import_dir(const fs::path& dir) {
  const HfConfig config = read_hf_config(dir / "config.json");
  torch::manual_seed(0);
  Transformer model(config.options);
  load_hf_weights(*model, dir);
  model->eval();
  return model;
}

torch::Tensor logits_of(Transformer& model, const torch::Tensor& ids) {
  torch::NoGradGuard no_grad;
  return model->forward(ids);
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  EXPECT_EQ(a.sizes(), b.sizes());
  return (a - b).abs().max().item<double>();
}

// A variant of a family ("llama_yarn", "deepseek_v3_nolora") is saved under its model_type.
std::string model_type_of(const std::string& variant) {
  for (const char* type : {"qwen3_moe", "qwen2", "qwen3", "deepseek_v2", "deepseek_v3", "llama"})
    if (variant.starts_with(type)) return type;
  return variant;
}

class HfFamilies : public ::testing::TestWithParam<std::tuple<std::string, bool>> {};

TEST_P(HfFamilies, ImportMatchesTransformersAndExportLoadsBack) {
  const auto [family, tied] = GetParam();
  TempDir dir;
  const fs::path src = dir / "hf";
  RUN_REFERENCE("make " + family + " " + src.string() + (tied ? " --tied" : ""));
  const HfConfig config = read_hf_config(src / "config.json");
  EXPECT_EQ(family_name(config.family), model_type_of(family));
  EXPECT_EQ(config.options.tie_embeddings, tied);
  EXPECT_EQ(config.options.rope_theta, 50000.0);

  Transformer model = import_dir(src);
  auto reference = load_safetensors(src / "reference.safetensors");
  const auto& ids = reference.tensors.at("ids");
  const auto ours = logits_of(model, ids);
  const double import_diff = max_diff(ours, reference.tensors.at("logits"));
  EXPECT_LE(import_diff, 1e-4) << family << " import";

  // The variants' settings were read, and they matter at these positions: the same
  // weights without the RoPE scaling (or with the selection bias zeroed) miss the
  // import bound (1e-4; transformers' tiny init keeps the logits small) several times over.
  const auto& o = config.options;
  EXPECT_EQ(o.is_mla(), family.starts_with("deepseek")) << family;
  const std::map<std::string, RopeScalingType> scaling = {{"llama_yarn", RopeScalingType::kYarn},
                                                          {"llama_llama3rope", RopeScalingType::kLlama3},
                                                          {"deepseek_v3", RopeScalingType::kYarn},
                                                          {"deepseek_v2", RopeScalingType::kLinear}};
  EXPECT_EQ(o.rope_scaling.type, scaling.contains(family) ? scaling.at(family) : RopeScalingType::kNone) << family;
  if (o.rope_scaling.enabled()) {
    HfConfig plain = config;
    plain.options.rope_scaling = {};
    torch::manual_seed(0);
    Transformer unscaled(plain.options);
    load_hf_weights(*unscaled, src);
    unscaled->eval();
    EXPECT_GT(max_diff(logits_of(unscaled, ids), ours), 5e-4) << family << ": RoPE scaling is within the import bound";
  }
  if (family == "deepseek_v3") {
    EXPECT_EQ(o.mla.q_lora_rank, 24);
    EXPECT_DOUBLE_EQ(o.rope_scaling.mscale_all_dim, 0.8);
    ASSERT_TRUE(o.moe.enabled());
    EXPECT_EQ(o.moe.first_k_dense, 1);
    EXPECT_EQ(o.moe.num_groups, 2);
    EXPECT_EQ(o.moe.score_function, moe::ScoreFunction::kSigmoid);
    auto bias = model->named_buffers().find("layers.1.mlp.gate.e_score_correction_bias");
    ASSERT_NE(bias, nullptr);
    EXPECT_GT(bias->abs().max().item<double>(), 0.01);  // the random bias the reference set
    Transformer unbiased = import_dir(src);
    {
      torch::NoGradGuard no_grad;
      unbiased->named_buffers().find("layers.1.mlp.gate.e_score_correction_bias")->zero_();
    }
    EXPECT_GT(max_diff(logits_of(unbiased, ids), ours), 5e-4) << "the selection bias is within the import bound";
  }
  if (family == "deepseek_v3_nolora") {
    EXPECT_EQ(o.mla.q_lora_rank, 0);
    EXPECT_FALSE(o.moe.enabled());
  }
  if (family == "deepseek_v2") {
    ASSERT_TRUE(o.moe.enabled());
    EXPECT_EQ(o.moe.score_function, moe::ScoreFunction::kSoftmax);
    EXPECT_EQ(o.moe.group_score, moe::GroupScore::kMax);
    EXPECT_EQ(o.moe.num_shared_experts, 2);
    HfConfig top2 = config;  // ranking groups by their two best scores instead routes differently
    top2.options.moe.group_score = moe::GroupScore::kTopTwoSum;
    Transformer other(top2.options);
    {
      torch::NoGradGuard no_grad;
      auto imported = model->named_parameters();
      for (auto& item : other->named_parameters()) item.value().copy_(imported[item.key()]);
    }
    other->eval();
    EXPECT_GT(max_diff(logits_of(other, ids), ours), 5e-4) << "the group score is within the import bound";
  }

  // Export (sharded, to cover the index) and have transformers load it.
  const fs::path out = dir / "exported";
  fs::create_directories(out);
  save_hf_checkpoint(*model, out, "float32", /*max_shard_bytes=*/64 << 10);
  EXPECT_TRUE(fs::exists(out / "model.safetensors.index.json"));
  EXPECT_EQ(family_of(model->options()), config.family);
  RUN_REFERENCE("logits " + out.string() + " " + (src / "reference.safetensors").string() + " " +
                (dir / "back.safetensors").string());
  const double export_diff = max_diff(load_safetensors(dir / "back.safetensors").tensors.at("logits"), ours);
  EXPECT_LE(export_diff, 1e-4) << family << " export";
  std::cout << "[ measured ] " << family << (tied ? " tied" : "") << ": import max|diff| " << import_diff
            << ", export max|diff| " << export_diff << "\n";
}

INSTANTIATE_TEST_SUITE_P(Families, HfFamilies,
                         ::testing::Values(std::tuple{"llama", false}, std::tuple{"llama", true},
                                           std::tuple{"qwen2", false}, std::tuple{"qwen2", true},
                                           std::tuple{"qwen3", false}, std::tuple{"qwen3", true},
                                           std::tuple{"qwen3_moe", false}, std::tuple{"llama_yarn", false},
                                           std::tuple{"llama_llama3rope", false}, std::tuple{"deepseek_v3", false},
                                           std::tuple{"deepseek_v3_nolora", true}, std::tuple{"deepseek_v2", false}),
                         [](const auto& info) {
                           return std::get<0>(info.param) + (std::get<1>(info.param) ? "Tied" : "Untied");
                         });

TEST(HfCheckpoint, ShardedBfloat16CheckpointFromTransformersLoads) {
  TempDir dir;
  RUN_REFERENCE("make qwen2 " + (dir / "hf").string() + " --shard-kb 100 --dtype bfloat16");
  ASSERT_TRUE(fs::exists(dir / "hf" / "model.safetensors.index.json"));
  Transformer model = import_dir(dir / "hf");
  auto reference = load_safetensors(dir / "hf" / "reference.safetensors");
  // The reference ran the same bfloat16-rounded weights in float32.
  EXPECT_LE(max_diff(logits_of(model, reference.tensors.at("ids")), reference.tensors.at("logits")), 1e-4);
}

// Rewrites config.json with `edit` applied.
void edit_config(const fs::path& dir, const std::function<void(nlohmann::json&)>& edit) {
  auto j = nlohmann::json::parse(read_file(dir / "config.json"));
  edit(j);
  write_file_atomic(dir / "config.json", j.dump(2));
}

TEST(HfCheckpoint, BadConfigsAndWeightsAreErrorsNamingFileAndField) {
  TempDir dir;
  const fs::path src = dir / "hf";
  RUN_REFERENCE("make llama " + src.string());
  const fs::path config = src / "config.json";
  const std::string original = read_file(config);
  auto restore = [&] { write_file_atomic(config, original); };

  edit_config(src, [](auto& j) { j["model_type"] = "gpt_neox"; });
  EXPECT_BRIGADE_ERROR(read_hf_config(config), "model_type 'gpt_neox' is not supported");
  edit_config(src, [](auto& j) { j["model_type"] = "deepseek_v3"; });
  EXPECT_BRIGADE_ERROR(read_hf_config(config), "field 'num_key_value_heads' (2) must equal num_attention_heads (4)");
  restore();
  edit_config(src, [](auto& j) { j.erase("hidden_size"); });
  EXPECT_BRIGADE_ERROR(read_hf_config(config), "missing field 'hidden_size'");
  restore();
  edit_config(src, [](auto& j) { j["num_attention_heads"] = "four"; });
  EXPECT_BRIGADE_ERROR(read_hf_config(config), "field 'num_attention_heads' must be a non-negative integer");
  restore();
  edit_config(src, [](auto& j) { j["rope_parameters"] = {{"rope_type", "longrope"}, {"factor", 4.0}}; });
  EXPECT_BRIGADE_ERROR(read_hf_config(config), "rope_type' is 'longrope'");
  restore();
  edit_config(src, [](auto& j) { j["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 0.5}}; });
  EXPECT_BRIGADE_ERROR(read_hf_config(config), "model.rope_scaling.factor must be >= 1");
  restore();
  edit_config(src, [](auto& j) { j["attention_bias"] = true; });
  EXPECT_BRIGADE_ERROR(read_hf_config(config), "field 'attention_bias' is true");
  restore();
  edit_config(src, [](auto& j) { j["num_key_value_heads"] = 3; });
  EXPECT_BRIGADE_ERROR(read_hf_config(config), "config.json: model.n_kv_heads (3) must divide model.n_heads (4)");
  restore();
  write_file_atomic(config, original.substr(0, original.size() / 2));
  EXPECT_BRIGADE_ERROR(read_hf_config(config), "config.json: not valid JSON");
  restore();

  // Weights that disagree with config.json name the tensor; the model is left as it was.
  edit_config(src, [](auto& j) { j["intermediate_size"] = 128; });
  {
    Transformer model(read_hf_config(config).options);
    const auto before = model->layers[0]->as<BlockImpl>()->self_attn->q_proj->weight.clone();
    EXPECT_BRIGADE_ERROR(load_hf_weights(*model, src), "tensor 'model.layers.0.mlp.gate_proj.weight' has shape");
    EXPECT_TRUE(torch::equal(before, model->layers[0]->as<BlockImpl>()->self_attn->q_proj->weight));
  }
  restore();
  auto weights = load_safetensors(src / "model.safetensors");
  NamedTensors fewer;
  for (const auto& [name, t] : weights.tensors)
    if (name != "model.norm.weight") fewer.emplace_back(name, t.clone());
  save_safetensors(src / "model.safetensors", fewer);
  {
    Transformer model(read_hf_config(config).options);
    EXPECT_BRIGADE_ERROR(load_hf_weights(*model, src), "no tensor 'model.norm.weight'");
  }
  fewer.emplace_back("model.extra.weight", torch::zeros({2}));
  fewer.emplace_back("model.norm.weight", torch::ones({64}));
  save_safetensors(src / "model.safetensors", fewer);
  {
    Transformer model(read_hf_config(config).options);
    EXPECT_BRIGADE_ERROR(load_hf_weights(*model, src), "unexpected tensor 'model.extra.weight'");
  }
  fs::remove(src / "model.safetensors");
  {
    Transformer model(read_hf_config(config).options);
    EXPECT_BRIGADE_ERROR(load_hf_weights(*model, src), "has neither model.safetensors.index.json nor model.safetensors");
  }
}

TEST(HfCheckpoint, ShardIndexMustAgreeWithTheShards) {
  TempDir dir;
  NamedTensors tensors;
  for (int i = 0; i < 6; ++i) tensors.emplace_back("t" + std::to_string(i), torch::full({256}, float(i)));
  const auto files = save_safetensors_sharded(dir.path(), tensors, 2048);
  ASSERT_EQ(files.size(), 4u);  // three shards of two tensors, and the index
  auto loaded = load_safetensors_dir(dir.path());
  ASSERT_EQ(loaded.tensors.size(), 6u);
  for (const auto& [name, t] : tensors) EXPECT_TRUE(torch::equal(loaded.tensors.at(name), t)) << name;

  const fs::path index = dir / "model.safetensors.index.json";
  const std::string original = read_file(index);
  auto j = nlohmann::json::parse(original);
  j["weight_map"]["t0"] = "model-00002-of-00003.safetensors";
  write_file_atomic(index, j.dump());
  EXPECT_BRIGADE_ERROR(load_safetensors_dir(dir.path()), "holds 't0', which weight_map does not put there");
  j = nlohmann::json::parse(original);
  j["weight_map"]["t0"] = "../elsewhere.safetensors";
  write_file_atomic(index, j.dump());
  EXPECT_BRIGADE_ERROR(load_safetensors_dir(dir.path()), "is not a file name in the same directory");
  j = nlohmann::json::parse(original);
  j["weight_map"].erase("t5");
  write_file_atomic(index, j.dump());
  EXPECT_BRIGADE_ERROR(load_safetensors_dir(dir.path()), "holds 't5', which weight_map does not put there");
  write_file_atomic(index, original);
  fs::remove(dir / "model-00003-of-00003.safetensors");
  EXPECT_BRIGADE_ERROR(load_safetensors_dir(dir.path()), "model-00003-of-00003.safetensors: cannot open");
}

TEST(HfCheckpoint, Float8WeightsRoundTrip) {
  TempDir dir;
  auto w = (torch::randn({4, 8}) * 3).to(torch::kFloat8_e4m3fn);
  auto g = torch::randn({3}).to(torch::kFloat8_e5m2);
  save_safetensors(dir / "f8.safetensors", {{"w", w}, {"g", g}});
  auto file = load_safetensors(dir / "f8.safetensors");
  EXPECT_EQ(file.tensors.at("w").scalar_type(), torch::kFloat8_e4m3fn);
  EXPECT_TRUE(torch::equal(file.tensors.at("w").to(torch::kFloat), w.to(torch::kFloat)));
  EXPECT_TRUE(torch::equal(file.tensors.at("g").to(torch::kFloat), g.to(torch::kFloat)));
}

TEST(HfCheckpoint, RecipeInitFromTakesTheArchitectureAndWeights) {
  TempDir dir;
  const fs::path src = dir / "hf";
  RUN_REFERENCE("make qwen3 " + src.string());
  // A recipe that leaves the architecture to the checkpoint.
  const fs::path recipe = dir / "finetune.yaml";
  write_file_atomic(recipe, "model:\n  init_from: " + src.string() + "\n  max_seq_len: 64\n"
                            "data:\n  seq_len: 32\n  synthetic:\n    num_problems: 200\n    eval_problems: 20\n"
                            "trainer:\n  max_steps: 3\n  warmup_steps: 1\n  micro_batch_size: 2\n  lr: 1.0e-3\n");
  auto r = recipes::load_recipe(recipe);
  EXPECT_EQ(r.model.d_model, 64);
  EXPECT_EQ(r.model.head_dim, 32);
  EXPECT_TRUE(r.model.qk_norm);
  EXPECT_EQ(r.model.max_seq_len, 64);  // may differ from the checkpoint's
  EXPECT_EQ(r.data.tokenizer, "byte");  // no tokenizer.json in the directory
  auto model = recipes::build_model(r);
  model->eval();
  auto reference = load_safetensors(src / "reference.safetensors");
  EXPECT_LE(max_diff(logits_of(model, reference.tensors.at("ids")), reference.tensors.at("logits")), 1e-4);

  EXPECT_BRIGADE_ERROR(recipes::load_recipe(recipe, {"model.d_model=128"}), "model.d_model = 128, but model.init_from's");
  EXPECT_BRIGADE_ERROR(recipes::load_recipe(recipe, {"model.init_from=" + (dir / "nope").string()}),
                       "is neither a directory nor a .gguf file");
  const std::string shipped = std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-dense.yaml";
  EXPECT_BRIGADE_ERROR(recipes::load_recipe(shipped, {"model.init_from=" + src.string()}),
                       "tiny-dense.yaml:7: model.vocab_size = 264, but model.init_from's");

  // Train from it, export, and have transformers read the trained weights.
  const fs::path run = dir / "run";
  auto train = testing::run_brigade("train " + recipe.string() + " --run-dir " + run.string());
  ASSERT_EQ(train.exit_code, 0) << train.output;
  const fs::path out = dir / "export";
  auto exp = testing::run_brigade("export --checkpoint " + run.string() + " --format hf --out " + out.string());
  ASSERT_EQ(exp.exit_code, 0) << exp.output;
  EXPECT_NE(exp.output.find("exported qwen3 model"), std::string::npos) << exp.output;
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"})
    EXPECT_TRUE(fs::exists(out / f)) << f;
  auto again = testing::run_brigade("export --checkpoint " + run.string() + " --format hf --out " + out.string());
  EXPECT_NE(again.exit_code, 0);
  EXPECT_NE(again.output.find("already exists"), std::string::npos) << again.output;

  RUN_REFERENCE("logits " + out.string() + " " + (src / "reference.safetensors").string() + " " +
                (dir / "trained.safetensors").string());
  auto trained = launch::load_model(run, {});
  trained.model->eval();
  const auto ours = logits_of(trained.model, reference.tensors.at("ids"));
  EXPECT_LE(max_diff(load_safetensors(dir / "trained.safetensors").tensors.at("logits"), ours), 1e-4);
  EXPECT_GT(max_diff(ours, reference.tensors.at("logits")), 1e-3);  // training moved the weights

  // Resuming restores the run's own checkpoint: the Hugging Face weights are not read
  // again (here they are unreadable), only config.json is.
  write_file_atomic(src / "model.safetensors", "not a safetensors file");
  auto resumed = testing::run_brigade("train " + recipe.string() + " --resume --set trainer.max_steps=5 --run-dir " +
                                      run.string());
  EXPECT_EQ(resumed.exit_code, 0) << resumed.output;
}

// tiny-deepseek-v3 shrunk, with `depth` MTP modules and random (non-initial) weights.
TransformerOptions tiny_deepseek_v3(int64_t depth) {
  const std::string recipe = std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-deepseek-v3.yaml";
  auto o = recipes::load_recipe(recipe, {"model.d_model=32", "model.n_layers=2", "model.d_ff=64",
                                         "model.moe.expert_d_ff=16", "model.max_seq_len=64", "data.seq_len=32"})
               .model;
  o.mtp.depth = depth;
  return o;
}

NamedTensors weights_of(const Transformer& model) {
  NamedTensors out;
  for (const auto& [name, t] : model->state_dict()) out.emplace_back(name, t.detach().clone());
  return out;
}

// DeepSeek-V3 stores MTP module k as layer num_hidden_layers + k with its own copies
// of the embedding and head; brigade writes that layout and reads it back, and a
// recipe may keep fewer modules or add fresh ones.
TEST(HfCheckpoint, DeepseekV3MtpLayersRoundTripInDeepseeksLayout) {
  TempDir dir;
  torch::manual_seed(21);
  Transformer model(tiny_deepseek_v3(1));
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.add_(0.05 * torch::randn_like(p));
    model->named_buffers().find("mtp.0.block.mlp.gate.e_score_correction_bias")->normal_();
  }
  const fs::path out = dir / "hf";
  fs::create_directories(out);
  save_hf_checkpoint(*model, out, "float32", 1ull << 30);
  const auto config = nlohmann::json::parse(read_file(out / "config.json"));
  EXPECT_EQ(config["num_nextn_predict_layers"], 1);
  EXPECT_EQ(config["num_hidden_layers"], 2);
  auto file = load_safetensors(out / "model.safetensors");
  for (const char* name : {"model.layers.2.enorm.weight", "model.layers.2.hnorm.weight", "model.layers.2.eh_proj.weight",
                           "model.layers.2.shared_head.norm.weight", "model.layers.2.shared_head.head.weight",
                           "model.layers.2.embed_tokens.weight", "model.layers.2.input_layernorm.weight",
                           "model.layers.2.self_attn.kv_a_proj_with_mqa.weight", "model.layers.2.mlp.gate.weight",
                           "model.layers.2.mlp.gate.e_score_correction_bias",
                           "model.layers.2.mlp.experts.7.down_proj.weight", "model.layers.2.mlp.shared_experts.up_proj.weight"})
    EXPECT_TRUE(file.tensors.contains(name)) << name;
  for (const auto& [name, t] : file.tensors) EXPECT_FALSE(name.starts_with("mtp.")) << name;
  EXPECT_TRUE(torch::equal(file.tensors.at("model.layers.2.embed_tokens.weight"), model->embed_tokens->weight));

  const HfConfig read = read_hf_config(out / "config.json");
  EXPECT_EQ(read.options.mtp.depth, 1);
  torch::manual_seed(99);
  Transformer back(read.options);
  load_hf_weights(*back, out);
  const auto original = weights_of(model);
  auto loaded = back->state_dict();
  ASSERT_EQ(loaded.size(), original.size());
  for (size_t i = 0; i < original.size(); ++i) {
    EXPECT_EQ(loaded[i].first, original[i].first);
    EXPECT_TRUE(torch::equal(loaded[i].second, original[i].second)) << original[i].first;
  }

  // Fewer modules: the checkpoint's extra layer is left out. More: the new one keeps its initialisation.
  torch::manual_seed(5);
  Transformer none(tiny_deepseek_v3(0));
  load_hf_weights(*none, out);
  EXPECT_TRUE(torch::equal(none->embed_tokens->weight, model->embed_tokens->weight));
  torch::manual_seed(5);
  Transformer two(tiny_deepseek_v3(2));
  const auto fresh = weights_of(two);
  load_hf_weights(*two, out);
  const auto two_loaded = two->state_dict();
  for (size_t i = 0; i < fresh.size(); ++i) {
    const auto& name = fresh[i].first;
    if (name.starts_with("mtp.1.")) EXPECT_TRUE(torch::equal(two_loaded[i].second, fresh[i].second)) << name;
    if (name.starts_with("mtp.0.")) EXPECT_FALSE(torch::equal(two_loaded[i].second, fresh[i].second)) << name;
  }

  // brigade shares the embedding: a copy that differs is refused, naming the tensor.
  NamedTensors edited;  // copies: the file is mapped, and is about to be rewritten
  for (const auto& [name, t] : file.tensors)
    edited.emplace_back(name, name == "model.layers.2.embed_tokens.weight" ? t + 1 : t.clone());
  save_safetensors(out / "model.safetensors", edited);
  EXPECT_BRIGADE_ERROR(load_hf_weights(*back, out), "'model.layers.2.embed_tokens.weight' is not a copy of");
  torch::manual_seed(5);
  Transformer dropped(tiny_deepseek_v3(0));
  load_hf_weights(*dropped, out);  // without MTP modules the copy is not read
}

// DeepSeek's released checkpoints are FP8: an F8_E4M3 weight and a float32
// weight_scale_inv per block (128x128 there, 24x24 here so the tiny matrices hold
// several blocks, some partial). They load as the dequantized float32 weights.
TEST(HfCheckpoint, DeepseekFp8BlockScaledCheckpointIsDequantized) {
  TempDir dir;
  torch::manual_seed(3);
  Transformer model(tiny_deepseek_v3(0));
  const fs::path plain = dir / "plain", fp8 = dir / "fp8";
  fs::create_directories(plain);
  fs::create_directories(fp8);
  save_hf_checkpoint(*model, fp8, "float32", 1ull << 30);
  auto file = load_safetensors(fp8 / "model.safetensors");
  for (auto& [name, t] : file.tensors) t = t.clone();  // the mapped file is rewritten below
  const int64_t block = 24;
  NamedTensors quantized, dequantized;
  int64_t scaled = 0;
  for (const auto& [name, w] : file.tensors) {
    const bool quantize = w.dim() == 2 && name.ends_with("proj.weight");
    if (!quantize) {
      quantized.emplace_back(name, w);
      dequantized.emplace_back(name, w);
      continue;
    }
    const int64_t rows = (w.size(0) + block - 1) / block, cols = (w.size(1) + block - 1) / block;
    auto q = torch::empty(w.sizes(), torch::kFloat8_e4m3fn);
    auto scale = torch::empty({rows, cols});
    auto back = torch::empty(w.sizes());
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t h = std::min(block, w.size(0) - r * block), wd = std::min(block, w.size(1) - c * block);
        auto tile = w.narrow(0, r * block, h).narrow(1, c * block, wd);
        const float s = tile.abs().max().item<float>() / 448.0f;
        scale[r][c] = s;
        auto qt = (tile / s).to(torch::kFloat8_e4m3fn);
        q.narrow(0, r * block, h).narrow(1, c * block, wd).copy_(qt);
        back.narrow(0, r * block, h).narrow(1, c * block, wd).copy_(qt.to(torch::kFloat) * s);
      }
    }
    scaled += (w.size(0) % block != 0 || w.size(1) % block != 0) ? 1 : 0;
    quantized.emplace_back(name, q);
    quantized.emplace_back(name + "_scale_inv", scale);
    dequantized.emplace_back(name, back);
  }
  EXPECT_GT(scaled, 0) << "no weight has a partial block";
  save_safetensors(fp8 / "model.safetensors", quantized);
  save_safetensors(plain / "model.safetensors", dequantized);
  auto config = nlohmann::json::parse(read_file(fp8 / "config.json"));
  fs::copy_file(fp8 / "config.json", plain / "config.json");
  config["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                                   {"weight_block_size", {block, block}}};
  write_file_atomic(fp8 / "config.json", config.dump(2));

  Transformer expected = import_dir(plain), got = import_dir(fp8);
  const auto a = expected->state_dict(), b = got->state_dict();
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
  const auto ids = torch::randint(0, 261, {1, 12}, torch::kLong);
  const double fp8_error = max_diff(logits_of(got, ids), logits_of(model, ids));
  EXPECT_GT(fp8_error, 0.0);  // the weights really went through FP8
  std::cout << "[ measured ] tiny deepseek_v3 through 24x24 block FP8: max|logit diff| " << fp8_error << "\n";

  // A scale of the wrong shape, and a quantization brigade does not read.
  auto bad = quantized;
  for (auto& [name, t] : bad)
    if (name == "model.layers.0.self_attn.q_a_proj.weight_scale_inv") t = torch::ones({1, 1});
  save_safetensors(fp8 / "model.safetensors", bad);
  EXPECT_BRIGADE_ERROR(import_dir(fp8), "'model.layers.0.self_attn.q_a_proj.weight_scale_inv' has shape [1, 1]");
  config["quantization_config"]["quant_method"] = "gptq";
  write_file_atomic(fp8 / "config.json", config.dump(2));
  EXPECT_BRIGADE_ERROR(import_dir(fp8), "quantization_config.quant_method' is 'gptq'");
}

// DeepSeek's FP8 weights survive the trip: dequantized on import, then quantized by
// brigade's own blockwise recipe (128x128 weight blocks, scale = amax / 448), they give
// back the checkpoint's FP8 codes exactly, and its scales to within a rounding of
// amax / 448. So an FP8 recipe starts from the released FP8 weights, not from a
// re-rounded copy of them.
TEST(HfCheckpoint, DeepseekFp8WeightsRequantizeToTheSameCodes) {
  torch::manual_seed(8);
  const auto w = torch::randn({256, 320}) * 0.02;  // a partial last column block
  const int64_t rows = 2, cols = 3;
  auto scale = torch::empty({rows, cols});
  auto codes = torch::empty({256, 320}, torch::kFloat8_e4m3fn);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {  // DeepSeek's quantizer: amax / 448 per block
      const int64_t h = std::min<int64_t>(128, 256 - r * 128), wd = std::min<int64_t>(128, 320 - c * 128);
      auto tile = w.narrow(0, r * 128, h).narrow(1, c * 128, wd);
      const float s = tile.abs().max().item<float>() / 448.0f;
      scale[r][c] = s;
      codes.narrow(0, r * 128, h).narrow(1, c * 128, wd).copy_((tile / s).to(torch::kFloat8_e4m3fn));
    }
  }
  const auto dequantized = dequantize_block_scaled(codes, scale, {128, 128});
  precision::QuantizeOptions options;
  options.mode = precision::ScalingMode::kBlock128x128;
  const auto again = precision::quantize(dequantized, options);
  const auto released = codes.view(torch::kUInt8);
  EXPECT_TRUE(torch::equal(again.data, released)) << "codes differ: "
                                                   << again.data.ne(released).sum().item<int64_t>();
  EXPECT_LE(((again.scales - scale).abs() / scale).max().item<double>(), 2.4e-7);
}

// The shipped DeepSeek-V3-shaped recipe (MLA, shared + routed experts, sigmoid
// routing with its aux-loss-free bias) trained a few steps, shrunk, through the CLI:
// the export is a deepseek_v3 checkpoint whose logits transformers reproduces, and
// generation (the absorbed MLA cache) runs.
TEST(HfCheckpoint, TrainedTinyDeepseekV3ExportsToTransformers) {
  TempDir dir;
  const std::string recipe = std::string(BRIGADE_SOURCE_DIR) + "/recipes/tiny-deepseek-v3.yaml";
  const std::string shrink =
      " --set model.d_model=32 --set model.n_layers=2 --set model.d_ff=64 --set model.max_seq_len=64"
      " --set model.moe.expert_d_ff=16 --set data.seq_len=32 --set data.synthetic.num_problems=200"
      " --set data.synthetic.eval_problems=20 --set trainer.max_steps=4 --set trainer.warmup_steps=1"
      " --set trainer.micro_batch_size=2 --set trainer.lr=3.0e-3 --set trainer.eval_every=0";
  const fs::path run = dir / "run";
  auto train = testing::run_brigade("train " + recipe + shrink + " --run-dir " + run.string());
  ASSERT_EQ(train.exit_code, 0) << train.output;
  const fs::path out = dir / "export";
  auto exp = testing::run_brigade("export --checkpoint " + run.string() + " --format hf --out " + out.string());
  ASSERT_EQ(exp.exit_code, 0) << exp.output;
  EXPECT_NE(exp.output.find("exported deepseek_v3 model"), std::string::npos) << exp.output;

  // The recipe trains with FP8 GEMMs; the exported weights are the FP32 masters, so
  // compare with brigade computing in full precision too.
  auto trained = launch::load_model(run, {"precision.fp8_recipe=none"});
  trained.model->eval();
  EXPECT_GT(trained.model->options().mtp.depth, 0);
  const auto exported = load_safetensors_dir(out).tensors;
  EXPECT_TRUE(exported.contains("model.layers.2.eh_proj.weight")) << "the MTP module was not exported";
  auto bias = trained.model->named_buffers().find("layers.1.mlp.gate.e_score_correction_bias");
  ASSERT_NE(bias, nullptr);
  EXPECT_GT(bias->abs().max().item<double>(), 0.0) << "balancing never moved the bias: its export is untested";
  torch::manual_seed(3);
  const auto ids = torch::randint(0, 261, {2, 20}, torch::kLong);
  save_safetensors(dir / "ids.safetensors", {{"ids", ids}});
  RUN_REFERENCE("logits " + out.string() + " " + (dir / "ids.safetensors").string() + " " +
                (dir / "back.safetensors").string());
  const double diff = max_diff(load_safetensors(dir / "back.safetensors").tensors.at("logits"),
                               logits_of(trained.model, ids));
  EXPECT_LE(diff, 1e-4);
  std::cout << "[ measured ] trained tiny-deepseek-v3 export: max|diff| vs transformers " << diff << "\n";

  auto gen = testing::run_brigade("generate --checkpoint " + run.string() + " --prompt 'Q: 1+2=' --max-new-tokens 8");
  EXPECT_EQ(gen.exit_code, 0) << gen.output;
  auto spec = testing::run_brigade("generate --checkpoint " + run.string() +
                                   " --prompt 'Q: 1+2=' --max-new-tokens 8 --speculative mtp");
  EXPECT_EQ(spec.exit_code, 0) << spec.output;
  EXPECT_NE(spec.output.find("speculative mtp: "), std::string::npos) << spec.output;
  auto text_of = [](const std::string& output) {  // the line with the prompt and its continuation
    const auto at = output.find("Q: 1+2=");
    return at == std::string::npos ? std::string() : output.substr(at, output.find('\n', at) - at);
  };
  EXPECT_FALSE(text_of(gen.output).empty()) << gen.output;
  EXPECT_EQ(text_of(spec.output), text_of(gen.output));
  // The export keeps the MTP module.
  EXPECT_EQ(read_hf_config(out / "config.json").options.mtp.depth, 1);

  // llama.cpp's deepseek2 runs the same model (without the MTP module): greedy equal.
  if (!gguf_testing::have_llama_cpp()) GTEST_SKIP() << "llama-cpp-python is not installed in .venv";
  const fs::path gguf = dir / "model.gguf";
  auto to_gguf = testing::run_brigade("export --checkpoint " + run.string() + " --format gguf --quant f32 --out " +
                                      gguf.string());
  ASSERT_EQ(to_gguf.exit_code, 0) << to_gguf.output;
  auto tokenizer = data::make_tokenizer("byte");
  std::vector<int64_t> prompt{tokenizer->bos_id()};
  for (int64_t id : tokenizer->encode("Problem: 12+35")) prompt.push_back(id);
  SamplingOptions greedy;
  greedy.max_new_tokens = 24;
  const auto ours_greedy = generate(trained.model, prompt, greedy).tokens;
  write_file_atomic(dir / "job.json", nlohmann::json::array({{{"path", gguf.string()}, {"n_ctx", 64}, {"prompt", prompt},
                                                               {"new_tokens", 24}}}).dump());
  const gguf_testing::OneTorchThread one_thread;
  auto llama = gguf_testing::run_check("llama", dir / "job.json");
  ASSERT_EQ(llama.exit_code, 0) << llama.output;
  EXPECT_EQ(gguf_testing::last_json_line(llama.output)[0]["greedy"].get<std::vector<int64_t>>(), ours_greedy);
}

}  // namespace
}  // namespace brigade::model
