#include "core/recompute.h"

#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/custom_class.h>

#include <memory>

#include "core/error.h"

namespace brigade {
namespace {

thread_local int recompute_depth = 0;

// Keeps the piece alive inside the autograd graph (saved_data holds IValues).
struct PieceHolder : torch::CustomClassHolder {
  explicit PieceHolder(Piece p) : fn(std::move(p)) {}
  Piece fn;
};

// Restores the forward's autocast state for the recomputation (autograd threads do
// not inherit it).
class AutocastState {
 public:
  static void save(torch::autograd::AutogradContext& ctx) {
    ctx.saved_data["cpu_autocast"] = at::autocast::is_autocast_enabled(c10::DeviceType::CPU);
    ctx.saved_data["cuda_autocast"] = at::autocast::is_autocast_enabled(c10::DeviceType::CUDA);
    ctx.saved_data["cpu_dtype"] = at::autocast::get_autocast_dtype(c10::DeviceType::CPU);
    ctx.saved_data["cuda_dtype"] = at::autocast::get_autocast_dtype(c10::DeviceType::CUDA);
  }
  explicit AutocastState(torch::autograd::AutogradContext& ctx)
      : cpu_(at::autocast::is_autocast_enabled(c10::DeviceType::CPU)),
        cuda_(at::autocast::is_autocast_enabled(c10::DeviceType::CUDA)),
        cpu_dtype_(at::autocast::get_autocast_dtype(c10::DeviceType::CPU)),
        cuda_dtype_(at::autocast::get_autocast_dtype(c10::DeviceType::CUDA)) {
    at::autocast::set_autocast_enabled(c10::DeviceType::CPU, ctx.saved_data["cpu_autocast"].toBool());
    at::autocast::set_autocast_enabled(c10::DeviceType::CUDA, ctx.saved_data["cuda_autocast"].toBool());
    at::autocast::set_autocast_dtype(c10::DeviceType::CPU, ctx.saved_data["cpu_dtype"].toScalarType());
    at::autocast::set_autocast_dtype(c10::DeviceType::CUDA, ctx.saved_data["cuda_dtype"].toScalarType());
  }
  ~AutocastState() {
    at::autocast::set_autocast_enabled(c10::DeviceType::CPU, cpu_);
    at::autocast::set_autocast_enabled(c10::DeviceType::CUDA, cuda_);
    at::autocast::set_autocast_dtype(c10::DeviceType::CPU, cpu_dtype_);
    at::autocast::set_autocast_dtype(c10::DeviceType::CUDA, cuda_dtype_);
  }
  AutocastState(const AutocastState&) = delete;
  AutocastState& operator=(const AutocastState&) = delete;

 private:
  bool cpu_, cuda_;
  c10::ScalarType cpu_dtype_, cuda_dtype_;
};

torch::Tensor run_forward(torch::autograd::AutogradContext* ctx, const std::vector<torch::Tensor>& in,
                          const c10::intrusive_ptr<PieceHolder>& piece) {
  AutocastState::save(*ctx);
  ctx->saved_data["piece"] = c10::IValue::make_capsule(piece);
  ctx->save_for_backward(in);
  return piece->fn(in);
}

// The gradients of the saved inputs (undefined for those that need none), then one
// undefined for the piece.
torch::autograd::variable_list run_backward(torch::autograd::AutogradContext* ctx,
                                            const torch::autograd::variable_list& grads) {
  auto saved = ctx->get_saved_variables();
  auto piece = c10::static_intrusive_pointer_cast<PieceHolder>(ctx->saved_data["piece"].toCapsule());
  std::vector<torch::Tensor> leaves;
  for (const auto& t : saved) leaves.push_back(t.detach().requires_grad_(t.requires_grad()));
  torch::Tensor out;
  {
    torch::AutoGradMode grad_on(true);
    AutocastState autocast(*ctx);
    ++recompute_depth;
    try {
      out = piece->fn(leaves);
    } catch (...) {
      --recompute_depth;
      throw;
    }
    --recompute_depth;
  }
  // Into the parameters (through their gradient accumulators, hooks included) and the leaves.
  torch::autograd::backward({out}, {grads[0]});
  torch::autograd::variable_list result;
  for (const auto& l : leaves) result.push_back(l.requires_grad() ? l.grad() : torch::Tensor());
  result.push_back(torch::Tensor());
  return result;
}

class RecomputeOne : public torch::autograd::Function<RecomputeOne> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& a,
                               c10::intrusive_ptr<PieceHolder> piece) {
    return run_forward(ctx, {a}, piece);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return run_backward(ctx, grads);
  }
};

class RecomputeThree : public torch::autograd::Function<RecomputeThree> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& a, const torch::Tensor& b,
                               const torch::Tensor& c, c10::intrusive_ptr<PieceHolder> piece) {
    return run_forward(ctx, {a, b, c}, piece);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return run_backward(ctx, grads);
  }
};

}  // namespace

std::string to_string(Checkpointing mode) {
  switch (mode) {
    case Checkpointing::kNone: return "none";
    case Checkpointing::kSelective: return "selective";
    case Checkpointing::kFull: return "full";
  }
  return "?";
}

Checkpointing parse_checkpointing(const std::string& name) {
  if (name == "none") return Checkpointing::kNone;
  if (name == "selective") return Checkpointing::kSelective;
  if (name == "full") return Checkpointing::kFull;
  BRIGADE_FAIL("unknown activation checkpointing '", name, "' (expected none, selective or full)");
}

torch::Tensor checkpointed(Piece fn, const std::vector<torch::Tensor>& inputs) {
  BRIGADE_ASSERT(inputs.size() == 1 || inputs.size() == 3, "a checkpointed piece takes 1 or 3 tensors, got ",
                 inputs.size());
  if (!torch::GradMode::is_enabled()) return fn(inputs);
  auto piece = c10::make_intrusive<PieceHolder>(std::move(fn));
  if (inputs.size() == 1) return RecomputeOne::apply(inputs[0], piece);
  return RecomputeThree::apply(inputs[0], inputs[1], inputs[2], piece);
}

bool recomputing() { return recompute_depth > 0; }

}  // namespace brigade
