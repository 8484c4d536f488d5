#include "recipes/recipe.h"

#include <map>
#include <set>
#include <sstream>

#include <yaml-cpp/yaml.h>

#include "core/error.h"
#include "core/fs.h"
#include "core/hash.h"
#include "data/arith.h"
#include "data/tokenizer.h"
#include "model/gguf_import.h"
#include "model/hf.h"
#include "recipes/build.h"
#include "recipes/schema.h"

namespace brigade::recipes {
namespace fs = std::filesystem;
namespace {

// One leaf value of the merged recipe and where it was written.
struct Entry {
  YAML::Node node;
  std::string where;
};
using Entries = std::map<std::string, Entry>;

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string suggestion(const std::string& path) {
  std::string best;
  size_t best_d = 4;
  for (const auto& f : schema()) {
    size_t d = edit_distance(path, f.path);
    if (d < best_d) {
      best_d = d;
      best = f.path;
    }
  }
  return best.empty() ? "" : " (did you mean '" + best + "'?)";
}

std::string location(const std::string& source, const YAML::Mark& mark) {
  return source + ":" + std::to_string(mark.line + 1);
}

void flatten(const YAML::Node& map, const std::string& prefix, const std::string& source, bool inherited,
             Entries& out) {
  for (const auto& item : map) {
    const std::string where = location(source, item.first.Mark());
    BRIGADE_CHECK(item.first.IsScalar(), where, ": keys must be plain names");
    const std::string key = item.first.Scalar();
    const std::string path = prefix.empty() ? key : prefix + "." + key;
    if (prefix.empty() && key == "inherit") continue;
    // A run is named by its own file, never by a base it inherits from.
    if (prefix.empty() && key == "name" && inherited) continue;
    if (is_section(path)) {
      if (item.second.IsNull()) continue;  // an empty section
      BRIGADE_CHECK(item.second.IsMap(), where, ": ", path, ": expected a mapping of keys, got ",
                    item.second.IsScalar() ? "'" + item.second.Scalar() + "'" : std::string("a list"));
      flatten(item.second, path, source, inherited, out);
      continue;
    }
    BRIGADE_CHECK(find_field(path) != nullptr, where, ": unknown key '", path, "'", suggestion(path));
    out[path] = Entry{item.second, where};
  }
}

YAML::Node parse_yaml(const std::string& text, const std::string& source) {
  try {
    return YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    BRIGADE_FAIL(source, ":", e.mark.line + 1, ":", e.mark.column + 1, ": invalid YAML: ", e.msg);
  }
}

// Loads `text` (from `source`) into `out`, its `inherit:` bases first.
void load_layers(const std::string& text, const std::string& source, const fs::path& base_dir,
                 bool inherited, std::set<std::string>& stack, Entries& out) {
  YAML::Node root = parse_yaml(text, source);
  if (root.IsNull()) return;  // an empty file is a recipe of defaults
  BRIGADE_CHECK(root.IsMap(), source, ": a recipe must be a mapping of sections (model:, data:, trainer:, ...)");
  if (auto inherit = root["inherit"]; inherit) {
    std::vector<std::string> bases;
    const std::string where = location(source, inherit.Mark());
    if (inherit.IsScalar()) bases.push_back(inherit.Scalar());
    else if (inherit.IsSequence())
      for (const auto& b : inherit) {
        BRIGADE_CHECK(b.IsScalar(), location(source, b.Mark()), ": inherit: list entries must be file names");
        bases.push_back(b.Scalar());
      }
    else BRIGADE_FAIL(where, ": inherit: expected a file name or a list of them");
    for (const auto& base : bases) {
      const fs::path path = base_dir / base;
      BRIGADE_CHECK(fs::exists(path), where, ": inherit: file not found: ", path.string());
      const std::string canonical = fs::canonical(path).string();
      BRIGADE_CHECK(!stack.contains(canonical), where, ": inherit: cycle through ", path.string());
      stack.insert(canonical);
      load_layers(read_file(path), path.string(), path.parent_path(), /*inherited=*/true, stack, out);
      stack.erase(canonical);
    }
  }
  flatten(root, "", source, inherited, out);
}

void apply_override(const std::string& text, Entries& out) {
  const std::string where = "--set " + text;
  const auto eq = text.find('=');
  BRIGADE_CHECK(eq != std::string::npos && eq > 0, where, ": expected key.path=value");
  const std::string path = text.substr(0, eq);
  BRIGADE_CHECK(find_field(path) != nullptr, where, ": unknown key '", path, "'", suggestion(path));
  YAML::Node value;
  try {
    value = YAML::Load(text.substr(eq + 1));
  } catch (const YAML::Exception& e) {
    BRIGADE_FAIL(where, ": cannot parse the value: ", e.msg);
  }
  out[path] = Entry{value, where};
}

// Model keys that steer training, not what the weights mean: a run may resume with
// different ones, and a recipe starting from a Hugging Face checkpoint may set them.
const std::set<std::string>& training_only_keys() {
  static const std::set<std::string> keys = {
      "model.init_from",           "model.moe.bias_update_rate", "model.moe.seq_aux_loss",
      "model.moe.batch_aux_loss",  "model.moe.z_loss",           "model.moe.dropless",
      "model.moe.capacity_factor", "model.moe.drop_policy",      "model.mtp.loss_weight"};
  return keys;
}

// model.init_from: the Hugging Face config.json (or the GGUF file's metadata) decides
// the architecture. A key the
// recipe sets itself must agree with it, except model.max_seq_len (the weights do not
// depend on it), model.mtp.depth (drop the checkpoint's MTP modules or add fresh
// ones) and the training-only keys; data.tokenizer defaults to the
// directory's tokenizer.json.
void apply_init_from(const Entries& entries, Recipe& recipe) {
  const fs::path dir = recipe.model.init_from;
  const std::string where = entries.at("model.init_from").where + ": model.init_from";
  const bool gguf = fs::is_regular_file(dir) && dir.extension() == ".gguf";
  BRIGADE_CHECK(gguf || fs::is_directory(dir), where, ": ", dir.string(),
                " is neither a directory nor a .gguf file");
  BRIGADE_CHECK(gguf || fs::exists(dir / "config.json"), where, ": ", dir.string(),
                " has no config.json (expected a Hugging Face checkpoint directory)");
  const fs::path config = gguf ? dir : dir / "config.json";
  Recipe from_config = recipe;
  if (gguf) {
    const auto info = model::read_gguf_model_info(dir);
    from_config.model = info.options;
    // A BPE vocabulary is rebuilt from the file (model::read_gguf_tokenizer): checked here,
    // so an unsupported one fails at load with the file and key named.
    if (!info.byte_vocabulary && !entries.contains("data.tokenizer")) {
      model::read_gguf_tokenizer(dir);
      from_config.data.tokenizer = dir.string();
      recipe.data.tokenizer = dir.string();
    }
  } else {
    from_config.model = model::read_hf_config(config).options;
  }
  from_config.model.init_from = recipe.model.init_from;
  for (const auto& f : schema()) {
    if (f.path.rfind("model.", 0) != 0 || f.path == "model.init_from" || f.path == "model.init_std") continue;
    const auto it = entries.find(f.path);
    if (it == entries.end()) continue;
    // model.mtp.depth: modules the checkpoint has are loaded, further ones start fresh.
    if (f.path == "model.max_seq_len" || f.path == "model.mtp.depth" || training_only_keys().contains(f.path)) {
      f.set(from_config, it->second.node, it->second.where);  // the recipe's choice wins
      continue;
    }
    const std::string mine = f.get(recipe).Scalar(), theirs = f.get(from_config).Scalar();
    BRIGADE_CHECK(mine == theirs, it->second.where, ": ", f.path, " = ", mine, ", but model.init_from's ",
                  config.string(), " says ", theirs, " (leave the key out to take the checkpoint's)");
  }
  recipe.model = from_config.model;
  if (!gguf && !entries.contains("data.tokenizer") && fs::exists(dir / "tokenizer.json"))
    recipe.data.tokenizer = (dir / "tokenizer.json").string();
}

Recipe build(const Entries& entries) {
  Recipe recipe;
  for (const auto& [path, entry] : entries) find_field(path)->set(recipe, entry.node, entry.where);
  if (!recipe.model.init_from.empty()) apply_init_from(entries, recipe);
  validate(recipe);
  return recipe;
}

}  // namespace

Recipe parse_recipe(const std::string& yaml, const std::string& source,
                    const std::vector<std::string>& overrides, const fs::path& base_dir) {
  Entries entries;
  std::set<std::string> stack;
  load_layers(yaml, source, base_dir, /*inherited=*/false, stack, entries);
  for (const auto& o : overrides) apply_override(o, entries);
  return build(entries);
}

Recipe load_recipe(const fs::path& file, const std::vector<std::string>& overrides) {
  BRIGADE_CHECK(fs::exists(file), "recipe not found: ", file.string());
  BRIGADE_CHECK(fs::is_regular_file(file), "recipe is not a file: ", file.string());
  Entries entries;
  // The file name is the default run name; the file's own `name:` overrides it.
  entries["name"] = Entry{YAML::Node(file.stem().string()), file.string()};
  std::set<std::string> stack{fs::canonical(file).string()};
  load_layers(read_file(file), file.string(), file.parent_path(), /*inherited=*/false, stack, entries);
  for (const auto& o : overrides) apply_override(o, entries);
  return build(entries);
}

void validate(const Recipe& r) {
  BRIGADE_CHECK(!r.name.empty() && r.name.find('/') == std::string::npos && r.name != "." && r.name != "..",
                "name must be a plain, non-empty name (it names the run directory), got '", r.name, "'");
  r.model.validate();
  r.precision.fp8.validate();
  r.trainer.validate();
  r.parallel.validate();
  r.distill.validate();
  const auto tokenizer = make_tokenizer(r.data.tokenizer);
  BRIGADE_CHECK(r.model.vocab_size >= tokenizer->vocab_size(), "model.vocab_size (", r.model.vocab_size,
                ") is smaller than the ", r.data.tokenizer, " tokenizer's vocabulary (", tokenizer->vocab_size(), ")");
  BRIGADE_CHECK(r.data.seq_len <= r.model.max_seq_len, "data.seq_len (", r.data.seq_len,
                ") exceeds model.max_seq_len (", r.model.max_seq_len, ")");
  if (r.data.source == data::DataSource::kSynthetic) {
    data::validate(r.data.synthetic);
  } else {
    BRIGADE_CHECK(!r.data.shards.empty(), "data.source is shards but data.shards lists no files");
    BRIGADE_CHECK(r.data.eval_fraction > 0, "data.eval_fraction must be > 0 with data.source shards");
  }
}

std::string dump_recipe(const Recipe& recipe) {
  YAML::Node root(YAML::NodeType::Map);
  for (const auto& f : schema()) {
    // Walk/create the nested maps of the path, then set the leaf.
    std::vector<std::string> parts;
    std::stringstream ss(f.path);
    for (std::string p; std::getline(ss, p, '.');) parts.push_back(p);
    std::vector<YAML::Node> chain{root};
    for (size_t i = 0; i + 1 < parts.size(); ++i) chain.push_back(chain.back()[parts[i]]);
    chain.back()[parts.back()] = f.get(recipe);
  }
  YAML::Emitter out;
  out << root;
  return std::string(out.c_str()) + "\n";
}

std::string section_fingerprint(const Recipe& recipe, const std::string& section,
                                const std::set<std::string>& except) {
  std::string out;
  for (const auto& f : schema()) {
    if (f.path.rfind(section + ".", 0) != 0 || except.contains(f.path)) continue;
    YAML::Emitter e;
    e << f.get(recipe);
    out += f.path + ": " + e.c_str() + "\n";
  }
  return out;
}

std::string model_fingerprint(const Recipe& recipe) {
  return section_fingerprint(recipe, "model", training_only_keys());
}

std::string recipe_hash(const Recipe& recipe) {
  char buf[20];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(fnv1a(dump_recipe(recipe))));
  return buf;
}

std::vector<std::string> schema_keys() {
  std::vector<std::string> keys;
  for (const auto& f : schema()) keys.push_back(f.path);
  return keys;
}

std::string schema_markdown() {
  const Recipe defaults;
  std::string out = "| key | type | default | meaning |\n|---|---|---|---|\n";
  for (const auto& f : schema()) {
    YAML::Emitter e;
    e << YAML::Flow << f.get(defaults);
    std::string def = e.c_str();
    if (f.path == "name") def = "(file name)";
    out += "| `" + f.path + "` | " + f.type + " | `" + def + "` | " + f.doc + " |\n";
  }
  return out;
}

}  // namespace brigade::recipes
