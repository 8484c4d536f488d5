#include "moe/options.h"

#include "core/error.h"

namespace brigade::moe {

void MoEOptions::validate(int64_t n_layers) const {
  BRIGADE_CHECK(num_experts >= 0, "model.moe.num_experts must be >= 0 (0 = dense), got ", num_experts);
  if (!enabled()) return;
  BRIGADE_CHECK(top_k >= 1 && top_k <= num_experts, "model.moe.top_k (", top_k,
                ") must be between 1 and model.moe.num_experts (", num_experts, ")");
  BRIGADE_CHECK(num_shared_experts >= 0, "model.moe.num_shared_experts must be >= 0, got ", num_shared_experts);
  BRIGADE_CHECK(expert_d_ff >= 0, "model.moe.expert_d_ff must be >= 0 (0 = model.d_ff), got ", expert_d_ff);
  BRIGADE_CHECK(shared_d_ff >= 0, "model.moe.shared_d_ff must be >= 0, got ", shared_d_ff);
  BRIGADE_CHECK(first_k_dense >= 0 && first_k_dense < n_layers, "model.moe.first_k_dense (", first_k_dense,
                ") must be in [0, model.n_layers) = [0, ", n_layers, ") so at least one layer is MoE");
  BRIGADE_CHECK(num_groups >= 1, "model.moe.num_groups must be >= 1, got ", num_groups);
  BRIGADE_CHECK(num_experts % num_groups == 0, "model.moe.num_groups (", num_groups,
                ") must divide model.moe.num_experts (", num_experts, ")");
  BRIGADE_CHECK(topk_group >= 1 && topk_group <= num_groups, "model.moe.topk_group (", topk_group,
                ") must be between 1 and model.moe.num_groups (", num_groups, ")");
  BRIGADE_CHECK(top_k <= topk_group * (num_experts / num_groups), "model.moe.top_k (", top_k,
                ") exceeds the experts reachable in model.moe.topk_group (", topk_group, ") groups of ",
                num_experts / num_groups);
  BRIGADE_CHECK(routed_scaling > 0, "model.moe.routed_scaling must be positive, got ", routed_scaling);
  BRIGADE_CHECK(bias_update_rate >= 0, "model.moe.bias_update_rate must be >= 0 (0 disables), got ", bias_update_rate);
  BRIGADE_CHECK(seq_aux_loss >= 0, "model.moe.seq_aux_loss must be >= 0, got ", seq_aux_loss);
  BRIGADE_CHECK(batch_aux_loss >= 0, "model.moe.batch_aux_loss must be >= 0, got ", batch_aux_loss);
  BRIGADE_CHECK(z_loss >= 0, "model.moe.z_loss must be >= 0, got ", z_loss);
  BRIGADE_CHECK(capacity_factor > 0.0, "model.moe.capacity_factor must be positive, got ", capacity_factor,
                " (for no capacity limit set model.moe.dropless: true)");
}

std::string to_string(ScoreFunction f) { return f == ScoreFunction::kSoftmax ? "softmax" : "sigmoid"; }

ScoreFunction parse_score_function(const std::string& name) {
  if (name == "softmax") return ScoreFunction::kSoftmax;
  if (name == "sigmoid") return ScoreFunction::kSigmoid;
  BRIGADE_FAIL("unknown router score function '", name, "' (expected softmax or sigmoid)");
}

std::string to_string(GroupScore g) { return g == GroupScore::kMax ? "max" : "top2_sum"; }

GroupScore parse_group_score(const std::string& name) {
  if (name == "top2_sum") return GroupScore::kTopTwoSum;
  if (name == "max") return GroupScore::kMax;
  BRIGADE_FAIL("unknown group score '", name, "' (expected top2_sum or max)");
}

std::string to_string(DropPolicy p) { return p == DropPolicy::kProbs ? "probs" : "position"; }

DropPolicy parse_drop_policy(const std::string& name) {
  if (name == "probs") return DropPolicy::kProbs;
  if (name == "position") return DropPolicy::kPosition;
  BRIGADE_FAIL("unknown token drop policy '", name, "' (expected probs or position)");
}

}  // namespace brigade::moe
