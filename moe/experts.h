// Routed experts: num_experts SwiGLU MLPs with stacked weights (Hugging Face
// DeepSeek-V3 layout), computed over a token buffer already sorted by expert.
//
// ExpertsImpl is the one interface for "run every expert over its contiguous slice";
// GroupedExperts is the implementation on one device: one grouped GEMM per pass
// (at::_grouped_mm) inside one autograd node, FP8 experts through the same node.
// Expert-parallel dispatch wraps the same forward().
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>

#include "precision/linear.h"

namespace brigade::moe {

class ExpertsImpl : public torch::nn::Module {
 public:
  // tokens: [rows, d_model], rows of expert e at [offsets[e], offsets[e+1]).
  // weights: [rows] routing weight of each row, applied to the row's output.
  // counts: [experts] rows per expert. Returns [rows, d_model], weighted.
  virtual torch::Tensor forward(const torch::Tensor& tokens, const torch::Tensor& weights,
                                const std::vector<int64_t>& counts) = 0;
  // Runs the expert GEMMs in FP8 under `options` (no-op when FP8 is off).
  virtual void enable_fp8(const precision::Fp8Options& options, const std::string& name) = 0;
  virtual precision::Fp8GemmState* fp8() = 0;
  // Parameters one token touches per expert (for activated-parameter counts).
  virtual int64_t parameters_per_expert() const = 0;
  // Experts this module holds: all of the layer's, or this rank's slice under expert parallelism.
  virtual int64_t num_experts() const = 0;
  // Keeps only experts [first, first + count) (expert parallelism): the parameters
  // keep their names and objects, their values become that slice. Call before an
  // optimizer captures the parameters.
  virtual void keep_experts(int64_t first, int64_t count) = 0;
};

class GroupedExpertsImpl : public ExpertsImpl {
 public:
  GroupedExpertsImpl(int64_t num_experts, int64_t d_model, int64_t d_ff);
  torch::Tensor forward(const torch::Tensor& tokens, const torch::Tensor& weights,
                        const std::vector<int64_t>& counts) override;
  void enable_fp8(const precision::Fp8Options& options, const std::string& name) override;
  precision::Fp8GemmState* fp8() override { return fp8_.get(); }
  int64_t parameters_per_expert() const override { return gate_up_proj[0].numel() + down_proj[0].numel(); }
  int64_t num_experts() const override { return gate_up_proj.size(0); }
  void keep_experts(int64_t first, int64_t count) override;

  torch::Tensor gate_up_proj;  // [experts, 2 * d_ff, d_model]: gate rows then up rows
  torch::Tensor down_proj;     // [experts, d_model, d_ff]

 private:
  std::unique_ptr<precision::Fp8GemmState> fp8_;
};
TORCH_MODULE(GroupedExperts);

// The grouped expert math on explicit weights: row r of expert e gives
// w_r * down_e(silu(gate_e x_r) * up_e x_r). The routing weight scales the
// d_ff-wide activation before the down projection (the same product, but on
// d_ff-wide rows instead of d_model-wide ones: fine-grained experts have d_ff < d_model).
// With `fp8`, every GEMM operand is quantized as its recipe says (emulated in FP32).
torch::Tensor grouped_swiglu(const torch::Tensor& tokens, const torch::Tensor& row_weights,
                             const torch::Tensor& gate_up, const torch::Tensor& down,
                             const std::vector<int64_t>& counts, precision::Fp8GemmState* fp8 = nullptr);

}  // namespace brigade::moe
