// Options of a DeepSeekMoE feed-forward layer (DeepSeek-V3, section 2.1): shared
// experts that see every token plus fine-grained routed experts, of which each
// token uses top_k, chosen by a router with optional group-limited routing.
#pragma once

#include <cstdint>
#include <string>

namespace brigade::moe {

enum class ScoreFunction { kSoftmax, kSigmoid };
// How group-limited routing ranks a group of experts.
enum class GroupScore {
  kTopTwoSum,  // the sum of its two best selection scores (DeepSeek-V3's noaux_tc)
  kMax,        // its best score (DeepSeek-V2's group_limited_greedy)
};
// Which token copies an expert keeps when it receives more than its capacity.
enum class DropPolicy {
  kProbs,     // the copies with the highest routing weight (Megatron-Core "probs")
  kPosition,  // the earliest tokens in the batch (Megatron-Core "position")
};

struct MoEOptions {
  int64_t num_experts = 0;         // routed experts; 0 = dense model (no MoE layers)
  int64_t top_k = 2;               // routed experts per token
  int64_t num_shared_experts = 1;  // always-on experts, fused into one SwiGLU
  int64_t expert_d_ff = 0;         // routed expert intermediate size; 0 = the dense d_ff (Megatron-Core's default)
  int64_t shared_d_ff = 0;         // shared experts' intermediate size; 0 = expert_d_ff * num_shared_experts
  int64_t first_k_dense = 0;       // the first layers keep a dense MLP (DeepSeek-V3: 3)
  ScoreFunction score_function = ScoreFunction::kSigmoid;
  int64_t num_groups = 1;          // experts split into groups for group-limited routing
  int64_t topk_group = 1;          // groups a token may route to (<= num_groups)
  GroupScore group_score = GroupScore::kTopTwoSum;
  bool normalize_topk = true;      // divide the top-k weights by their sum
  double routed_scaling = 1.0;     // multiplies the combine weights (DeepSeek-V3: 2.5)
  // Aux-loss-free balancing: bias += rate * sign(mean_load - load) after each step.
  double bias_update_rate = 0.001;
  double seq_aux_loss = 0.0;       // sequence-wise balance loss coefficient (alpha)
  double batch_aux_loss = 0.0;     // micro-batch balance loss coefficient
  double z_loss = 0.0;             // router z-loss coefficient
  bool dropless = true;            // every token copy is computed; false: capacity per expert
  double capacity_factor = 1.25;   // capacity = ceil(cf * tokens * top_k / experts) when not dropless
  DropPolicy drop_policy = DropPolicy::kProbs;

  bool enabled() const { return num_experts > 0; }
  int64_t expert_size(int64_t dense_d_ff) const { return expert_d_ff > 0 ? expert_d_ff : dense_d_ff; }
  int64_t shared_size(int64_t dense_d_ff) const {
    return shared_d_ff > 0 ? shared_d_ff : expert_size(dense_d_ff) * num_shared_experts;
  }
  // Throws an Error naming the recipe key ("model.moe.top_k ...") when a rule fails.
  void validate(int64_t n_layers) const;
};

std::string to_string(ScoreFunction f);
ScoreFunction parse_score_function(const std::string& name);
std::string to_string(GroupScore g);
GroupScore parse_group_score(const std::string& name);
std::string to_string(DropPolicy p);
DropPolicy parse_drop_policy(const std::string& name);

}  // namespace brigade::moe
