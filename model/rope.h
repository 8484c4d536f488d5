// Rotary position embeddings: the frequency tables (plain RoPE and the context
// extensions linear, llama3 and YaRN, computed as transformers' rope init functions
// do) and their application in the rotate-half convention.
//
// YaRN (Peng et al. 2023; DeepSeek-V2/V3): frequencies above the correction range
// [beta_slow, beta_fast] rotations keep their value, those below are divided by
// `factor`, a linear ramp in between; cos and sin are multiplied by the attention
// factor 0.1 ln(factor) + 1 (or mscale/mscale_all_dim's ratio of it). MLA also
// multiplies its softmax scale by mscale_all_dim's factor squared (softmax_scale_factor).
#pragma once

#include <cstdint>
#include <string>

#include <torch/types.h>

namespace brigade::model {

enum class RopeScalingType { kNone, kLinear, kLlama3, kYarn };
std::string to_string(RopeScalingType type);
RopeScalingType parse_rope_scaling_type(const std::string& name);

struct RopeScaling {
  RopeScalingType type = RopeScalingType::kNone;
  double factor = 1.0;                 // context extension ratio (linear, llama3, yarn)
  int64_t original_max_seq_len = 0;    // the pretraining context (llama3, yarn); 0: model.max_seq_len
  double beta_fast = 32.0;             // yarn: rotations where extrapolation ends
  double beta_slow = 1.0;              // yarn: rotations where interpolation begins
  double mscale = 0.0;                 // yarn: 0 = unset (DeepSeek: 1)
  double mscale_all_dim = 0.0;         // yarn: 0 = unset (DeepSeek: 1; also scales MLA's softmax)
  double attention_factor = 0.0;       // yarn: multiplies cos/sin; 0 = derived from factor and mscale
  double low_freq_factor = 1.0;        // llama3
  double high_freq_factor = 4.0;       // llama3
  bool truncate = true;                // yarn: round the correction range to whole dimensions

  bool enabled() const { return type != RopeScalingType::kNone; }
  // Throws an Error naming the key ("model.rope_scaling.factor ...") when a rule fails.
  void validate() const;
  // The factor cos and sin are multiplied by (1 unless yarn).
  double cos_sin_factor() const;
  // MLA's softmax scale multiplier: yarn's mscale(factor, mscale_all_dim)^2 when
  // mscale_all_dim is set (DeepSeek-V2/V3), else 1.
  double softmax_scale_factor() const;
};

struct RopeTables {
  torch::Tensor cos;         // [positions, dim] float32, each frequency repeated over both halves
  torch::Tensor sin_signed;  // [positions, dim] float32: [-sin, sin] over the two halves (see apply_rope)
};

// Tables for `positions` positions of a rotary dimension `dim` (even), base `theta`,
// computed in float64 and cast. `max_seq_len` resolves original_max_seq_len = 0.
RopeTables rope_tables(int64_t dim, int64_t positions, double theta, const RopeScaling& scaling, int64_t max_seq_len);

// x * cos + rotate_half(x) * sin for x [..., seq, dim] and tables narrowed to [seq, dim].
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin_signed);

}  // namespace brigade::model
