#include "precision/linear.h"

#include <algorithm>
#include <optional>

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>

#include "core/error.h"
#include "precision/fp8_gemm.h"
#include "precision/precision.h"

namespace brigade::precision {
namespace {

// The FP8 quantizers take float32 or bfloat16; anything else widens to float32.
torch::Tensor fp8_input(const torch::Tensor& x) {
  return x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16 ? x : x.to(torch::kFloat);
}

class Fp8LinearFunction : public torch::autograd::Function<Fp8LinearFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight, Fp8GemmState* state) {
    const auto out_dtype = autocast_dtype_for(x);  // read before autocast is excluded
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    if (x.is_cuda()) return forward_cuda(ctx, x, weight, state, out_dtype);
    auto x2 = x.reshape({-1, x.size(-1)}).to(torch::kFloat);
    auto qx = state->qdq(x2, GemmOperand::kInput, GemmPass::kForward, "input");
    auto qw = state->qdq(weight.to(torch::kFloat), GemmOperand::kWeight, GemmPass::kForward, "weight");
    auto y = torch::mm(qx, qw.t());
    const bool per_tensor = state->options().recipe != Fp8Recipe::kBlockwise;
    // Wgrad contracts over tokens: per-tensor recipes reuse the forward's quantized
    // input, blockwise re-tiles the raw input 128x1.
    ctx->save_for_backward({per_tensor ? qx : x2, qw});
    ctx->saved_data["state"] = reinterpret_cast<int64_t>(state);  // owned by the module, outlives the graph
    ctx->saved_data["x_dtype"] = c10::IValue(x.scalar_type());
    ctx->saved_data["w_dtype"] = c10::IValue(weight.scalar_type());
    auto shape = x.sizes().vec();
    shape.back() = weight.size(0);
    return y.view(shape).to(out_dtype);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto* state = reinterpret_cast<Fp8GemmState*>(ctx->saved_data["state"].toInt());
    Fp8BackwardScope backward_scope(*state);
    if (ctx->saved_data.find("cuda") != ctx->saved_data.end()) return backward_cuda(ctx, grads, *state);
    auto saved = ctx->get_saved_variables();
    const auto& x_saved = saved[0];
    const auto& qw = saved[1];
    auto dy = grads[0].reshape({-1, qw.size(0)}).to(torch::kFloat);
    auto qdy = state->qdq(dy, GemmOperand::kGradOutput, GemmPass::kDgrad, "grad_output");
    auto dx = torch::mm(qdy, qw);
    torch::Tensor dw;
    if (state->options().recipe == Fp8Recipe::kBlockwise) {
      auto dy_t = state->qdq(dy, GemmOperand::kGradOutput, GemmPass::kWgrad, "grad_output");
      auto x_t = state->qdq(x_saved, GemmOperand::kInput, GemmPass::kWgrad, "input");
      dw = torch::mm(dy_t.t(), x_t);
    } else {
      dw = torch::mm(qdy.t(), x_saved);  // per tensor: the same quantized operands
    }
    auto shape = grads[0].sizes().vec();
    shape.back() = qw.size(1);
    return {dx.view(shape).to(ctx->saved_data["x_dtype"].toScalarType()),
            dw.to(ctx->saved_data["w_dtype"].toScalarType()), torch::Tensor()};
  }

 private:
  // CUDA: the same operands as the emulation above, multiplied by cuBLASLt FP8
  // GEMMs on their codes (layouts: fp8_cuda.h). Saved for backward: the weight's
  // codes and scales, and the input's codes and scales (per-tensor recipes) or the
  // raw input (blockwise re-tiles it 128x1 for Wgrad).
  static torch::Tensor forward_cuda(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                                    const torch::Tensor& weight, Fp8GemmState* state, c10::ScalarType out_dtype) {
    auto x2 = fp8_input(x.reshape({-1, x.size(-1)}));  // [tokens, in]
    auto qx = state->quantize(x2, GemmOperand::kInput, GemmPass::kForward, "input");
    auto qw = state->quantize(fp8_input(weight), GemmOperand::kWeight, GemmPass::kForward, "weight");
    auto y = fp8_gemm(qx, qw, out_dtype);  // Fprop: [tokens, out]
    const bool per_tensor = state->options().recipe != Fp8Recipe::kBlockwise;
    ctx->save_for_backward({per_tensor ? qx.data : x2, per_tensor ? qx.scales : torch::Tensor(), qw.data, qw.scales});
    ctx->saved_data["state"] = reinterpret_cast<int64_t>(state);  // owned by the module, outlives the graph
    ctx->saved_data["x_dtype"] = c10::IValue(x.scalar_type());
    ctx->saved_data["w_dtype"] = c10::IValue(weight.scalar_type());
    ctx->saved_data["cuda"] = true;
    auto shape = x.sizes().vec();
    shape.back() = weight.size(0);
    return y.view(shape);
  }

  // A saved operand back as a QuantizedTensor (mode and format from the recipe).
  static QuantizedTensor saved_operand(const Fp8GemmState& state, const torch::Tensor& data,
                                       const torch::Tensor& scales, GemmOperand operand) {
    const auto o = state.options().operand(operand, GemmPass::kForward, state.name());
    QuantizedTensor q;
    q.data = data;
    q.scales = scales;
    q.mode = o.mode;
    q.format = o.format;
    return q;
  }

  static torch::autograd::variable_list backward_cuda(torch::autograd::AutogradContext* ctx,
                                                      const torch::autograd::variable_list& grads,
                                                      Fp8GemmState& state) {
    auto saved = ctx->get_saved_variables();
    const auto qw = saved_operand(state, saved[2], saved[3], GemmOperand::kWeight);  // [out, in]
    const auto x_dtype = ctx->saved_data["x_dtype"].toScalarType();
    const auto w_dtype = ctx->saved_data["w_dtype"].toScalarType();
    auto dy = fp8_input(grads[0].reshape({-1, qw.data.size(0)}));  // [tokens, out]
    auto qdy = state.quantize(dy, GemmOperand::kGradOutput, GemmPass::kDgrad, "grad_output");
    auto dx = fp8_gemm(qdy, transposed(qw), x_dtype);  // Dgrad: [tokens, in]
    torch::Tensor dw;                                  // Wgrad: [out, in], contracting over tokens
    if (state.options().recipe == Fp8Recipe::kBlockwise) {
      auto dy_t = state.quantize(dy, GemmOperand::kGradOutput, GemmPass::kWgrad, "grad_output");  // 128x1
      auto x_t = state.quantize(saved[0], GemmOperand::kInput, GemmPass::kWgrad, "input");       // 128x1
      dw = fp8_gemm(transposed(dy_t), transposed(x_t), w_dtype);
    } else {
      const auto qx = saved_operand(state, saved[0], saved[1], GemmOperand::kInput);
      dw = fp8_gemm(transposed(qdy), transposed(qx), w_dtype);  // per tensor: the same quantized operands
    }
    auto shape = grads[0].sizes().vec();
    shape.back() = qw.data.size(1);
    return {dx.view(shape), dw, torch::Tensor()};
  }
};

}  // namespace

Fp8GemmState::Fp8GemmState(Fp8Options options, std::string name)
    : options_(std::move(options)), name_(std::move(name)) {
  options_.validate();
}

DelayedScaling* Fp8GemmState::history(const std::string& slot) {
  if (options_.recipe != Fp8Recipe::kDelayed) return nullptr;
  auto& h = histories_[slot];
  if (!h) h = std::make_unique<DelayedScaling>(options_.amax_history, options_.margin, options_.amax_algorithm);
  return h.get();
}

torch::Tensor Fp8GemmState::qdq(const torch::Tensor& x, GemmOperand operand, GemmPass pass, const std::string& slot) {
  return fake_quantize(x, options_.operand(operand, pass, name_ + " " + slot), history(slot),
                       recording_ || in_backward_);
}

QuantizedTensor Fp8GemmState::quantize(const torch::Tensor& x, GemmOperand operand, GemmPass pass,
                                       const std::string& slot) {
  return precision::quantize(x, options_.operand(operand, pass, name_ + " " + slot), history(slot),
                             recording_ || in_backward_);
}

torch::Tensor Fp8GemmState::qdq_grouped(const torch::Tensor& x, const std::vector<int64_t>& counts,
                                        GemmOperand operand, GemmPass pass, const std::string& slot) {
  const auto q = options_.operand(operand, pass, name_ + " " + slot);
  const bool per_tensor = q.mode == ScalingMode::kPerTensorCurrent || q.mode == ScalingMode::kPerTensorDelayed;
  if (x.dim() == 3) {  // stacked weights [experts, rows, cols]
    if (per_tensor) return qdq(x.reshape({-1, x.size(2)}), operand, pass, slot).view(x.sizes());
    std::vector<torch::Tensor> parts;
    for (int64_t e = 0; e < x.size(0); ++e) parts.push_back(qdq(x[e], operand, pass, slot));
    return torch::stack(parts);
  }
  if (per_tensor || q.mode == ScalingMode::kTile1x128) return qdq(x, operand, pass, slot);  // row tiles never straddle
  auto out = torch::empty_like(x, x.options().dtype(torch::kFloat));
  int64_t start = 0;
  for (auto n : counts) {
    if (n > 0) out.narrow(0, start, n).copy_(qdq(x.narrow(0, start, n), operand, pass, slot));
    start += n;
  }
  return out;
}

std::vector<std::pair<std::string, torch::Tensor>> Fp8GemmState::state() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& [slot, h] : histories_) {
    out.emplace_back(slot + ".amax_history", h->history());
    out.emplace_back(slot + ".amax_position", torch::tensor({h->position(), h->recorded()}, torch::kLong));
  }
  return out;
}

void Fp8GemmState::load_state(const std::map<std::string, torch::Tensor>& tensors, const std::string& prefix,
                              const std::string& source) {
  for (const auto& [key, value] : tensors) {
    if (key.rfind(prefix, 0) != 0 || !key.ends_with(".amax_history")) continue;
    const std::string slot = key.substr(prefix.size(), key.size() - prefix.size() - std::string(".amax_history").size());
    auto pos = tensors.find(prefix + slot + ".amax_position");
    BRIGADE_CHECK(pos != tensors.end() && pos->second.numel() == 2, source, ": ", key, " has no matching amax_position");
    auto* h = history(slot);
    BRIGADE_CHECK(h != nullptr, source, ": has FP8 amax history ", key, " but the recipe is not delayed scaling");
    h->restore(value, pos->second[0].item<int64_t>(), pos->second[1].item<int64_t>());
  }
}

torch::Tensor fp8_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                         Fp8GemmState& state) {
  // Inside apply() grad mode is off; whether this is training is decided here.
  state.set_recording(torch::GradMode::is_enabled());
  auto y = Fp8LinearFunction::apply(x, weight, &state);
  return bias.defined() ? y + bias.to(y.scalar_type()) : y;  // the bias add stays in high precision
}

LinearImpl::LinearImpl(int64_t in_features, int64_t out_features, bool with_bias) {
  weight = register_parameter("weight", torch::empty({out_features, in_features}));
  // torch::nn::Linear's default init; the model re-initialises its own weights.
  torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  if (with_bias) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
    bias = register_parameter("bias", torch::empty({out_features}).uniform_(-bound, bound));
  }
}

namespace {

void accumulate_grad(torch::Tensor& param, const torch::Tensor& grad) {
  if (param.grad().defined()) param.mutable_grad() += grad;
  else param.mutable_grad() = grad;
}

// A split Linear computes torch's linear of detached copies of its operands (leaves
// of a graph of its own, under the caller's autocast); its backward makes the
// gradients from that graph, the weights' now or in the queue.
class SplitLinearFunction : public torch::autograd::Function<SplitLinearFunction> {
 public:
  // inner: {x, weight, y = their linear[, bias]}.
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& /*x*/,
                               const torch::Tensor& weight, const std::optional<torch::Tensor>& bias,
                               const std::vector<torch::Tensor>& inner, WeightGradQueue* queue) {
    ctx->saved_data["x"] = inner[0];
    ctx->saved_data["w"] = inner[1];
    ctx->saved_data["y"] = inner[2];
    ctx->saved_data["weight"] = weight;  // the parameters the weight gradients go to
    if (bias) {
      ctx->saved_data["b"] = inner[3];
      ctx->saved_data["bias"] = *bias;
    }
    ctx->saved_data["queue"] = reinterpret_cast<int64_t>(queue);  // the model's, outlives the graph
    return inner[2].detach();
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto& saved = ctx->saved_data;
    const auto x = saved["x"].toTensor(), y = saved["y"].toTensor();
    const bool has_bias = saved.find("b") != saved.end();
    const auto bias = has_bias ? saved["b"].toTensor() : torch::Tensor();
    auto* queue = reinterpret_cast<WeightGradQueue*>(saved["queue"].toInt());
    const torch::Tensor dy = grads[0];
    std::vector<torch::Tensor> weights = {saved["w"].toTensor()}, params = {saved["weight"].toTensor()};
    if (has_bias) weights.push_back(bias), params.push_back(saved["bias"].toTensor());
    if (queue->deferring()) {
      // B: the input gradient alone (torch's backward of the graph skips the weight GEMM).
      torch::Tensor dx;
      if (x.requires_grad()) dx = torch::autograd::grad({y}, {x}, {dy}, /*retain_graph=*/true)[0];
      queue->defer(
          [y, dy, weights, params]() mutable {
            const auto made = torch::autograd::grad({y}, weights, {dy});
            torch::NoGradGuard no_grad;
            for (size_t i = 0; i < params.size(); ++i) accumulate_grad(params[i], made[i]);
          },
          params);
      return {dx, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    }
    std::vector<torch::Tensor> leaves;
    if (x.requires_grad()) leaves.push_back(x);
    leaves.insert(leaves.end(), weights.begin(), weights.end());
    const auto made = torch::autograd::grad({y}, leaves, {dy});
    const size_t w = x.requires_grad() ? 1 : 0;
    return {x.requires_grad() ? made[0] : torch::Tensor(), made[w], has_bias ? made[w + 1] : torch::Tensor(),
            torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

void WeightGradQueue::defer(std::function<void()> compute, std::vector<torch::Tensor> weights) {
  open_.work.push_back(std::move(compute));
  // A Linear used twice in one backward (the untied head, for the main model and the
  // MTP modules) is listed once: its gradient is one micro-batch term.
  for (auto& w : weights) {
    const bool listed = std::any_of(open_.weights.begin(), open_.weights.end(),
                                    [&](const torch::Tensor& t) { return t.is_same(w); });
    if (!listed) open_.weights.push_back(std::move(w));
  }
}

std::vector<torch::Tensor> WeightGradQueue::close_entry() {
  auto weights = open_.weights;
  entries_.push_back(std::exchange(open_, Entry{}));
  return weights;
}

std::vector<torch::Tensor> WeightGradQueue::run_oldest() {
  BRIGADE_ASSERT(!entries_.empty(), "a W step with no split backward waiting");
  Entry entry = std::move(entries_.front());
  entries_.pop_front();
  for (auto& work : entry.work) work();
  return entry.weights;
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) {
  if (fp8_) return fp8_linear(x, weight, bias, *fp8_);
  if (!queue_ || !torch::GradMode::is_enabled() || !weight.requires_grad()) {
    return torch::nn::functional::linear(x, weight, bias);
  }
  std::vector<torch::Tensor> inner = {x.detach().requires_grad_(x.requires_grad()), weight.detach().requires_grad_(true)};
  torch::Tensor inner_bias = bias.defined() ? bias.detach().requires_grad_(true) : torch::Tensor();
  inner.push_back(torch::nn::functional::linear(inner[0], inner[1], inner_bias));
  std::optional<torch::Tensor> with_bias;
  if (bias.defined()) with_bias = bias, inner.push_back(inner_bias);
  return SplitLinearFunction::apply(x, weight, with_bias, inner, queue_.get());
}

void LinearImpl::enable_fp8(const Fp8Options& options, const std::string& name) {
  fp8_ = options.enabled() ? std::make_unique<Fp8GemmState>(options, name) : nullptr;
}

}  // namespace brigade::precision
