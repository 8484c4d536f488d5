// GGUF back into brigade: export -> read_gguf_model_info / load_gguf_weights gives the
// same model (exactly for F32, within the quantization for Q8_0), and
// model.init_from accepts a .gguf file.
#include <gtest/gtest.h>
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
                                           std::tuple{HfFamily::kQwen3Moe, true}),
                         [](const auto& info) {
                           return family_name(std::get<0>(info.param)) + (std::get<1>(info.param) ? "Tied" : "Untied");
                         });

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

  // A BPE vocabulary needs its tokenizer.json named.
  GgufWriter writer;
  {
    GgufReader reader(dir / "m.gguf");
    for (const auto& [key, value] : reader.file().metadata) writer.set(key, value);
    for (const auto& t : reader.file().tensors) writer.add_tensor(t.name, reader.tensor(t.name), gguf::GgmlType::kF32);
  }
  writer.set("tokenizer.ggml.merges", gguf::Value::strings({"Ġ t"}));
  writer.write(dir / "bpe.gguf");
  EXPECT_BRIGADE_ERROR(recipes::load_recipe(recipe, {"model.init_from=" + (dir / "bpe.gguf").string()}),
                       "carries a BPE vocabulary");

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
