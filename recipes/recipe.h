// Recipes: one YAML file describes a whole run. This is the only place that reads
// YAML; it fills each module's Options struct and nothing downstream sees a node.
//
// Priority: built-in defaults < the recipe file (after `inherit:` bases) < --set.
// Unknown keys and wrong types are Errors naming file:line and the full key path;
// cross-field rules run after everything is parsed.
#pragma once

#include <cstdint>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "data/options.h"
#include "distill/options.h"
#include "model/transformer.h"
#include "parallel/options.h"
#include "precision/precision.h"
#include "trainer/options.h"

namespace brigade::recipes {

struct Recipe {
  std::string name = "recipe";  // default run directory: runs/<name>
  model::TransformerOptions model;
  data::DataOptions data;
  precision::PrecisionOptions precision;
  trainer::TrainerOptions trainer;
  parallel::ParallelOptions parallel;
  distill::DistillOptions distill;  // `brigade distill` only
};

// Loads `file` (following `inherit:`), applies `overrides` ("a.b.c=value", YAML
// scalar or flow syntax), validates. Any problem is an Error naming where.
Recipe load_recipe(const std::filesystem::path& file, const std::vector<std::string>& overrides = {});

// The same from YAML text; `source` names it in errors. `inherit:` paths resolve
// against `base_dir`.
Recipe parse_recipe(const std::string& yaml, const std::string& source,
                    const std::vector<std::string>& overrides = {},
                    const std::filesystem::path& base_dir = ".");

// Cross-field rules (heads divide d_model, seq_len fits max_seq_len, ...).
void validate(const Recipe& recipe);

// The effective recipe as YAML, every key present; parse_recipe(dump) gives it back.
std::string dump_recipe(const Recipe& recipe);
// The model section alone: equal fingerprints mean interchangeable weights.
std::string model_fingerprint(const Recipe& recipe);
// Every key under `section` ("distill.generate") but those in `except`, one
// "path: value" line each: a cache key that follows the schema.
std::string section_fingerprint(const Recipe& recipe, const std::string& section,
                                const std::set<std::string>& except = {});
// A short hex hash of dump_recipe().
std::string recipe_hash(const Recipe& recipe);

// Markdown reference of every key (type, default, meaning): docs/recipes.md's table.
std::string schema_markdown();
// Every key path of the schema ("model.d_model", ...).
std::vector<std::string> schema_keys();

}  // namespace brigade::recipes
