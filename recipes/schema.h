// The recipe schema: one declaration per key (path, type, range, doc) with how to
// set it from YAML and how to print it. Everything else in recipes/ is driven by it.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <yaml-cpp/yaml.h>

#include "recipes/recipe.h"

namespace brigade::recipes {

struct Field {
  std::string path;  // "model.d_model"
  std::string type;  // "int", "float", "bool", "string", "list of strings", "a | b"
  std::string doc;
  // Sets the value from a YAML node; `where` ("file.yaml:12" or "--set k=v") goes into errors.
  std::function<void(Recipe&, const YAML::Node&, const std::string& where)> set;
  // The current value as a YAML node (scalar or sequence).
  std::function<YAML::Node(const Recipe&)> get;
};

// All fields, in the order they are documented and dumped.
const std::vector<Field>& schema();
const Field* find_field(const std::string& path);
// True when `path` is a section prefix of some field ("model", "data.synthetic").
bool is_section(const std::string& path);

}  // namespace brigade::recipes
