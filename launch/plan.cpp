// `brigade plan RECIPE`: trainer/plan.h's estimate for a recipe, printed.
#include <cctype>
#include <iostream>

#include "core/error.h"
#include "launch/commands.h"
#include "recipes/recipe.h"
#include "trainer/plan.h"

namespace brigade::launch {

double parse_count(const std::string& text, const std::string& what) {
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    BRIGADE_FAIL(what, " '", text, "' is not a number (e.g. 14.8T, 500B, 2e9)");
  }
  const std::string suffix = text.substr(used);
  double scale = 1;
  if (suffix == "K" || suffix == "k") scale = 1e3;
  else if (suffix == "M") scale = 1e6;
  else if (suffix == "B" || suffix == "G") scale = 1e9;
  else if (suffix == "T") scale = 1e12;
  else BRIGADE_CHECK(suffix.empty(), what, " '", text, "' has an unknown suffix '", suffix, "' (K, M, B or T)");
  BRIGADE_CHECK(value >= 0, what, " '", text, "' is negative");
  return value * scale;
}

int plan_command(const PlanArgs& args) {
  const recipes::Recipe r = recipes::load_recipe(args.recipe, args.overrides);
  trainer::PlanOptions options;
  options.gpus = args.gpus;
  options.gpu = args.gpu;
  options.mfu = args.mfu;
  if (!args.tokens.empty()) options.tokens = parse_count(args.tokens, "--tokens");
  const trainer::PlanInputs in{r.model, r.precision, r.parallel, r.trainer, r.data.seq_len};
  const auto plan = trainer::plan_training(in, options);
  std::cout << "plan for " << r.name << " (" << args.recipe.string() << ")\n" << trainer::format_plan(plan, in, options);
  return 0;
}

}  // namespace brigade::launch
