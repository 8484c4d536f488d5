// FP8 training recipes: which scaling each GEMM operand gets in each pass.
//
//   blockwise (DeepSeek-V3)  inputs 1x128 tiles; weights 128x128 blocks; output
//                            gradients 1x128 for dgrad; dgrad/wgrad operands that
//                            contract over tokens (inputs, output gradients) 128x1
//   current                  per-tensor scales from each tensor's own amax
//   delayed                  per-tensor scales from an amax history (Transformer Engine's default)
//
// Formats: e4m3 everywhere (DeepSeek-V3), or hybrid (E4M3 forward, E5M2 gradients).
// Every FP8 GEMM accumulates in FP32; on the CPU the operands are quantized and
// dequantized (emulation) and the product runs in FP32.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "precision/quantize.h"

namespace brigade::precision {

enum class Fp8Recipe { kNone, kBlockwise, kCurrent, kDelayed };
enum class Fp8Formats { kE4M3, kHybrid };
enum class GemmOperand { kInput, kWeight, kGradOutput };
enum class GemmPass { kForward, kDgrad, kWgrad };

struct Fp8Options {
  Fp8Recipe recipe = Fp8Recipe::kNone;
  Fp8Formats formats = Fp8Formats::kE4M3;
  bool power_of_two_scales = false;
  int64_t amax_history = 16;  // delayed: steps of amax kept
  double margin = 0.0;        // delayed: scales get 2^margin headroom
  DelayedScaling::Algorithm amax_algorithm = DelayedScaling::Algorithm::kMax;
  // Module kinds whose GEMMs run in FP8. The rest (and always the embedding,
  // norms, router and attention core) stay in the compute dtype.
  std::vector<std::string> modules = {"attention", "mlp", "experts"};
  // On CUDA, FP8 runs brigade's own quantize kernels and cuBLASLt GEMMs: opt-in until
  // they have passed their *_CUDA tests on a GPU (docs/gpu.md).
  bool cuda_kernels = false;

  bool enabled() const { return recipe != Fp8Recipe::kNone; }
  bool covers(const std::string& module_kind) const;
  // How `operand` is quantized for `pass` under this recipe.
  QuantizeOptions operand(GemmOperand operand, GemmPass pass, const std::string& name) const;
  // Throws an Error naming the recipe key.
  void validate() const;
};

// The module kinds that may be listed in precision.fp8_modules.
const std::vector<std::string>& fp8_module_kinds();

std::string to_string(Fp8Recipe recipe);
Fp8Recipe parse_fp8_recipe(const std::string& name);
std::string to_string(Fp8Formats formats);
Fp8Formats parse_fp8_formats(const std::string& name);
std::string to_string(DelayedScaling::Algorithm algorithm);
DelayedScaling::Algorithm parse_amax_algorithm(const std::string& name);

}  // namespace brigade::precision
