// The router ("gate" in Hugging Face's DeepSeek-V3 names): scores every expert per
// token, adds the balancing bias for selection only, restricts each token to its
// best topk_group groups, takes the top_k experts and returns their combine weights.
// All router math runs in FP32 whatever the compute dtype.
#pragma once

#include <cstdint>

#include <torch/nn/module.h>

#include "moe/options.h"

namespace brigade::moe {

struct Routing {
  torch::Tensor indices;  // [tokens, top_k] int64, chosen experts (best first)
  torch::Tensor weights;  // [tokens, top_k] float32 combine weights (normalised, scaled)
  torch::Tensor scores;   // [tokens, experts] float32 softmax/sigmoid scores, no bias
  torch::Tensor logits;   // [tokens, experts] float32 raw router logits
};

// Selection only (no gradients): top_k experts per token from `selection_scores`
// (scores + bias), limited to each token's best `topk_group` groups, a group ranked
// by the sum of its two best selection scores (its best one when groups have size 1)
// or, with GroupScore::kMax, by its best score.
torch::Tensor select_experts(const torch::Tensor& selection_scores, const MoEOptions& options);

class RouterImpl : public torch::nn::Module {
 public:
  RouterImpl(int64_t d_model, MoEOptions options);
  Routing forward(const torch::Tensor& x);  // x: [tokens, d_model]

  torch::Tensor weight;                   // [experts, d_model] parameter
  torch::Tensor e_score_correction_bias;  // [experts] float32 buffer: balancing state, not trained by gradients

 private:
  MoEOptions options_;
};
TORCH_MODULE(Router);

}  // namespace brigade::moe
