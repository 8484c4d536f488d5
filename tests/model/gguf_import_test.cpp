// GGUF back into brigade: export -> read_gguf_model_info / load_gguf_weights gives the
// same model (exactly for F32, within the quantization for Q8_0), and
// model.init_from accepts a .gguf file.
#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "core/fs.h"
#include "data/bpe.h"
#include "model/gguf.h"
#include "model/gguf_export.h"
#include "model/gguf_import.h"
#include "recipes/build.h"
#include "recipes/recipe.h"
#include "tests/model/gguf_testing.h"
#include "tests/testing.h"

namespace brigade::model {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

TransformerOptions options_for(HfFamily family, bool tied) {
  TransformerOptions o;
  o.vocab_size = 264;
  o.d_model = 64;
  o.n_layers = 2;
  o.n_heads = 4;
  o.n_kv_heads = 2;
  o.head_dim = family == HfFamily::kQwen3 ? 32 : 0;  // head_dim != d_model / heads
  o.d_ff = 96;
  o.max_seq_len = 128;
  o.rope_theta = 50000.0;
  o.norm_eps = 1e-6;
  o.tie_embeddings = tied;
  o.qkv_bias = family == HfFamily::kQwen2;
  o.qk_norm = family == HfFamily::kQwen3 || family == HfFamily::kQwen3Moe;
  if (family == HfFamily::kDeepseekV3 || family == HfFamily::kDeepseekV2) {  // as llama.cpp's deepseek2
    const bool v3 = family == HfFamily::kDeepseekV3;
    o = gguf_testing::deepseek_options(v3);
    o.max_seq_len = 128;
    o.rope_theta = 50000.0;
    o.tie_embeddings = tied;
    o.init_std = TransformerOptions{}.init_std;
    o.moe.bias_update_rate = v3 ? 0.001 : 0.0;
    if (v3) {  // DeepSeek-V3's YaRN form
      o.rope_scaling.type = RopeScalingType::kYarn;
      o.rope_scaling.factor = 4.0;
      o.rope_scaling.original_max_seq_len = 32;
      o.rope_scaling.mscale = o.rope_scaling.mscale_all_dim = 0.8;
    }
  }
  if (family == HfFamily::kQwen3Moe) {
    o.moe.num_experts = 4;
    o.moe.top_k = 2;
    o.moe.expert_d_ff = 32;
    o.moe.num_shared_experts = 0;
    o.moe.score_function = moe::ScoreFunction::kSoftmax;
    o.moe.normalize_topk = true;
    o.moe.bias_update_rate = 0.0;
  }
  return o;
}

class GgufImport : public ::testing::TestWithParam<std::tuple<HfFamily, bool>> {};

TEST_P(GgufImport, ExportThenImportGivesTheSameModel) {
  const auto [family, tied] = GetParam();
  TempDir dir;
  const TransformerOptions o = options_for(family, tied);
  Transformer original = gguf_testing::make_model(o, 11);
  if (o.moe.score_function == moe::ScoreFunction::kSigmoid && o.moe.enabled()) {
    torch::NoGradGuard no_grad;
    for (auto& [name, t] : original->state_dict())
      if (name.ends_with("e_score_correction_bias")) t.normal_(0.0, 0.5);  // exp_probs_b must travel
  }
  const auto tokenizer = data::BpeTokenizer::from_byte_tokenizer();
  const auto ids = torch::randint(0, 261, {2, 20}, torch::TensorOptions().dtype(torch::kLong));
  torch::NoGradGuard no_grad;
  const auto expected = original->forward(ids);
  for (auto quant : {GgufQuant::kF32, GgufQuant::kQ8_0}) {
    const fs::path file = dir / ("m-" + gguf_quant_name(quant) + ".gguf");
    export_gguf(original, family, tokenizer, quant, file, "m");
    const GgufModelInfo info = read_gguf_model_info(file);
    EXPECT_EQ(info.family, family);
    EXPECT_TRUE(info.byte_vocabulary);
    for (auto [got, want] : {std::pair{info.options.d_model, o.d_model}, {info.options.n_layers, o.n_layers},
                             {info.options.n_heads, o.n_heads}, {info.options.kv_heads(), o.kv_heads()},
                             {info.options.head_size(), o.head_size()}, {info.options.ff_size(), o.ff_size()},
                             {info.options.vocab_size, o.vocab_size}, {info.options.max_seq_len, o.max_seq_len},
                             {info.options.moe.num_experts, o.moe.num_experts}, {info.options.moe.top_k, o.moe.top_k}})
      EXPECT_EQ(got, want);
    EXPECT_EQ(info.options.tie_embeddings, tied);
    EXPECT_EQ(info.options.qkv_bias, o.qkv_bias);
    EXPECT_EQ(info.options.qk_norm, o.qk_norm);
    EXPECT_DOUBLE_EQ(info.options.rope_theta, o.rope_theta);
    EXPECT_NEAR(info.options.norm_eps, o.norm_eps, 1e-12);
    const auto& io = info.options;
    EXPECT_EQ(io.attention, o.attention);
    EXPECT_EQ(io.mla.q_lora_rank, o.mla.q_lora_rank);
    EXPECT_EQ(io.mla.qk_nope_head_dim, o.mla.qk_nope_head_dim);
    EXPECT_EQ(io.moe.num_groups, o.moe.num_groups);
    EXPECT_EQ(io.moe.topk_group, o.moe.topk_group);
    EXPECT_EQ(io.moe.first_k_dense, o.moe.first_k_dense);
    EXPECT_EQ(io.moe.num_shared_experts, o.moe.num_shared_experts);
    EXPECT_EQ(io.moe.score_function, o.moe.score_function);
    EXPECT_EQ(io.moe.normalize_topk, o.moe.normalize_topk);
    EXPECT_NEAR(io.moe.routed_scaling, o.moe.routed_scaling, 1e-6);
    EXPECT_EQ(io.rope_scaling.type, o.rope_scaling.type);
    EXPECT_NEAR(io.rope_scaling.factor, o.rope_scaling.factor, 1e-6);
    EXPECT_NEAR(io.rope_scaling.mscale_all_dim, o.rope_scaling.mscale_all_dim, 1e-6);
    EXPECT_EQ(io.rope_scaling.original_max_seq_len, o.rope_scaling.original_max_seq_len);

    torch::manual_seed(0);
    Transformer imported(info.options);
    load_gguf_weights(*imported, file);
    imported->eval();
    const double diff = (imported->forward(ids) - expected).abs().max().item<double>();
    if (quant == GgufQuant::kF32) {
      for (const auto& [name, t] : original->state_dict()) {
        bool found = false;
        for (const auto& [n2, t2] : imported->state_dict())
          if (n2 == name) {
            found = true;
            EXPECT_TRUE(torch::equal(t, t2)) << name;
          }
        EXPECT_TRUE(found) << name;
      }
      EXPECT_EQ(diff, 0.0);
    } else {
      EXPECT_LT(diff, 0.05 * expected.abs().max().item<double>()) << "q8_0 import";
      std::cout << "[ measured ] " << family_name(family) << (tied ? " tied" : "") << " q8_0 import max|logit diff| "
                << diff << " (max |logit| " << expected.abs().max().item<double>() << ")\n";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Families, GgufImport,
                         ::testing::Values(std::tuple{HfFamily::kLlama, false}, std::tuple{HfFamily::kLlama, true},
                                           std::tuple{HfFamily::kQwen2, true}, std::tuple{HfFamily::kQwen3, false},
                                           std::tuple{HfFamily::kQwen3Moe, true},
                                           std::tuple{HfFamily::kDeepseekV3, false},
                                           std::tuple{HfFamily::kDeepseekV2, true}),
                         [](const auto& info) {
                           return family_name(std::get<0>(info.param)) + (std::get<1>(info.param) ? "Tied" : "Untied");
                         });

// Files quantized by llama.cpp's own quantizer to the usual mixes (what people
// download: Q4_K_M, Q5_K_M, Q6_K) import: the K-quant blocks dequantize (bit for bit
// as gguf-py, GgufFormat.DequantizesEveryBlockTypeAsGgufPyBitForBit) and the model
// stays close to the float32 original.
TEST(GgufImport, LlamaCppQuantizedMixesImport) {
  if (!gguf_testing::have_llama_cpp()) GTEST_SKIP() << "llama-cpp-python is not installed in .venv";
  TempDir dir;
  TransformerOptions o = options_for(HfFamily::kLlama, false);
  o.d_model = 256;  // rows of 256: the K-quant super-block
  o.d_ff = 512;
  o.n_heads = 4;
  o.n_kv_heads = 2;
  o.init_std = 0.05;
  Transformer original = gguf_testing::make_model(o, 21);
  const auto tokenizer = data::BpeTokenizer::from_byte_tokenizer();
  export_gguf(original, HfFamily::kLlama, tokenizer, GgufQuant::kF32, dir / "f32.gguf", "m");
  nlohmann::json job = nlohmann::json::array();
  // Bounds: set against llama.cpp's own rounding of these Gaussian weights, which the
  // test prints (relative RMS over every matrix).
  struct Mix {
    std::string name, type;
    double max_error, min_agreement;
  };
  const std::vector<Mix> mixes = {{"Q4_K_M", "Q4_K", 0.45, 0.6}, {"Q5_K_M", "Q5_K", 0.3, 0.75}, {"Q6_K", "Q6_K", 0.15, 0.85}};
  for (const auto& m : mixes)
    job.push_back({{"in", (dir / "f32.gguf").string()}, {"out", (dir / (m.name + ".gguf")).string()}, {"ftype", m.name}});
  write_file_atomic(dir / "job.json", job.dump());
  auto run = gguf_testing::run_check("llamaquant", dir / "job.json");
  if (run.exit_code == 3) GTEST_SKIP() << run.output;
  ASSERT_EQ(run.exit_code, 0) << run.output;
  const auto results = gguf_testing::last_json_line(run.output);
  const auto ids = torch::randint(0, 261, {2, 32}, torch::TensorOptions().dtype(torch::kLong));
  torch::NoGradGuard no_grad;
  const auto expected = original->forward(ids);
  const double scale = expected.abs().max().item<double>();
  double previous = 1e9;
  for (size_t i = 0; i < mixes.size(); ++i) {
    const std::string& mix = mixes[i].name;
    const std::string& type = mixes[i].type;
    std::set<std::string> types;
    for (const auto& [name, t] : results[i]["types"].items()) types.insert(t.get<std::string>());
    EXPECT_TRUE(types.contains(type)) << mix << " holds no " << type << " tensor";
    const fs::path file = dir / (mix + ".gguf");
    const GgufModelInfo info = read_gguf_model_info(file);
    torch::manual_seed(0);
    Transformer imported(info.options);
    load_gguf_weights(*imported, file);
    imported->eval();
    double diff2 = 0, norm2 = 0;
    const auto original_state = original->state_dict();
    const auto imported_state = imported->state_dict();
    for (size_t t = 0; t < original_state.size(); ++t) {
      if (original_state[t].second.dim() < 2) continue;
      diff2 += (imported_state[t].second - original_state[t].second).pow(2).sum().item<double>();
      norm2 += original_state[t].second.pow(2).sum().item<double>();
    }
    const double rounding = std::sqrt(diff2 / norm2);
    const auto logits = imported->forward(ids);
    const double error = (logits - expected).abs().max().item<double>() / scale;
    const double agree = logits.argmax(-1).eq(expected.argmax(-1)).to(torch::kDouble).mean().item<double>();
    std::string list;
    for (const auto& t : types) list += t + " ";
    std::cout << "[ measured ] " << mix << " (" << list << "): weights rounded by " << rounding
              << " RMS; max|logit diff| / max|logit| " << error << ", top-1 agreement " << agree << "\n";
    EXPECT_GT(rounding, 0.0) << mix << ": the weights did not go through the quantizer";
    EXPECT_LT(error, mixes[i].max_error) << mix;
    EXPECT_GE(agree, mixes[i].min_agreement) << mix;
    EXPECT_LT(error, previous * 1.5) << mix << " is not closer than the coarser mix";  // more bits, less error
    previous = error;

    // brigade's own export at the mix: every tensor of llama.cpp's type, with the same values.
    std::string lower = mix;
    for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    const fs::path ours = dir / ("brigade-" + lower + ".gguf");
    export_gguf(original, HfFamily::kLlama, tokenizer, parse_gguf_quant(lower), ours, "m");
    const GgufReader mine(ours), theirs(file);
    int64_t tensors = 0, same_type = 0, same_values = 0;
    for (const auto& t : theirs.file().tensors) {
      ++tensors;
      const auto& info = mine.info(t.name);
      same_type += info.type == t.type ? 1 : 0;
      same_values += torch::equal(mine.tensor(t.name), theirs.tensor(t.name)) ? 1 : 0;
      EXPECT_EQ(gguf::ggml_type_name(info.type), gguf::ggml_type_name(t.type)) << mix << " " << t.name;
    }
    EXPECT_EQ(mine.file().tensors.size(), theirs.file().tensors.size()) << mix;
    EXPECT_EQ(same_values, tensors) << mix << ": brigade's quantized values differ from llama.cpp's";
    EXPECT_EQ(mine.metadata("general.file_type").as_int("t"), theirs.metadata("general.file_type").as_int("t")) << mix;
    std::cout << "[ measured ] brigade --quant " << lower << ": " << same_type << " of " << tensors
              << " tensors of llama.cpp's type, " << same_values << " with identical values\n";
  }
}

// A deepseek2 file without one of its MLA tensors, or in the older attn_kv_b form:
// one line naming the file and the tensor or key.
TEST(GgufImport, BadDeepseek2FilesNameTheFileAndField) {
  TempDir dir;
  const TransformerOptions o = options_for(HfFamily::kDeepseekV3, false);
  Transformer original = gguf_testing::make_model(o, 12);
  const auto tokenizer = data::BpeTokenizer::from_byte_tokenizer();
  const fs::path good = dir / "good.gguf";
  export_gguf(original, HfFamily::kDeepseekV3, tokenizer, GgufQuant::kF32, good, "m");
  // Rewrites the file without one tensor or one metadata key.
  auto without = [&](const std::string& tensor, const std::string& key, const fs::path& out) {
    GgufReader reader(good);
    GgufWriter writer;
    for (const auto& [k, v] : reader.file().metadata)
      if (k != key) writer.set(k, v);
    for (const auto& t : reader.file().tensors)
      if (t.name != tensor) writer.add_tensor(t.name, reader.tensor(t.name), t.type);
    writer.write(out);
  };
  const fs::path no_k_b = dir / "no_k_b.gguf", legacy = dir / "legacy.gguf";
  without("blk.1.attn_k_b.weight", "", no_k_b);
  const GgufModelInfo info = read_gguf_model_info(no_k_b);
  Transformer model(info.options);
  EXPECT_BRIGADE_ERROR(load_gguf_weights(*model, no_k_b), "no_k_b.gguf: no tensor 'blk.1.attn_k_b.weight'");
  without("", "deepseek2.attention.key_length_mla", legacy);
  EXPECT_BRIGADE_ERROR(read_gguf_model_info(legacy), "legacy.gguf: deepseek2 without deepseek2.attention.key_length_mla");
}

// A GGUF's byte-level BPE vocabulary is rebuilt from tokenizer.ggml.*: BPE
// tokenizers trained with the Qwen2, Llama 3 and GPT-2 split regexes, exported with a
// model, come back encoding multilingual text to the same ids as the original and as
// llama.cpp's own tokenizer on the file; a recipe starting from the file needs no
// tokenizer.json.
TEST(GgufTokenizer, RebuiltFromTheFileEncodesAsTheOriginalAndAsLlamaCpp) {
  TempDir dir;
  const std::vector<std::string> corpus = {
      "The quick brown fox jumps over the lazy dog. It's 2026, isn't it?",
      "Über die Brücke gehen Müller und Schäfer; naïve café déjà vu.",
      "深度求索发布了新的模型。机器学习很有趣！", "日本語のテキストも少し。カタカナとひらがな。",
      "Привет, мир! Это тест токенизатора.", "def f(x):\n    return x ** 2  # comment\n\n\tdone",
      "Numbers 12345 and 3.14159 and 1,000,000; emoji 🚀🔥 ok", "  leading spaces\nand\r\nline endings   "};
  const std::vector<std::string> specials = {"<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"};
  const std::vector<std::pair<std::string, std::string>> families = {
      {"qwen2", ""}, {"llama-bpe", data::pre_tokenizer_pattern("llama-bpe")}, {"gpt-2", data::pre_tokenizer_pattern("gpt2")}};
  nlohmann::json job = nlohmann::json::array();
  std::vector<data::BpeTokenizer> originals;
  for (const auto& [pre, pattern] : families) {
    std::vector<std::string> big;
    for (int i = 0; i < 20; ++i) big.insert(big.end(), corpus.begin(), corpus.end());
    auto tokenizer = data::train_bpe(big, 600, specials, pattern);
    TransformerOptions o = options_for(HfFamily::kQwen3, false);
    o.vocab_size = (tokenizer.vocab_size() + 7) / 8 * 8;
    Transformer model = gguf_testing::make_model(o, 3);
    const fs::path file = dir / (pre + ".gguf");
    export_gguf(model, HfFamily::kQwen3, tokenizer, GgufQuant::kF32, file, "m");
    GgufReader reader(file);
    EXPECT_EQ(reader.metadata("tokenizer.ggml.pre").as_string("p"), pre);
    EXPECT_EQ(reader.metadata("tokenizer.ggml.eot_token_id").as_int("e"), *tokenizer.special_id("<|im_end|>"));
    EXPECT_FALSE(reader.has("tokenizer.ggml.eom_token_id"));  // no <|eom_id|> in this vocabulary
    const auto rebuilt = read_gguf_tokenizer(file);
    EXPECT_EQ(rebuilt.vocab_size(), o.vocab_size) << pre;  // the file pads the list to the embedding's rows
    for (const auto& text : corpus) {
      EXPECT_EQ(rebuilt.encode(text), tokenizer.encode(text)) << pre << ": " << text;
      const auto ids = rebuilt.encode(text);
      EXPECT_EQ(rebuilt.decode(ids), text) << pre;
    }
    const std::string chat = "<|im_start|>user\nhello<|im_end|>";
    EXPECT_EQ(rebuilt.encode(chat, true), tokenizer.encode(chat, true)) << pre;
    EXPECT_EQ(rebuilt.special_id("<|bos|>"), tokenizer.special_id("<|bos|>")) << pre;
    EXPECT_EQ(rebuilt.special_id("<|eos|>"), tokenizer.special_id("<|eos|>")) << pre;
    job.push_back({{"path", file.string()}, {"texts", corpus}});
    originals.push_back(tokenizer);
  }
  // The same vocabulary under other pre-tokenizers (DeepSeek V3's three splits, the R1
  // Qwen distills' Qwen2 split, DeepSeek LLM / Coder, SmolLM, Falcon, Mistral's tekken,
  // ...): brigade and llama.cpp must split it alike.
  auto rewrite = [&](const std::string& key, const std::string& value, const fs::path& out) {
    GgufReader reader(dir / "qwen2.gguf");
    GgufWriter writer;
    for (const auto& [k, v] : reader.file().metadata) writer.set(k, k == key ? gguf::Value(gguf::Scalar(value)) : v);
    for (const auto& t : reader.file().tensors) writer.add_tensor(t.name, reader.tensor(t.name), t.type);
    writer.write(out);
  };
  std::vector<std::string> names = {"qwen2", "llama-bpe", "gpt-2"};
  for (const char* pre : {"deepseek-v3", "deepseek-r1-qwen", "deepseek-llm", "deepseek-coder", "smollm", "falcon",
                          "tekken", "viking", "bloom", "chatglm-bpe", "dbrx"}) {
    rewrite("tokenizer.ggml.pre", pre, dir / (std::string(pre) + ".gguf"));
    job.push_back({{"path", (dir / (std::string(pre) + ".gguf")).string()}, {"texts", corpus}});
    names.push_back(pre);
  }
  {  // the DeepSeek-V3 splits cut this vocabulary's words differently from Qwen2's somewhere
    const auto v3 = read_gguf_tokenizer(dir / "deepseek-v3.gguf");
    int differ = 0;
    for (const auto& text : corpus) differ += v3.encode(text) != originals[0].encode(text) ? 1 : 0;
    EXPECT_GT(differ, 0) << "the deepseek-v3 splits are not exercised by the corpus";
    std::cout << "[ measured ] deepseek-v3 splits change " << differ << " of " << corpus.size() << " texts\n";
  }
  if (gguf_testing::have_llama_cpp()) {
    write_file_atomic(dir / "job.json", job.dump());
    auto run = gguf_testing::run_check("tokenize", dir / "job.json");
    ASSERT_EQ(run.exit_code, 0) << run.output;
    const auto theirs = gguf_testing::last_json_line(run.output);
    ASSERT_EQ(theirs.size(), names.size());
    for (size_t f = 0; f < names.size(); ++f) {
      const auto rebuilt = read_gguf_tokenizer(dir / (names[f] + ".gguf"));
      for (size_t i = 0; i < corpus.size(); ++i)
        EXPECT_EQ(rebuilt.encode(corpus[i]), theirs[f][i].get<std::vector<int64_t>>())
            << names[f] << ": llama.cpp tokenizes '" << corpus[i] << "' otherwise";
    }
  }

  // model.init_from a .gguf with a BPE vocabulary: the tokenizer comes from the file.
  const fs::path recipe = dir / "r.yaml";
  write_file_atomic(recipe, "model:\n  init_from: " + (dir / "qwen2.gguf").string() +
                                "\ndata:\n  seq_len: 32\ntrainer:\n  max_steps: 2\n  warmup_steps: 1\n");
  const auto r = recipes::load_recipe(recipe);
  EXPECT_EQ(r.data.tokenizer, (dir / "qwen2.gguf").string());
  EXPECT_EQ(recipes::make_tokenizer(r.data.tokenizer)->encode(corpus[2]), originals[0].encode(corpus[2]));

  // What is not rebuilt is named: another pre-tokenizer, another tokenizer model.
  rewrite("tokenizer.ggml.pre", "kimi-k2", dir / "kimi.gguf");
  EXPECT_BRIGADE_ERROR(read_gguf_tokenizer(dir / "kimi.gguf"), "tokenizer.ggml.pre is 'kimi-k2'");
  rewrite("tokenizer.ggml.model", "llama", dir / "spm.gguf");
  EXPECT_BRIGADE_ERROR(read_gguf_tokenizer(dir / "spm.gguf"), "tokenizer.ggml.model is 'llama'");
}

TEST(GgufImportRecipe, InitFromAGgufFile) {
  TempDir dir;
  const TransformerOptions o = options_for(HfFamily::kLlama, true);
  Transformer original = gguf_testing::make_model(o, 5);
  export_gguf(original, HfFamily::kLlama, data::BpeTokenizer::from_byte_tokenizer(), GgufQuant::kF32, dir / "m.gguf",
              "m");
  const fs::path recipe = dir / "r.yaml";
  write_file_atomic(recipe, "model:\n  init_from: " + (dir / "m.gguf").string() +
                                "\ndata:\n  seq_len: 32\ntrainer:\n  max_steps: 2\n  warmup_steps: 0\n");
  const auto r = recipes::load_recipe(recipe);
  EXPECT_EQ(r.model.d_model, 64);
  EXPECT_EQ(r.data.tokenizer, "byte");
  auto model = recipes::build_model(r);
  for (const auto& [name, t] : original->state_dict())
    for (const auto& [n2, t2] : model->state_dict())
      if (n2 == name) {
        EXPECT_TRUE(torch::equal(t, t2)) << name;
      }

  // A BPE vocabulary (here: a merge no byte tokenizer has) is rebuilt from the file;
  // a merge whose result is not a token is an error naming the file.
  GgufWriter writer;
  {
    GgufReader reader(dir / "m.gguf");
    for (const auto& [key, value] : reader.file().metadata) writer.set(key, value);
    for (const auto& t : reader.file().tensors) writer.add_tensor(t.name, reader.tensor(t.name), gguf::GgmlType::kF32);
  }
  writer.set("tokenizer.ggml.merges", gguf::Value::strings({"Ġ t"}));
  writer.write(dir / "bpe.gguf");
  EXPECT_BRIGADE_ERROR(recipes::load_recipe(recipe, {"model.init_from=" + (dir / "bpe.gguf").string()}),
                       "bpe.gguf (tokenizer.ggml.*)");

  // Unknown architectures and missing tensors name the file.
  writer.set("general.architecture", gguf::Scalar(std::string("gpt2")));
  writer.write(dir / "gpt2.gguf");
  EXPECT_BRIGADE_ERROR(read_gguf_model_info(dir / "gpt2.gguf"), "general.architecture 'gpt2' cannot be imported");
  GgufWriter partial;
  {
    GgufReader reader(dir / "m.gguf");
    for (const auto& [key, value] : reader.file().metadata) partial.set(key, value);
    for (const auto& t : reader.file().tensors)
      if (t.name != "blk.1.ffn_down.weight") partial.add_tensor(t.name, reader.tensor(t.name), gguf::GgmlType::kF32);
  }
  partial.write(dir / "partial.gguf");
  Transformer target(read_gguf_model_info(dir / "partial.gguf").options);
  EXPECT_BRIGADE_ERROR(load_gguf_weights(*target, dir / "partial.gguf"), "no tensor 'blk.1.ffn_down.weight'");
}

}  // namespace
}  // namespace brigade::model
