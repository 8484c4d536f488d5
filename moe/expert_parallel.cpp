#include "moe/expert_parallel.h"

#include <numeric>

#include <torch/autograd.h>

#include "core/error.h"
#include "precision/quantize.h"

namespace brigade::moe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int64_t sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

// Rows stored as blocks of counts[a][b] in row-major block order ([A][B]); returns
// the gather that lists them in column-major block order ([B][A]), or undefined
// when both orders are the same. One repeat_interleave, no per-row loop.
torch::Tensor transposed_block_gather(const torch::Tensor& counts) {
  auto flat = counts.reshape({-1});
  auto starts = (flat.cumsum(0) - flat).view(counts.sizes());  // [A, B]: where each block starts
  auto t_counts = counts.t().reshape({-1});                     // [B * A] block sizes, new order
  auto t_from = starts.t().reshape({-1});                       // their old starts
  auto t_to = t_counts.cumsum(0) - t_counts;                     // their new starts
  auto shift = t_from - t_to;
  if (!shift.ne(0).logical_and(t_counts.gt(0)).any().item<bool>()) return {};
  const int64_t total = flat.sum().item<int64_t>();
  return torch::repeat_interleave(shift, t_counts, 0, total) + torch::arange(total, counts.options());
}

torch::Tensor gather(const torch::Tensor& t, const torch::Tensor& index) {
  return index.defined() ? t.index_select(0, index.to(t.device())) : t;
}

// Starts one all_to_all per tensor (all in flight together), then waits for them:
// tensors [sum(send), ...] -> [sum(recv), ...].
std::vector<torch::Tensor> exchange(parallel::Communicator& ep, const std::vector<torch::Tensor>& inputs,
                                    const std::vector<int64_t>& send, const std::vector<int64_t>& recv) {
  std::vector<torch::Tensor> outputs;
  std::vector<parallel::Handle> handles;
  const int64_t received = sum(recv);
  for (const auto& input : inputs) {
    auto sizes = input.sizes().vec();
    sizes[0] = received;
    auto& output = outputs.emplace_back(torch::empty(sizes, input.options()));
    handles.push_back(ep.all_to_all(input.contiguous(), send, output, recv));
  }
  for (auto& h : handles) h.wait();
  return outputs;
}

// Source order -> the experts' ranks, grouped by local expert.
std::vector<torch::Tensor> to_experts(parallel::Communicator& ep, const std::vector<torch::Tensor>& inputs,
                                      const ExpertParallelLayout& l) {
  auto out = exchange(ep, inputs, l.send_rows, l.recv_rows);
  for (auto& t : out) t = gather(t, l.to_expert_major);
  return out;
}

// The inverse: expert-grouped rows back to their sources, in the sources' order.
std::vector<torch::Tensor> to_sources(parallel::Communicator& ep, const std::vector<torch::Tensor>& inputs,
                                      const ExpertParallelLayout& l) {
  std::vector<torch::Tensor> reordered;
  for (const auto& t : inputs) reordered.push_back(gather(t, l.to_source_major));
  return exchange(ep, reordered, l.recv_rows, l.send_rows);
}

// What backward needs of a layout, kept in the autograd context (saved_data holds
// IValues only); the communicator travels as a pointer and must outlive the graph.
void save(AutogradContext* ctx, const ExpertParallelLayout& l, parallel::Communicator& ep) {
  ctx->saved_data["send_rows"] = c10::IValue(l.send_rows);
  ctx->saved_data["recv_rows"] = c10::IValue(l.recv_rows);
  ctx->saved_data["to_expert_major"] = l.to_expert_major;
  ctx->saved_data["to_source_major"] = l.to_source_major;
  ctx->saved_data["ep"] = reinterpret_cast<int64_t>(&ep);
}

ExpertParallelLayout load(AutogradContext* ctx, parallel::Communicator** ep) {
  ExpertParallelLayout l;
  l.send_rows = ctx->saved_data["send_rows"].toIntVector();
  l.recv_rows = ctx->saved_data["recv_rows"].toIntVector();
  l.to_expert_major = ctx->saved_data["to_expert_major"].toTensor();
  l.to_source_major = ctx->saved_data["to_source_major"].toTensor();
  *ep = reinterpret_cast<parallel::Communicator*>(ctx->saved_data["ep"].toInt());
  return l;
}

class DispatchFunction : public torch::autograd::Function<DispatchFunction> {
 public:
  // rows [sent, d], weights [sent] -> {rows [received, d], weights [received]}.
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& rows, const torch::Tensor& weights,
                               const ExpertParallelLayout& layout, parallel::Communicator* ep, bool fp8) {
    save(ctx, layout, *ep);
    ctx->saved_data["width"] = rows.size(1);
    ctx->saved_data["rows_dtype"] = rows.scalar_type();
    ctx->saved_data["weights_dtype"] = weights.scalar_type();
    if (!fp8) return to_experts(*ep, {rows, weights}, layout);

    // E4M3 codes [sent, d] plus, per row, its 1x128 scales and routing weight in one
    // float32 message [sent, groups + 1].
    precision::QuantizeOptions qo;
    qo.format = precision::Fp8Format::kE4M3;
    qo.mode = precision::ScalingMode::kTile1x128;
    qo.name = "the expert-parallel dispatch";
    auto source = rows.scalar_type() == torch::kBFloat16 ? rows : rows.to(torch::kFloat);
    auto q = precision::quantize(source.contiguous(), qo);
    const int64_t groups = q.scales.size(1);
    auto side = torch::cat({q.scales, weights.to(torch::kFloat).unsqueeze(1)}, 1);
    auto received = to_experts(*ep, {q.data, side}, layout);
    precision::QuantizedTensor arrived;
    arrived.data = received[0];
    arrived.scales = received[1].narrow(1, 0, groups).contiguous();
    arrived.mode = qo.mode;
    arrived.format = qo.format;
    return {arrived.dequantize().to(rows.scalar_type()), received[1].select(1, groups).to(weights.scalar_type())};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    parallel::Communicator* ep = nullptr;
    const auto layout = load(ctx, &ep);
    // Autograd calls this with at least one gradient defined; a missing one is zeros
    // (the all_to_all runs on every rank of the group whatever reached the loss).
    const auto device = (grads[0].defined() ? grads[0] : grads[1]).device();
    const int64_t received = layout.received();
    auto zeros = [&](std::vector<int64_t> shape, const char* dtype) {
      return torch::zeros(shape, torch::TensorOptions(device).dtype(ctx->saved_data[dtype].toScalarType()));
    };
    auto d_rows = grads[0].defined() ? grads[0] : zeros({received, ctx->saved_data["width"].toInt()}, "rows_dtype");
    auto d_weights = grads[1].defined() ? grads[1] : zeros({received}, "weights_dtype");
    auto back = to_sources(*ep, {d_rows, d_weights}, layout);
    return {back[0], back[1], torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

class CombineFunction : public torch::autograd::Function<CombineFunction> {
 public:
  // rows [received, d] -> [sent, d].
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& rows, const ExpertParallelLayout& layout,
                               parallel::Communicator* ep) {
    save(ctx, layout, *ep);
    return to_sources(*ep, {rows}, layout)[0];
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    parallel::Communicator* ep = nullptr;
    const auto layout = load(ctx, &ep);
    return {to_experts(*ep, {grads[0]}, layout)[0], torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

int64_t ExpertParallelLayout::sent() const { return sum(send_rows); }
int64_t ExpertParallelLayout::received() const { return sum(recv_rows); }

ExpertParallelLayout make_layout(const std::vector<int64_t>& counts, const torch::Tensor& recv_counts) {
  BRIGADE_CHECK(recv_counts.dim() == 2 && recv_counts.size(0) > 0, "expert-parallel layout: received counts must be ",
                "[ranks, local experts], got ", recv_counts.sizes());
  const int64_t ranks = recv_counts.size(0), local = recv_counts.size(1);
  BRIGADE_CHECK(static_cast<int64_t>(counts.size()) == ranks * local, "expert-parallel layout: ", counts.size(),
                " expert counts for ", ranks, " ranks of ", local, " local experts");
  ExpertParallelLayout l;
  l.local_experts = local;
  l.recv_counts = recv_counts.to(torch::kCPU, torch::kLong).contiguous();
  BRIGADE_CHECK(l.recv_counts.ge(0).all().item<bool>(), "expert-parallel layout: negative received counts ",
                l.recv_counts);
  l.send_rows.assign(ranks, 0);
  for (int64_t j = 0; j < ranks; ++j) {
    for (int64_t e = 0; e < local; ++e) {
      BRIGADE_CHECK(counts[j * local + e] >= 0, "expert-parallel layout: expert ", j * local + e, " has ",
                    counts[j * local + e], " rows");
      l.send_rows[j] += counts[j * local + e];
    }
  }
  auto by_source = l.recv_counts.sum(1), by_expert = l.recv_counts.sum(0);
  l.recv_rows.assign(by_source.data_ptr<int64_t>(), by_source.data_ptr<int64_t>() + ranks);
  l.local_counts.assign(by_expert.data_ptr<int64_t>(), by_expert.data_ptr<int64_t>() + local);
  l.to_expert_major = transposed_block_gather(l.recv_counts);
  l.to_source_major = transposed_block_gather(l.recv_counts.t().contiguous());
  return l;
}

ExpertParallelLayout exchange_counts(parallel::Communicator& ep, const std::vector<int64_t>& counts) {
  const int64_t ranks = ep.size(), experts = static_cast<int64_t>(counts.size());
  BRIGADE_CHECK(experts > 0 && experts % ranks == 0, "expert-parallel dispatch on ", ep.describe(), ": ", experts,
                " experts cannot be split evenly over ", ranks, " ranks");
  // Row j goes to rank j: this rank's counts for rank j's experts.
  const auto device = ep.backend() == parallel::Backend::kNccl ? torch::kCUDA : torch::kCPU;
  auto mine = torch::tensor(counts, torch::kLong).view({ranks, experts / ranks}).to(device);
  auto theirs = exchange(ep, {mine}, std::vector<int64_t>(ranks, 1), std::vector<int64_t>(ranks, 1))[0];
  return make_layout(counts, theirs);
}

Dispatched dispatch(parallel::Communicator& ep, const torch::Tensor& rows, const torch::Tensor& weights,
                    const std::vector<int64_t>& counts, bool fp8) {
  const int64_t sent = sum(counts);
  BRIGADE_CHECK(rows.dim() == 2 && rows.size(0) == sent, "expert-parallel dispatch: rows ", rows.sizes(),
                " do not match the ", sent, " rows the expert counts add up to");
  BRIGADE_CHECK(weights.dim() == 1 && weights.size(0) == sent, "expert-parallel dispatch: routing weights ",
                weights.sizes(), " for ", sent, " rows");
  BRIGADE_CHECK(!fp8 || rows.device().is_cpu(), "expert-parallel FP8 dispatch quantizes on the CPU; rows are on ",
                rows.device());
  Dispatched d;
  d.layout = exchange_counts(ep, counts);
  auto out = DispatchFunction::apply(rows, weights, d.layout, &ep, fp8);
  d.rows = out[0];
  d.weights = out[1];
  return d;
}

torch::Tensor combine(parallel::Communicator& ep, const torch::Tensor& rows, const ExpertParallelLayout& layout) {
  BRIGADE_CHECK(rows.dim() == 2 && rows.size(0) == layout.received(), "expert-parallel combine: rows ",
                rows.sizes(), " but the dispatch delivered ", layout.received());
  return CombineFunction::apply(rows, layout, &ep);
}

}  // namespace brigade::moe
