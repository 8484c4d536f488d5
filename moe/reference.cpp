#include "moe/reference.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "moe/permute.h"

namespace brigade::moe {
namespace {

torch::Tensor swiglu(const torch::Tensor& x, const torch::Tensor& gate, const torch::Tensor& up,
                     const torch::Tensor& down) {
  return torch::mv(down, torch::silu(torch::mv(gate, x)) * torch::mv(up, x));
}

// Indices of the n largest values, largest first (ties: lower index first).
std::vector<int64_t> best(const std::vector<double>& values, int64_t n) {
  std::vector<int64_t> order(values.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return values[a] > values[b]; });
  order.resize(n);
  return order;
}

}  // namespace

ReferenceOutput reference_moe(const torch::Tensor& x, const ReferenceWeights& w, const MoEOptions& o) {
  const int64_t tokens = x.size(0), experts = o.num_experts, per_group = experts / o.num_groups;
  ReferenceOutput out;
  std::vector<torch::Tensor> rows;
  std::vector<std::vector<torch::Tensor>> weights(tokens);  // differentiable combine weights
  for (int64_t t = 0; t < tokens; ++t) {
    auto xt = x[t];
    auto logits = torch::mv(w.router, xt);  // [experts]
    auto scores = o.score_function == ScoreFunction::kSoftmax ? logits.softmax(0) : logits.sigmoid();
    std::vector<double> choice(experts);
    for (int64_t e = 0; e < experts; ++e) choice[e] = scores[e].item<double>() + w.bias[e].item<double>();
    // Group-limited routing: rank groups by the sum of their two best choice scores
    // (or by their best one, GroupScore::kMax).
    std::vector<double> group_score(o.num_groups, 0.0);
    for (int64_t g = 0; g < o.num_groups; ++g) {
      std::vector<double> members(choice.begin() + g * per_group, choice.begin() + (g + 1) * per_group);
      const int64_t counted = o.group_score == GroupScore::kMax ? 1 : std::min<int64_t>(2, per_group);
      for (int64_t i : best(members, counted)) group_score[g] += members[i];
    }
    std::vector<bool> allowed(experts, false);
    for (int64_t g : best(group_score, o.topk_group)) {
      for (int64_t e = g * per_group; e < (g + 1) * per_group; ++e) allowed[e] = true;
    }
    for (int64_t e = 0; e < experts; ++e) {
      if (!allowed[e]) choice[e] = -INFINITY;
    }
    out.selected.push_back(best(choice, o.top_k));
    torch::Tensor sum = torch::zeros({}, x.options());
    for (int64_t e : out.selected[t]) sum = sum + scores[e];
    for (int64_t e : out.selected[t]) {
      auto weight = o.normalize_topk ? scores[e] / (sum + 1e-20) : scores[e];
      weights[t].push_back(weight * o.routed_scaling);
    }
  }

  // Capacity: walk copies in the policy's priority order, keep while the expert has room.
  std::vector<std::vector<bool>> keep(tokens, std::vector<bool>(o.top_k, true));
  if (!o.dropless) {
    const int64_t capacity = expert_capacity(o, tokens);
    std::vector<std::pair<int64_t, int64_t>> copies;  // (token, slot)
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t k = 0; k < o.top_k; ++k) copies.emplace_back(t, k);
    }
    if (o.drop_policy == DropPolicy::kProbs) {
      std::stable_sort(copies.begin(), copies.end(), [&](const std::pair<int64_t, int64_t>& a, const std::pair<int64_t, int64_t>& b) {
        return weights[a.first][a.second].item<double>() > weights[b.first][b.second].item<double>();
      });
    }
    std::vector<int64_t> used(experts, 0);
    for (auto [t, k] : copies) {
      const int64_t e = out.selected[t][k];
      keep[t][k] = used[e] < capacity;
      used[e] += keep[t][k] ? 1 : 0;
    }
  }

  for (int64_t t = 0; t < tokens; ++t) {
    auto xt = x[t];
    auto yt = torch::zeros_like(xt);
    out.computed.emplace_back();
    for (int64_t k = 0; k < o.top_k; ++k) {
      if (!keep[t][k]) continue;
      const int64_t e = out.selected[t][k];
      out.computed[t].push_back(e);
      const int64_t ff = w.down.size(2);
      auto expert = swiglu(xt, w.gate_up[e].narrow(0, 0, ff), w.gate_up[e].narrow(0, ff, ff), w.down[e]);
      yt = yt + weights[t][k] * expert;
    }
    if (w.shared_gate.defined()) yt = yt + swiglu(xt, w.shared_gate, w.shared_up, w.shared_down);
    rows.push_back(yt);
  }
  out.y = torch::stack(rows);
  return out;
}

}  // namespace brigade::moe
