#include "precision/fp8_recipe.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace brigade::precision {

const std::vector<std::string>& fp8_module_kinds() {
  static const std::vector<std::string> kinds = {"attention", "mlp", "experts", "lm_head"};
  return kinds;
}

bool Fp8Options::covers(const std::string& kind) const {
  return enabled() && std::find(modules.begin(), modules.end(), kind) != modules.end();
}

QuantizeOptions Fp8Options::operand(GemmOperand op, GemmPass pass, const std::string& name) const {
  QuantizeOptions q;
  q.name = name;
  q.power_of_two_scales = power_of_two_scales;
  q.format = (formats == Fp8Formats::kHybrid && op == GemmOperand::kGradOutput) ? Fp8Format::kE5M2 : Fp8Format::kE4M3;
  switch (recipe) {
    case Fp8Recipe::kCurrent: q.mode = ScalingMode::kPerTensorCurrent; break;
    case Fp8Recipe::kDelayed: q.mode = ScalingMode::kPerTensorDelayed; break;
    case Fp8Recipe::kBlockwise:
    case Fp8Recipe::kNone:
      // Scale groups run along the GEMM's contraction dimension.
      if (op == GemmOperand::kWeight) q.mode = ScalingMode::kBlock128x128;
      else if (pass == GemmPass::kWgrad) q.mode = ScalingMode::kTile128x1;  // contracts over tokens
      else q.mode = ScalingMode::kTile1x128;
      break;
  }
  return q;
}

void Fp8Options::validate() const {
  BRIGADE_CHECK(amax_history >= 1, "precision.fp8_amax_history must be >= 1, got ", amax_history);
  BRIGADE_CHECK(std::isfinite(margin) && margin >= 0, "precision.fp8_margin must be >= 0, got ", margin);
  for (const auto& m : modules) {
    const auto& kinds = fp8_module_kinds();
    BRIGADE_CHECK(std::find(kinds.begin(), kinds.end(), m) != kinds.end(), "precision.fp8_modules: unknown module kind '",
                  m, "' (expected any of attention, mlp, experts, lm_head)");
  }
}

std::string to_string(Fp8Recipe r) {
  switch (r) {
    case Fp8Recipe::kNone: return "none";
    case Fp8Recipe::kBlockwise: return "blockwise";
    case Fp8Recipe::kCurrent: return "current";
    case Fp8Recipe::kDelayed: return "delayed";
  }
  return "?";
}

Fp8Recipe parse_fp8_recipe(const std::string& name) {
  for (auto r : {Fp8Recipe::kNone, Fp8Recipe::kBlockwise, Fp8Recipe::kCurrent, Fp8Recipe::kDelayed}) {
    if (to_string(r) == name) return r;
  }
  BRIGADE_FAIL("unknown FP8 recipe '", name, "' (expected none, blockwise, current or delayed)");
}

std::string to_string(Fp8Formats f) { return f == Fp8Formats::kE4M3 ? "e4m3" : "hybrid"; }

Fp8Formats parse_fp8_formats(const std::string& name) {
  if (name == "e4m3") return Fp8Formats::kE4M3;
  if (name == "hybrid") return Fp8Formats::kHybrid;
  BRIGADE_FAIL("unknown FP8 formats '", name, "' (expected e4m3 or hybrid)");
}

std::string to_string(DelayedScaling::Algorithm a) {
  return a == DelayedScaling::Algorithm::kMax ? "max" : "most_recent";
}

DelayedScaling::Algorithm parse_amax_algorithm(const std::string& name) {
  if (name == "max") return DelayedScaling::Algorithm::kMax;
  if (name == "most_recent") return DelayedScaling::Algorithm::kMostRecent;
  BRIGADE_FAIL("unknown amax algorithm '", name, "' (expected max or most_recent)");
}

}  // namespace brigade::precision
