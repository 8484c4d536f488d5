#include "moe/experts.h"

#include <ATen/autocast_mode.h>
#include <ATen/ops/_grouped_mm.h>
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

// Every expert GEMM of a pass is one grouped GEMM (at::_grouped_mm: CUTLASS on
// Hopper in BF16, LibTorch's per-group loop elsewhere, bit-identical to it on the
// CPU), with the elementwise SwiGLU done once over all rows. Shapes whose rows are
// not 16-byte aligned (d_model or d_ff not a multiple of 16 bytes / element), and
// float64, run the same GEMMs as a loop of at::mm. One autograd node for all
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
    const auto ends = grouped_ends(counts, xc, ff);  // undefined: loop of at::mm
    // [rows, 2 ff]: gate | up
    auto h = rows_times_experts(xq, w1q.transpose(1, 2), counts, ends);
    auto act = torch::silu(h.narrow(1, 0, ff)).mul_(h.narrow(1, ff, ff)).mul_(wc);  // [rows, ff], weighted
    auto aq = q(act, GemmOperand::kInput, GemmPass::kForward, "act", true);
    auto y = rows_times_experts(aq, w2q.transpose(1, 2), counts, ends);
    // Per-tensor FP8 recipes reuse the forward's quantized operands in Wgrad;
    // blockwise re-tiles the raw ones (128x1), so it keeps those.
    const bool reuse = fp8 && fp8->options().recipe != precision::Fp8Recipe::kBlockwise;
    ctx->save_for_backward({reuse ? xq : xc, wc, h, w1q, w2q, reuse ? aq : torch::Tensor()});
    ctx->saved_data["counts"] = c10::IValue(counts);
    ctx->saved_data["ends"] = ends;
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
    const auto ends = ctx->saved_data["ends"].toTensor();  // undefined: the loop
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
    auto dact_w = rows_times_experts(dyq, w2, counts, ends);                 // [rows, ff]
    auto dw2 = expert_weight_grads(dy_t, act_t, counts, ends, w2.sizes());  // [experts, d, ff]
    auto drow = (dact_w * act).sum(1);  // [rows]: d/d routing weight
    auto dact = dact_w.mul_(wc);
    auto dh = torch::empty_like(h);  // [rows, 2 ff]: d gate | d up
    auto dgate = dh.narrow(1, 0, ff), dup = dh.narrow(1, ff, ff);
    at::silu_backward_out(dgate, dact * up, gate);
    at::mul_out(dup, dact, silu);

    auto dhq = q(dh, GemmOperand::kGradOutput, GemmPass::kDgrad, "grad_gate_up");
    auto dh_t = blockwise ? q(dh, GemmOperand::kGradOutput, GemmPass::kWgrad, "grad_gate_up") : dhq;
    auto x_t = blockwise ? q(xs, GemmOperand::kInput, GemmPass::kWgrad, "input") : xs;
    auto dx = rows_times_experts(dhq, w1, counts, ends);                    // [rows, d]
    auto dw1 = expert_weight_grads(dh_t, x_t, counts, ends, w1.sizes());  // [experts, 2 ff, d]
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
  // The group ends at::_grouped_mm takes (int32, on the rows' device), or an
  // undefined tensor when the shapes do not meet its 16-byte alignment.
  static torch::Tensor grouped_ends(const std::vector<int64_t>& counts, const torch::Tensor& x, int64_t ff) {
    const auto dtype = x.scalar_type();
    if (dtype != torch::kFloat && dtype != torch::kBFloat16 && dtype != torch::kHalf) return {};  // float64 references
    const int64_t align = 16 / static_cast<int64_t>(x.element_size());
    const bool aligned = x.size(1) % align == 0 && ff % align == 0 &&
                         reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
    if (!aligned) return {};
    std::vector<int32_t> ends;
    int64_t end = 0;
    for (int64_t c : counts) ends.push_back(static_cast<int32_t>(end += c));
    return torch::tensor(ends, torch::kInt).to(x.device(), /*non_blocking=*/true);
  }
  // Row r of expert e's slice times w[e] ([experts, k, n], any strides): [rows, n].
  static torch::Tensor rows_times_experts(const torch::Tensor& x, const torch::Tensor& w,
                                          const std::vector<int64_t>& counts, const torch::Tensor& ends) {
    if (ends.defined()) return at::_grouped_mm(x, w, ends);
    auto out = torch::empty({x.size(0), w.size(2)}, x.options());
    for_each_expert(counts, [&](int64_t e, int64_t start, int64_t n) {
      auto slice = out.narrow(0, start, n);
      at::mm_out(slice, x.narrow(0, start, n), w[e]);
    });
    return out;
  }
  // Stacked expert weight gradients: dw[e] = g_e^T a_e over expert e's rows. Idle
  // experts get zeros (the output is not zero-filled, and a group with no rows has
  // nothing to write).
  static torch::Tensor expert_weight_grads(const torch::Tensor& g, const torch::Tensor& a,
                                           const std::vector<int64_t>& counts, const torch::Tensor& ends,
                                           c10::IntArrayRef shape) {
    torch::Tensor grad;
    if (ends.defined()) {
      grad = at::_grouped_mm(g.t(), a, ends);
    } else {
      grad = torch::empty(shape, g.options());
      for_each_expert(counts, [&](int64_t e, int64_t start, int64_t n) {
        auto dw = grad[e];
        at::mm_out(dw, g.narrow(0, start, n).t(), a.narrow(0, start, n));
      });
    }
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
