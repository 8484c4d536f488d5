#include "moe/experts.h"

#include <ATen/autocast_mode.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu_backward.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>

#include <optional>

#include "core/error.h"
#include "precision/precision.h"

namespace brigade::moe {
namespace {

// Forward and backward are loops of per-expert GEMMs over contiguous row slices,
// with the elementwise SwiGLU done once over all rows. One autograd node for all
// experts: per-expert autograd on slices of the stacked weights would make every
// expert's backward materialise a full-size gradient of the stacked tensor.
class GroupedSwiGLU : public torch::autograd::Function<GroupedSwiGLU> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& row_weights, const torch::Tensor& gate_up,
                               const torch::Tensor& down, const std::vector<int64_t>& counts,
                               precision::Fp8GemmState* fp8) {
    using precision::GemmOperand;
    using precision::GemmPass;
    // Read the autocast dtype before excluding autocast (exclusion is what "off" means);
    // casts are then explicit so autocast does not cast each slice again. FP8 GEMMs
    // are emulated in FP32.
    const auto out_dtype = precision::autocast_dtype_for(x);
    const auto dtype = fp8 ? torch::kFloat : out_dtype;
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto xc = x.to(dtype).contiguous();
    auto wc = row_weights.to(dtype).unsqueeze(1);  // [rows, 1]
    auto w1 = gate_up.to(dtype);
    auto w2 = down.to(dtype);
    // FP8 operands (fake-quantized; the raw tensors when FP8 is off).
    auto q = [&](const torch::Tensor& t, GemmOperand op, GemmPass pass, const char* slot, bool rows) {
      return fp8 ? fp8->qdq_grouped(t, rows ? counts : std::vector<int64_t>{}, op, pass, slot) : t;
    };
    auto xq = q(xc, GemmOperand::kInput, GemmPass::kForward, "input", true);
    auto w1q = q(w1, GemmOperand::kWeight, GemmPass::kForward, "gate_up", false);
    auto w2q = q(w2, GemmOperand::kWeight, GemmPass::kForward, "down", false);
    const int64_t ff = w2.size(2);
    auto h = torch::empty({xc.size(0), 2 * ff}, xc.options());  // [rows, 2 ff]: gate | up
    for_each_expert(counts, [&](int64_t e, int64_t start, int64_t n) {
      auto out = h.narrow(0, start, n);
      at::mm_out(out, xq.narrow(0, start, n), w1q[e].t());
    });
    auto act = torch::silu(h.narrow(1, 0, ff)).mul_(h.narrow(1, ff, ff)).mul_(wc);  // [rows, ff], weighted
    auto aq = q(act, GemmOperand::kInput, GemmPass::kForward, "act", true);
    auto y = torch::empty({xc.size(0), w2.size(1)}, xc.options());
    for_each_expert(counts, [&](int64_t e, int64_t start, int64_t n) {
      auto out = y.narrow(0, start, n);
      at::mm_out(out, aq.narrow(0, start, n), w2q[e].t());
    });
    // Per-tensor FP8 recipes reuse the forward's quantized operands in Wgrad;
    // blockwise re-tiles the raw ones (128x1), so it keeps those.
    const bool reuse = fp8 && fp8->options().recipe != precision::Fp8Recipe::kBlockwise;
    ctx->save_for_backward({reuse ? xq : xc, wc, h, w1q, w2q, reuse ? aq : torch::Tensor()});
    ctx->saved_data["counts"] = c10::IValue(counts);
    ctx->saved_data["fp8"] = reinterpret_cast<int64_t>(fp8);  // owned by the experts module, outlives the graph
    ctx->saved_data["x_dtype"] = c10::IValue(x.scalar_type());
    ctx->saved_data["rw_dtype"] = c10::IValue(row_weights.scalar_type());
    ctx->saved_data["w_dtype"] = c10::IValue(gate_up.scalar_type());
    return y.to(out_dtype);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    using precision::GemmOperand;
    using precision::GemmPass;
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto saved = ctx->get_saved_variables();
    const auto &xs = saved[0], &wc = saved[1], &h = saved[2], &w1 = saved[3], &w2 = saved[4], &aq_saved = saved[5];
    const auto counts = ctx->saved_data["counts"].toIntVector();
    auto* fp8 = reinterpret_cast<precision::Fp8GemmState*>(ctx->saved_data["fp8"].toInt());
    std::optional<precision::Fp8BackwardScope> backward_scope;
    if (fp8) backward_scope.emplace(*fp8);
    const bool blockwise = fp8 && fp8->options().recipe == precision::Fp8Recipe::kBlockwise;
    auto q = [&](const torch::Tensor& t, GemmOperand op, GemmPass pass, const char* slot) {
      return fp8 ? fp8->qdq_grouped(t, counts, op, pass, slot) : t;
    };
    const int64_t ff = w2.size(2);
    auto dy = grads[0].to(xs.scalar_type()).contiguous();  // [rows, d]

    // Recomputed: cheaper than keeping [rows, ff] tensors alive between the passes.
    auto gate = h.narrow(1, 0, ff), up = h.narrow(1, ff, ff);
    auto silu = torch::silu(gate);
    auto act = silu * up;       // unweighted
    auto act_w = act * wc;      // what the down projection saw

    auto dyq = q(dy, GemmOperand::kGradOutput, GemmPass::kDgrad, "grad_down");
    auto dy_t = blockwise ? q(dy, GemmOperand::kGradOutput, GemmPass::kWgrad, "grad_down") : dyq;
    auto act_t = blockwise ? q(act_w, GemmOperand::kInput, GemmPass::kWgrad, "act") : (fp8 ? aq_saved : act_w);
    auto dact_w = torch::empty_like(act);
    auto dw2 = empty_expert_grad(w2, counts);
    for_each_expert(counts, [&](int64_t e, int64_t start, int64_t n) {
      auto out = dact_w.narrow(0, start, n);
      at::mm_out(out, dyq.narrow(0, start, n), w2[e]);  // [n, ff]
      auto dw = dw2[e];
      at::mm_out(dw, dy_t.narrow(0, start, n).t(), act_t.narrow(0, start, n));  // [d, ff]
    });
    auto drow = (dact_w * act).sum(1);  // [rows]: d/d routing weight
    auto dact = dact_w.mul_(wc);
    auto dh = torch::empty_like(h);  // [rows, 2 ff]: d gate | d up
    auto dgate = dh.narrow(1, 0, ff), dup = dh.narrow(1, ff, ff);
    at::silu_backward_out(dgate, dact * up, gate);
    at::mul_out(dup, dact, silu);

    auto dhq = q(dh, GemmOperand::kGradOutput, GemmPass::kDgrad, "grad_gate_up");
    auto dh_t = blockwise ? q(dh, GemmOperand::kGradOutput, GemmPass::kWgrad, "grad_gate_up") : dhq;
    auto x_t = blockwise ? q(xs, GemmOperand::kInput, GemmPass::kWgrad, "input") : xs;
    auto dx = torch::empty_like(xs);
    auto dw1 = empty_expert_grad(w1, counts);
    for_each_expert(counts, [&](int64_t e, int64_t start, int64_t n) {
      auto out = dx.narrow(0, start, n);
      at::mm_out(out, dhq.narrow(0, start, n), w1[e]);  // [n, d]
      auto dw = dw1[e];
      at::mm_out(dw, dh_t.narrow(0, start, n).t(), x_t.narrow(0, start, n));  // [2 ff, d]
    });
    const auto x_dtype = ctx->saved_data["x_dtype"].toScalarType();
    const auto rw_dtype = ctx->saved_data["rw_dtype"].toScalarType();
    const auto w_dtype = ctx->saved_data["w_dtype"].toScalarType();
    return {dx.to(x_dtype), drow.to(rw_dtype), dw1.to(w_dtype), dw2.to(w_dtype), torch::Tensor(), torch::Tensor()};
  }

 private:
  // Calls fn(expert, first row, rows) for every expert that received rows.
  template <typename Fn>
  static void for_each_expert(const std::vector<int64_t>& counts, Fn&& fn) {
    int64_t start = 0;
    for (size_t e = 0; e < counts.size(); ++e) {
      if (counts[e] > 0) fn(static_cast<int64_t>(e), start, counts[e]);
      start += counts[e];
    }
  }
  // A gradient buffer for stacked expert weights: GEMMs overwrite the slices of
  // experts with rows; only idle experts need zeros (saves a full-size fill).
  static torch::Tensor empty_expert_grad(const torch::Tensor& weight, const std::vector<int64_t>& counts) {
    auto grad = torch::empty_like(weight);
    for (size_t e = 0; e < counts.size(); ++e) {
      if (counts[e] == 0) grad[static_cast<int64_t>(e)].zero_();
    }
    return grad;
  }
};

}  // namespace

GroupedExpertsImpl::GroupedExpertsImpl(int64_t num_experts, int64_t d_model, int64_t d_ff) {
  gate_up_proj = register_parameter("gate_up_proj", torch::empty({num_experts, 2 * d_ff, d_model}));
  down_proj = register_parameter("down_proj", torch::empty({num_experts, d_model, d_ff}));
}

torch::Tensor GroupedExpertsImpl::forward(const torch::Tensor& tokens, const torch::Tensor& weights,
                                          const std::vector<int64_t>& counts) {
  if (fp8_) fp8_->set_recording(torch::GradMode::is_enabled());
  return grouped_swiglu(tokens, weights, gate_up_proj, down_proj, counts, fp8_.get());
}

void GroupedExpertsImpl::keep_experts(int64_t first, int64_t count) {
  BRIGADE_CHECK(first >= 0 && count > 0 && first + count <= num_experts(), "cannot keep experts [", first, ", ",
                first + count, ") of ", num_experts());
  torch::NoGradGuard no_grad;
  // set_data swaps the storage under the registered parameter objects, so their
  // names and identities (what modules and hooks hold) stay; a gradient of the old
  // shape would no longer fit.
  for (auto* p : {&gate_up_proj, &down_proj}) {
    p->set_data(p->narrow(0, first, count).clone());
    p->mutable_grad() = torch::Tensor();
  }
}

void GroupedExpertsImpl::enable_fp8(const precision::Fp8Options& options, const std::string& name) {
  fp8_ = options.enabled() ? std::make_unique<precision::Fp8GemmState>(options, name) : nullptr;
}

torch::Tensor grouped_swiglu(const torch::Tensor& tokens, const torch::Tensor& row_weights,
                             const torch::Tensor& gate_up, const torch::Tensor& down,
                             const std::vector<int64_t>& counts, precision::Fp8GemmState* fp8) {
  BRIGADE_ASSERT(static_cast<int64_t>(counts.size()) == gate_up.size(0), counts.size(), " counts for ", gate_up.size(0), " experts");
  int64_t rows = 0;
  for (auto c : counts) rows += c;
  BRIGADE_ASSERT(tokens.dim() == 2 && tokens.size(0) == rows && tokens.size(1) == gate_up.size(2), "tokens ",
                 tokens.sizes(), " do not match ", rows, " counted rows of width ", gate_up.size(2));
  BRIGADE_ASSERT(row_weights.dim() == 1 && row_weights.size(0) == rows, "row weights ", row_weights.sizes(),
                 " for ", rows, " rows");
  return GroupedSwiGLU::apply(tokens, row_weights, gate_up, down, counts, fp8);
}

}  // namespace brigade::moe
