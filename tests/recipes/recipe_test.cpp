// Recipes: shipped files load, priority default < file < --set, inherit, errors that
// name file:line and the key, cross-field rules, dump/parse round trips, docs coverage.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <set>
#include <vector>

#include "core/fs.h"
#include "recipes/recipe.h"
#include "recipes/schema.h"
#include "tests/testing.h"

namespace brigade::recipes {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

const fs::path kSource = BRIGADE_SOURCE_DIR;

fs::path write(const TempDir& dir, const std::string& name, const std::string& text) {
  const fs::path path = dir / name;
  fs::create_directories(path.parent_path());
  std::ofstream(path) << text;
  return path;
}

// Expects `statement` to throw an Error whose message contains every one of `parts`.
#define EXPECT_ERROR_WITH_ALL(statement, ...)                                               \
  do {                                                                                       \
    try {                                                                                    \
      statement;                                                                             \
      ADD_FAILURE() << "expected brigade::Error";                                            \
    } catch (const ::brigade::Error& e) {                                                    \
      for (const std::string& part : std::vector<std::string>{__VA_ARGS__})                  \
        EXPECT_NE(std::string(e.what()).find(part), std::string::npos)                       \
            << "missing '" << part << "' in: " << e.what();                                  \
    } catch (const std::exception& e) {                                                      \
      ADD_FAILURE() << "expected brigade::Error, got another exception: " << e.what();      \
    }                                                                                        \
  } while (0)

std::vector<fs::path> shipped_recipes() {
  std::vector<fs::path> out;
  for (const auto& entry : fs::directory_iterator(kSource / "recipes"))
    if (entry.path().extension() == ".yaml") out.push_back(entry.path());
  std::sort(out.begin(), out.end());
  return out;
}

TEST(RecipeShipped, EveryRecipeLoadsAndRoundTrips) {
  const auto files = shipped_recipes();
  ASSERT_GE(files.size(), 2u);
  for (const auto& file : files) {
    SCOPED_TRACE(file.string());
    Recipe r;
    ASSERT_NO_THROW(r = load_recipe(file));
    EXPECT_EQ(r.name, file.stem().string());  // the shipped files name themselves after the file
    const std::string dump = dump_recipe(r);
    const Recipe back = parse_recipe(dump, "dump of " + file.string());
    EXPECT_EQ(dump_recipe(back), dump);
    EXPECT_EQ(recipe_hash(back), recipe_hash(r));
  }
}

TEST(RecipeShipped, SmallDenseInheritsTinyDense) {
  const auto tiny = load_recipe(kSource / "recipes" / "tiny-dense.yaml");
  const auto small = load_recipe(kSource / "recipes" / "small-dense.yaml");
  EXPECT_EQ(tiny.model.d_model, 128);
  EXPECT_EQ(tiny.model.n_kv_heads, 2);
  EXPECT_EQ(small.model.d_model, 512);
  EXPECT_EQ(small.model.n_kv_heads, 4);
  EXPECT_EQ(small.model.vocab_size, tiny.model.vocab_size);        // from the base
  EXPECT_EQ(small.trainer.weight_decay, tiny.trainer.weight_decay);  // from the base
  EXPECT_EQ(small.data.synthetic.max_digits, 3);
  EXPECT_EQ(small.data.synthetic.min_operands, 2);
}

// ---------------------------------------------------------------------------------
// Priority and inheritance

TEST(Recipe, DefaultsThenFileThenSet) {
  TempDir dir;
  auto file = write(dir, "exp.yaml", "model:\n  d_model: 64\n  n_layers: 3\ntrainer:\n  lr: 0.01\n");
  const Recipe defaults;

  auto r = load_recipe(file);
  EXPECT_EQ(r.name, "exp");                           // default: the file name
  EXPECT_EQ(r.model.d_model, 64);                     // file
  EXPECT_EQ(r.model.n_layers, 3);                     // file
  EXPECT_DOUBLE_EQ(r.trainer.lr, 0.01);               // file
  EXPECT_EQ(r.model.n_heads, defaults.model.n_heads);  // default
  EXPECT_DOUBLE_EQ(r.trainer.beta2, defaults.trainer.beta2);

  auto s = load_recipe(file, {"model.d_model=96", "trainer.beta2=0.99", "name=other", "data.shards=[a.bin, b.bin]"});
  EXPECT_EQ(s.model.d_model, 96);                     // --set beats the file
  EXPECT_EQ(s.model.n_layers, 3);                     // the file still applies elsewhere
  EXPECT_DOUBLE_EQ(s.trainer.beta2, 0.99);            // --set beats the default
  EXPECT_EQ(s.name, "other");
  EXPECT_EQ(s.data.shards, (std::vector<std::string>{"a.bin", "b.bin"}));

  // The last --set of a key wins.
  EXPECT_EQ(load_recipe(file, {"model.d_model=96", "model.d_model=32"}).model.d_model, 32);
}

TEST(Recipe, EmptyTextIsTheDefaults) {
  EXPECT_EQ(dump_recipe(parse_recipe("", "empty")), dump_recipe(Recipe{}));
  EXPECT_EQ(dump_recipe(parse_recipe("model:\n", "empty section")), dump_recipe(Recipe{}));
}

TEST(Recipe, InheritChainAndLists) {
  TempDir dir;
  write(dir, "base.yaml", "model:\n  d_model: 64\n  n_layers: 2\ntrainer:\n  max_steps: 10\n  warmup_steps: 5\n");
  write(dir, "sub/mid.yaml", "inherit: ../base.yaml\nmodel:\n  n_layers: 3\n");  // relative to its own dir
  write(dir, "other.yaml", "model:\n  n_layers: 5\n  n_heads: 8\n");
  auto child = write(dir, "child.yaml", "inherit: sub/mid.yaml\ntrainer:\n  max_steps: 20\n");
  auto r = load_recipe(child);
  EXPECT_EQ(r.name, "child");
  EXPECT_EQ(r.model.d_model, 64);       // base
  EXPECT_EQ(r.model.n_layers, 3);       // mid over base
  EXPECT_EQ(r.trainer.max_steps, 20);   // child over base
  EXPECT_EQ(r.trainer.warmup_steps, 5); // base

  // A list of bases: later ones win, the file itself wins over all.
  auto multi = write(dir, "multi.yaml", "inherit: [base.yaml, other.yaml]\nmodel:\n  n_heads: 2\n");
  auto m = load_recipe(multi);
  EXPECT_EQ(m.model.d_model, 64);
  EXPECT_EQ(m.model.n_layers, 5);
  EXPECT_EQ(m.model.n_heads, 2);

  // parse_recipe resolves bases against base_dir.
  auto p = parse_recipe("inherit: base.yaml\n", "text", {"model.n_layers=7"}, dir.path());
  EXPECT_EQ(p.model.d_model, 64);
  EXPECT_EQ(p.model.n_layers, 7);

  // A diamond (two bases sharing one) is not a cycle.
  write(dir, "left.yaml", "inherit: base.yaml\nmodel:\n  n_layers: 4\n");
  write(dir, "right.yaml", "inherit: base.yaml\n");
  auto diamond = write(dir, "diamond.yaml", "inherit: [left.yaml, right.yaml]\n");
  EXPECT_EQ(load_recipe(diamond).model.d_model, 64);
}

// The run name defaults to the loaded file's name; a base's `name:` is the base's own
// name and must not leak into the child (its run directory would collide with the base's).
TEST(Recipe, InheritedBaseNameDoesNotNameTheChild) {
  TempDir dir;
  write(dir, "base.yaml", "name: base-run\nmodel:\n  d_model: 64\n");
  auto child = write(dir, "my-exp.yaml", "inherit: base.yaml\n");
  EXPECT_EQ(load_recipe(dir / "base.yaml").name, "base-run");
  const auto r = load_recipe(child);
  EXPECT_EQ(r.model.d_model, 64);
  EXPECT_EQ(r.name, "my-exp");
  auto named = write(dir, "named.yaml", "inherit: base.yaml\nname: mine\n");
  EXPECT_EQ(load_recipe(named).name, "mine");
}

// recipe.h: "Any problem is an Error naming where": a list entry that is not a file
// name must not surface as a bare yaml-cpp conversion error without the file.
TEST(Recipe, InheritListEntryThatIsNotAName) {
  TempDir dir;
  auto file = write(dir, "listy.yaml", "name: l\ninherit: [{a: 1}]\n");
  EXPECT_ERROR_WITH_ALL(load_recipe(file), "listy.yaml:2", "inherit");
}

TEST(Recipe, InheritCycleAndMissingBase) {
  TempDir dir;
  auto a = write(dir, "a.yaml", "inherit: b.yaml\n");
  write(dir, "b.yaml", "inherit: a.yaml\n");
  EXPECT_ERROR_WITH_ALL(load_recipe(a), "inherit: cycle through", "a.yaml");
  auto self = write(dir, "self.yaml", "inherit: self.yaml\n");
  EXPECT_BRIGADE_ERROR(load_recipe(self), "inherit: cycle through");
  EXPECT_BRIGADE_ERROR(parse_recipe("inherit: a.yaml\n", "text", {}, dir.path()), "cycle");

  auto missing = write(dir, "missing.yaml", "name: m\ninherit: nowhere.yaml\n");
  EXPECT_ERROR_WITH_ALL(load_recipe(missing), "missing.yaml:2", "inherit: file not found", "nowhere.yaml");
  auto bad = write(dir, "bad.yaml", "inherit:\n  base: x\n");
  EXPECT_BRIGADE_ERROR(load_recipe(bad), "inherit: expected a file name or a list of them");

  EXPECT_ERROR_WITH_ALL(load_recipe(dir / "absent.yaml"), "recipe not found", "absent.yaml");
  EXPECT_BRIGADE_ERROR(load_recipe(dir.path()), "recipe is not a file");
}

// ---------------------------------------------------------------------------------
// Errors naming file:line and the key

TEST(Recipe, UnknownKeyNamesFileLineKeyAndSuggestion) {
  TempDir dir;
  auto file = write(dir, "typo.yaml", "name: t\nmodel:\n  d_model: 64\n  n_haeds: 4\n");
  EXPECT_ERROR_WITH_ALL(load_recipe(file), "typo.yaml:4", "unknown key 'model.n_haeds'",
                        "did you mean 'model.n_heads'");
  EXPECT_ERROR_WITH_ALL(parse_recipe("trainer:\n  lr: 0.1\n  warmup: 3\n", "inline.yaml"), "inline.yaml:3",
                        "unknown key 'trainer.warmup'");
  // Deep keys keep the full path, and a far-off typo gets no suggestion.
  try {
    parse_recipe("data:\n  synthetic:\n    zzzzzzzzzz: 1\n", "deep.yaml");
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("deep.yaml:3: unknown key 'data.synthetic.zzzzzzzzzz'"), std::string::npos) << msg;
    EXPECT_EQ(msg.find("did you mean"), std::string::npos) << msg;
  }
  EXPECT_ERROR_WITH_ALL(parse_recipe("modle:\n  d_model: 3\n", "top.yaml"), "top.yaml:1", "unknown key 'modle'");
  // An error inside an inherited base names the base file and its line.
  write(dir, "base.yaml", "model:\n  d_model: 64\n\n  tie_embedding: true\n");
  auto child = write(dir, "child.yaml", "inherit: base.yaml\n");
  EXPECT_ERROR_WITH_ALL(load_recipe(child), "base.yaml:4", "unknown key 'model.tie_embedding'",
                        "did you mean 'model.tie_embeddings'");
}

TEST(Recipe, UnknownKeyInSet) {
  EXPECT_ERROR_WITH_ALL(parse_recipe("", "r", {"model.dmodel=64"}), "--set model.dmodel=64",
                        "unknown key 'model.dmodel'", "did you mean 'model.d_model'");
  EXPECT_ERROR_WITH_ALL(parse_recipe("", "r", {"model=64"}), "unknown key 'model'");
  EXPECT_BRIGADE_ERROR(parse_recipe("", "r", {"model.d_model"}), "expected key.path=value");
  EXPECT_BRIGADE_ERROR(parse_recipe("", "r", {"=3"}), "expected key.path=value");
  EXPECT_ERROR_WITH_ALL(parse_recipe("", "r", {"model.d_model=[1"}), "--set model.d_model=[1",
                        "cannot parse the value");
}

TEST(Recipe, WrongTypesNameFileLineAndKey) {
  EXPECT_ERROR_WITH_ALL(parse_recipe("name: x\nmodel:\n  d_model: big\n", "types.yaml"), "types.yaml:3",
                        "model.d_model: expected an integer, got 'big'");
  EXPECT_ERROR_WITH_ALL(parse_recipe("model:\n  n_layers: 2.5\n", "types.yaml"), "types.yaml:2",
                        "model.n_layers: expected an integer");
  EXPECT_ERROR_WITH_ALL(parse_recipe("trainer:\n  max_steps: 5\n  lr: [1, 2]\n", "types.yaml"), "types.yaml:3",
                        "trainer.lr: expected a number, got a list");
  EXPECT_ERROR_WITH_ALL(parse_recipe("model:\n  tie_embeddings: maybe\n", "types.yaml"), "types.yaml:2",
                        "model.tie_embeddings: expected true or false, got 'maybe'");
  EXPECT_ERROR_WITH_ALL(parse_recipe("data:\n  source: web\n", "types.yaml"), "types.yaml:2",
                        "data.source: 'web' is not one of synthetic | shards");
  EXPECT_ERROR_WITH_ALL(parse_recipe("name: {a: 1}\n", "types.yaml"), "types.yaml:1", "name: expected a string");
  EXPECT_ERROR_WITH_ALL(parse_recipe("model: 5\n", "types.yaml"), "types.yaml:1", "model: expected a mapping");
  EXPECT_ERROR_WITH_ALL(parse_recipe("model:\n  d_model:\n", "types.yaml"), "types.yaml:2",
                        "model.d_model: expected an integer, got nothing");
  EXPECT_ERROR_WITH_ALL(parse_recipe("", "r", {"model.qk_norm=perhaps"}), "--set model.qk_norm=perhaps",
                        "expected true or false");
  EXPECT_ERROR_WITH_ALL(parse_recipe("model: [1, 2\n", "broken.yaml"), "broken.yaml:", "invalid YAML");
}

TEST(Recipe, OutOfRangeValues) {
  EXPECT_ERROR_WITH_ALL(parse_recipe("", "r", {"model.d_model=0"}), "--set model.d_model=0",
                        "model.d_model = 0 is out of range [1, inf]");
  EXPECT_ERROR_WITH_ALL(parse_recipe("", "r", {"trainer.beta1=1.5"}), "trainer.beta1 = 1.5 is out of range");
  EXPECT_ERROR_WITH_ALL(parse_recipe("", "r", {"data.synthetic.max_digits=12"}),
                        "data.synthetic.max_digits = 12 is out of range [1, 9]");
  EXPECT_ERROR_WITH_ALL(parse_recipe("", "r", {"trainer.seed=-1"}), "trainer.seed = -1 is out of range");
  EXPECT_ERROR_WITH_ALL(parse_recipe("trainer:\n  lr: -0.1\n", "range.yaml"), "range.yaml:2",
                        "trainer.lr = -0.1 is out of range");
  EXPECT_BRIGADE_ERROR(parse_recipe("", "r", {"trainer.lr=.nan"}), "trainer.lr = .nan is out of range");
}

TEST(Recipe, CrossFieldRules) {
  EXPECT_BRIGADE_ERROR(parse_recipe("model:\n  d_model: 128\n  n_heads: 3\n", "x"),
                       "model.n_heads (3) must divide model.d_model (128)");
  EXPECT_BRIGADE_ERROR(parse_recipe("model:\n  n_heads: 4\n  n_kv_heads: 3\n", "x"),
                       "model.n_kv_heads (3) must divide model.n_heads (4)");
  EXPECT_BRIGADE_ERROR(parse_recipe("", "x", {"data.seq_len=300", "model.max_seq_len=256"}),
                       "data.seq_len (300) exceeds model.max_seq_len (256)");
  EXPECT_NO_THROW(parse_recipe("", "x", {"data.seq_len=256", "model.max_seq_len=256"}));
  EXPECT_BRIGADE_ERROR(parse_recipe("", "x", {"model.vocab_size=260"}),
                       "model.vocab_size (260) is smaller than the byte tokenizer's vocabulary (261)");
  EXPECT_NO_THROW(parse_recipe("", "x", {"model.vocab_size=261"}));
  EXPECT_BRIGADE_ERROR(parse_recipe("", "x", {"data.tokenizer=sentencepiece"}), "unknown tokenizer 'sentencepiece'");
  EXPECT_BRIGADE_ERROR(parse_recipe("", "x", {"data.source=shards"}), "data.shards lists no files");
  EXPECT_BRIGADE_ERROR(parse_recipe("", "x", {"data.synthetic.min_digits=3", "data.synthetic.max_digits=2"}),
                       "data.synthetic.min_digits (3) must be <= data.synthetic.max_digits (2)");
  EXPECT_BRIGADE_ERROR(parse_recipe("", "x", {"data.synthetic.ops=+/"}), "may only contain");
  EXPECT_BRIGADE_ERROR(parse_recipe("", "x", {"trainer.min_lr=0.1", "trainer.lr=0.01"}), "trainer.min_lr");
  EXPECT_BRIGADE_ERROR(parse_recipe("", "x", {"name=a/b"}), "name must be a plain, non-empty name");
  EXPECT_BRIGADE_ERROR(parse_recipe("", "x", {"name=''"}), "name must be a plain, non-empty name");
}

TEST(Recipe, MoERulesNameTheKey) {
  const std::string moe = "model:\n  moe:\n    num_experts: 8\n    top_k: 2\n";
  EXPECT_BRIGADE_ERROR(parse_recipe(moe, "x", {"model.moe.num_groups=3"}),
                       "model.moe.num_groups (3) must divide model.moe.num_experts (8)");
  EXPECT_BRIGADE_ERROR(parse_recipe(moe, "x", {"model.moe.top_k=9"}),
                       "model.moe.top_k (9) must be between 1 and model.moe.num_experts (8)");
  EXPECT_BRIGADE_ERROR(parse_recipe(moe, "x", {"model.moe.num_groups=4", "model.moe.topk_group=5"}),
                       "model.moe.topk_group (5) must be between 1 and model.moe.num_groups (4)");
  EXPECT_BRIGADE_ERROR(parse_recipe(moe, "x", {"model.moe.num_groups=4", "model.moe.topk_group=1", "model.moe.top_k=3"}),
                       "model.moe.top_k (3) exceeds the experts reachable in model.moe.topk_group (1) groups of 2");
  EXPECT_BRIGADE_ERROR(parse_recipe(moe, "x", {"model.moe.first_k_dense=4"}), "model.moe.first_k_dense (4)");
  EXPECT_ERROR_WITH_ALL(parse_recipe(moe, "x", {"model.moe.capacity_factor=0"}), "--set model.moe.capacity_factor=0",
                        "model.moe.capacity_factor = 0 is out of range");
  EXPECT_ERROR_WITH_ALL(parse_recipe(moe + "    capacity_factor: -1\n", "cap.yaml"), "cap.yaml:5",
                        "model.moe.capacity_factor = -1 is out of range");
  EXPECT_ERROR_WITH_ALL(parse_recipe(moe, "x", {"model.moe.top_k=0"}), "model.moe.top_k = 0 is out of range");
  EXPECT_ERROR_WITH_ALL(parse_recipe(moe, "x", {"model.moe.bias_update_rate=-0.1"}),
                        "model.moe.bias_update_rate = -0.1 is out of range");
  EXPECT_BRIGADE_ERROR(parse_recipe(moe, "x", {"model.moe.score_function=relu"}),
                       "model.moe.score_function: 'relu' is not one of sigmoid | softmax");
  EXPECT_BRIGADE_ERROR(parse_recipe(moe, "x", {"model.moe.drop_policy=random"}), "model.moe.drop_policy");
  EXPECT_BRIGADE_ERROR(parse_recipe(moe, "x", {"model.moe.top_k=x"}), "model.moe.top_k");
  EXPECT_NO_THROW(parse_recipe(moe, "x", {"model.moe.num_groups=4", "model.moe.topk_group=2"}));
  // A dense model ignores the MoE keys' cross-field rules (top_k defaults to 2 > 0 experts).
  EXPECT_NO_THROW(parse_recipe("", "x"));
}

TEST(Recipe, Fp8KeysAreCheckedByName) {
  EXPECT_BRIGADE_ERROR(parse_recipe("", "x", {"precision.fp8_recipe=tensorwise"}),
                       "precision.fp8_recipe: 'tensorwise' is not one of none | blockwise | current | delayed");
  EXPECT_BRIGADE_ERROR(parse_recipe("", "x", {"precision.fp8_formats=e5m2"}), "precision.fp8_formats");
  EXPECT_BRIGADE_ERROR(parse_recipe("", "x", {"precision.fp8_modules=[attention, router]"}),
                       "precision.fp8_modules: unknown module kind 'router'");
  EXPECT_ERROR_WITH_ALL(parse_recipe("", "x", {"precision.fp8_amax_history=0"}), "precision.fp8_amax_history = 0 is out of range");
  auto r = parse_recipe("", "x", {"precision.fp8_recipe=blockwise", "precision.fp8_formats=hybrid"});
  EXPECT_EQ(r.precision.fp8.recipe, precision::Fp8Recipe::kBlockwise);
  EXPECT_EQ(r.precision.fp8.formats, precision::Fp8Formats::kHybrid);
}

// ---------------------------------------------------------------------------------
// Dump, fingerprint, hash

TEST(Recipe, DumpParseRoundTripWithUnusualValues) {
  const std::vector<std::string> overrides = {
      "name='odd: name #1'",     "data.synthetic.ops='*+'",     "data.source=shards",
      "data.shards=['x y.bin', '#b.bin', 'c: d']", "trainer.lr=1.0e-7", "trainer.min_lr=0",
      "model.rope_theta=500000.5", "model.norm_eps=1e-6",         "model.qk_norm=yes",
      "trainer.seed=18446744073709551",  "trainer.on_nonfinite=skip",
      "precision.compute_dtype=bfloat16", "model.init_std=0.1234567890123"};
  const Recipe r = parse_recipe("", "r", overrides);
  EXPECT_EQ(r.name, "odd: name #1");
  EXPECT_EQ(r.data.synthetic.ops, "*+");
  EXPECT_EQ(r.data.shards, (std::vector<std::string>{"x y.bin", "#b.bin", "c: d"}));
  EXPECT_TRUE(r.model.qk_norm);
  const std::string dump = dump_recipe(r);
  const Recipe back = parse_recipe(dump, "dump");
  EXPECT_EQ(dump_recipe(back), dump) << dump;
  EXPECT_EQ(recipe_hash(back), recipe_hash(r));
  EXPECT_EQ(back.name, r.name);
  EXPECT_EQ(back.data.shards, r.data.shards);
  EXPECT_EQ(back.data.synthetic.ops, r.data.synthetic.ops);
  EXPECT_EQ(back.trainer.lr, r.trainer.lr);  // exact: the dump prints shortest round-trip floats
  EXPECT_EQ(back.model.init_std, r.model.init_std);
  EXPECT_EQ(back.trainer.seed, r.trainer.seed);
  EXPECT_EQ(back.precision.compute_dtype, r.precision.compute_dtype);
  EXPECT_EQ(back.trainer.on_nonfinite, r.trainer.on_nonfinite);

  // Every schema key appears in the dump.
  for (const auto& key : schema_keys()) {
    const auto leaf = key.substr(key.rfind('.') + 1);
    EXPECT_NE(dump.find(leaf + ":"), std::string::npos) << key;
  }
}

// The schema accepts .inf where a range is open above (grad_clip, rope_theta), so the
// dump must print it in a form parse_recipe reads back.
TEST(Recipe, InfiniteValueSurvivesDumpRoundTrip) {
  const Recipe r = parse_recipe("", "r", {"trainer.grad_clip=.inf"});
  ASSERT_TRUE(std::isinf(r.trainer.grad_clip));
  const std::string dump = dump_recipe(r);
  Recipe back;
  try {
    back = parse_recipe(dump, "dump");
  } catch (const Error& e) {
    FAIL() << "dump of grad_clip = inf does not parse back: " << e.what();
  }
  EXPECT_TRUE(std::isinf(back.trainer.grad_clip));
  EXPECT_EQ(dump_recipe(back), dump);
}

TEST(Recipe, HashAndFingerprint) {
  const Recipe base = parse_recipe("", "r");
  EXPECT_EQ(recipe_hash(base).size(), 16u);
  EXPECT_EQ(recipe_hash(base), recipe_hash(parse_recipe("", "again")));

  const Recipe wider = parse_recipe("", "r", {"model.d_model=256"});
  const Recipe other_lr = parse_recipe("", "r", {"trainer.lr=0.001"});
  EXPECT_NE(model_fingerprint(wider), model_fingerprint(base));
  EXPECT_EQ(model_fingerprint(other_lr), model_fingerprint(base));
  EXPECT_NE(recipe_hash(other_lr), recipe_hash(base));
  EXPECT_NE(recipe_hash(wider), recipe_hash(base));

  // Balancing settings steer training only: a run may resume with new ones.
  EXPECT_EQ(model_fingerprint(parse_recipe("", "r", {"model.moe.bias_update_rate=0.01", "model.moe.z_loss=0.001",
                                                     "model.moe.dropless=false"})),
            model_fingerprint(base));
  EXPECT_NE(model_fingerprint(parse_recipe("", "r", {"model.moe.num_experts=4"})), model_fingerprint(base));

  const std::string fp = model_fingerprint(base);
  EXPECT_NE(fp.find("model.d_model: 128"), std::string::npos) << fp;
  EXPECT_EQ(fp.find("trainer."), std::string::npos) << fp;
  EXPECT_EQ(fp.find("data."), std::string::npos) << fp;
}

// ---------------------------------------------------------------------------------
// Schema documentation

TEST(RecipeSchema, KeysAreUniqueAndFindable) {
  const auto keys = schema_keys();
  ASSERT_FALSE(keys.empty());
  std::set<std::string> unique(keys.begin(), keys.end());
  EXPECT_EQ(unique.size(), keys.size());
  for (const auto& k : keys) {
    const Field* f = find_field(k);
    ASSERT_NE(f, nullptr) << k;
    EXPECT_FALSE(f->doc.empty()) << k;
    EXPECT_FALSE(is_section(k)) << k << " is both a key and a section";
  }
  EXPECT_TRUE(is_section("model"));
  EXPECT_TRUE(is_section("data.synthetic"));
  EXPECT_FALSE(is_section("model.d_model"));
  EXPECT_EQ(find_field("model"), nullptr);
}

TEST(RecipeSchema, MarkdownListsEveryKey) {
  const std::string md = schema_markdown();
  for (const auto& key : schema_keys()) EXPECT_NE(md.find("| `" + key + "` |"), std::string::npos) << key;
  EXPECT_NE(md.find("| `model.d_model` | int | `128` |"), std::string::npos) << md;
}

TEST(RecipeSchema, DocsMentionEveryKey) {
  const fs::path doc = kSource / "docs" / "recipes.md";
  if (!fs::exists(doc)) GTEST_SKIP() << doc << " does not exist yet";
  const std::string text = read_file(doc);
  for (const auto& key : schema_keys()) EXPECT_NE(text.find(key), std::string::npos) << key << " missing from " << doc;
}

}  // namespace
}  // namespace brigade::recipes
