#include "moe/expert_parallel.h"

#include <mutex>
#include <numeric>

#include <torch/autograd.h>

#include "core/error.h"
#include "precision/quantize.h"

namespace brigade::moe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int64_t sum(const std::vector<int64_t>& v) { return std::accumulate(v.begin(), v.end(), int64_t{0}); }

// Buffers for the exchanged rows, reused across calls. A fresh CPU tensor of tens
// of MiB comes from new pages (glibc maps allocations over 32 MiB afresh every
// time) and pays a page fault per 4 KiB on first touch: measured here, 48 ms for
// 64 MiB, more than the all_to_all of the same bytes. So the exchanges write into
// kept buffers and hand out views of them; a buffer is free again once no tensor
// but the pool's uses its storage (autograd releasing the expert inputs, the
// caller dropping the combined rows). Like a caching allocator, the pool keeps
// the peak of buffers in use at once; a free buffer too small for a request is
// replaced, so it holds no more buffers than were ever in use together.
class BufferPool {
 public:
  torch::Tensor get(at::IntArrayRef sizes, const torch::TensorOptions& options) {
    int64_t bytes = options.dtype().itemsize();
    for (auto n : sizes) bytes *= n;
    if (bytes == 0 || !options.device().is_cpu()) return torch::empty(sizes, options);
    std::lock_guard<std::mutex> lock(mutex_);
    torch::Tensor* best = nullptr;  // the smallest free buffer that fits
    torch::Tensor* spare = nullptr; // a free one that does not
    for (auto& b : buffers_) {
      if (b.storage().use_count() != 1) continue;
      if (b.numel() >= bytes) {
        if (best == nullptr || b.numel() < best->numel()) best = &b;
      } else {
        spare = &b;
      }
    }
    if (best == nullptr) {
      auto fresh = torch::empty({bytes}, torch::kByte);
      best = spare != nullptr ? &(*spare = fresh) : &buffers_.emplace_back(fresh);
    }
    // A tensor of its own on the buffer's storage, not a view of the buffer (autograd
    // treats outputs that are views of a no-grad base specially).
    std::vector<int64_t> strides(sizes.size(), 1);
    for (int64_t i = static_cast<int64_t>(sizes.size()) - 2; i >= 0; --i) strides[i] = strides[i + 1] * sizes[i + 1];
    return torch::empty({0}, options).set_(best->storage(), 0, sizes, strides);
  }

 private:
  std::mutex mutex_;
  std::vector<torch::Tensor> buffers_;  // uint8 [bytes]
};

BufferPool& pool() {
  static BufferPool buffers;
  return buffers;
}

// One exchange, each tensor [rows, ...] in E/P rounds, round e an all_to_all of
// the rows of local expert e: `send` [E/P, P] rows this rank sends to each rank,
// `recv` [E/P, P] rows it receives from each. Both sides hold round e's rows as
// one contiguous run, [rank] blocks in rank order (the sender's expert-parallel
// order, the receiver's expert-major order), so every message goes straight
// between the tensors: no reorder copies. All rounds are in flight together.
std::vector<torch::Tensor> exchange(parallel::Communicator& ep, const std::vector<torch::Tensor>& inputs,
                                    const torch::Tensor& send, const torch::Tensor& recv) {
  const int64_t rounds = send.size(0), ranks = send.size(1);
  auto row = [&](const torch::Tensor& counts, int64_t e) {
    const int64_t* n = counts.data_ptr<int64_t>() + e * ranks;
    return std::vector<int64_t>(n, n + ranks);
  };
  const int64_t received = recv.sum().item<int64_t>();
  std::vector<torch::Tensor> outputs;
  std::vector<parallel::Handle> handles;
  for (const auto& t : inputs) {
    auto input = t.contiguous();
    auto sizes = input.sizes().vec();
    sizes[0] = received;
    auto& output = outputs.emplace_back(pool().get(sizes, input.options()));
    int64_t in_start = 0, out_start = 0;
    for (int64_t e = 0; e < rounds; ++e) {
      const auto send_rows = row(send, e), recv_rows = row(recv, e);
      const int64_t n_in = sum(send_rows), n_out = sum(recv_rows);
      auto out = output.narrow(0, out_start, n_out);
      handles.push_back(ep.all_to_all(input.narrow(0, in_start, n_in), send_rows, out, recv_rows));
      in_start += n_in;
      out_start += n_out;
    }
  }
  for (auto& h : handles) h.wait();
  return outputs;
}

// Rows in this rank's expert-parallel order -> the experts' ranks, expert-major.
std::vector<torch::Tensor> to_experts(parallel::Communicator& ep, const std::vector<torch::Tensor>& inputs,
                                      const ExpertParallelLayout& l) {
  return exchange(ep, inputs, l.send_counts, l.recv_counts);
}

// The inverse: expert-major rows back to their sources, in the sources' order.
std::vector<torch::Tensor> to_sources(parallel::Communicator& ep, const std::vector<torch::Tensor>& inputs,
                                      const ExpertParallelLayout& l) {
  return exchange(ep, inputs, l.recv_counts, l.send_counts);
}

// What backward needs of a layout, kept in the autograd context (saved_data holds
// IValues only); the communicator travels as a pointer and must outlive the graph.
void save(AutogradContext* ctx, const ExpertParallelLayout& l, parallel::Communicator& ep) {
  ctx->saved_data["send_counts"] = l.send_counts;
  ctx->saved_data["recv_counts"] = l.recv_counts;
  ctx->saved_data["ep"] = reinterpret_cast<int64_t>(&ep);
}

ExpertParallelLayout load(AutogradContext* ctx, parallel::Communicator** ep) {
  ExpertParallelLayout l;
  l.send_counts = ctx->saved_data["send_counts"].toTensor();
  l.recv_counts = ctx->saved_data["recv_counts"].toTensor();
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

int64_t ExpertParallelLayout::sent() const { return send_counts.sum().item<int64_t>(); }
int64_t ExpertParallelLayout::received() const { return recv_counts.sum().item<int64_t>(); }

torch::Tensor expert_parallel_keys(const torch::Tensor& experts, int64_t num_experts, int64_t ranks) {
  const int64_t local = num_experts / ranks;
  return torch::remainder(experts, local) * ranks + torch::div(experts, local, "floor");
}

torch::Tensor global_expert_order(const torch::Tensor& per_key, int64_t ranks) {
  return per_key.view({-1, ranks}).t().reshape({-1});
}

ExpertParallelLayout make_layout(const std::vector<int64_t>& counts, const torch::Tensor& recv_counts) {
  BRIGADE_CHECK(recv_counts.dim() == 2 && recv_counts.size(1) > 0, "expert-parallel layout: received counts must be ",
                "[local experts, ranks], got ", recv_counts.sizes());
  const int64_t local = recv_counts.size(0), ranks = recv_counts.size(1);
  BRIGADE_CHECK(static_cast<int64_t>(counts.size()) == ranks * local, "expert-parallel layout: ", counts.size(),
                " expert counts for ", ranks, " ranks of ", local, " local experts");
  ExpertParallelLayout l;
  l.local_experts = local;
  l.send_counts = torch::tensor(counts, torch::kLong).view({local, ranks});
  l.recv_counts = recv_counts.to(torch::kCPU, torch::kLong).contiguous();
  BRIGADE_CHECK(l.send_counts.ge(0).all().item<bool>(), "expert-parallel layout: negative expert counts ",
                l.send_counts);
  BRIGADE_CHECK(l.recv_counts.ge(0).all().item<bool>(), "expert-parallel layout: negative received counts ",
                l.recv_counts);
  auto to_rank = l.send_counts.sum(0), from_rank = l.recv_counts.sum(0), by_expert = l.recv_counts.sum(1);
  l.send_rows.assign(to_rank.data_ptr<int64_t>(), to_rank.data_ptr<int64_t>() + ranks);
  l.recv_rows.assign(from_rank.data_ptr<int64_t>(), from_rank.data_ptr<int64_t>() + ranks);
  l.local_counts.assign(by_expert.data_ptr<int64_t>(), by_expert.data_ptr<int64_t>() + local);
  return l;
}

ExpertParallelLayout exchange_counts(parallel::Communicator& ep, const std::vector<int64_t>& counts) {
  const int64_t ranks = ep.size(), experts = static_cast<int64_t>(counts.size());
  BRIGADE_CHECK(experts > 0 && experts % ranks == 0, "expert-parallel dispatch on ", ep.describe(), ": ", experts,
                " experts cannot be split evenly over ", ranks, " ranks");
  // Row j goes to rank j: this rank's counts for rank j's experts ([P, E/P]).
  const auto device = ep.backend() == parallel::Backend::kNccl ? torch::kCUDA : torch::kCPU;
  auto mine = torch::tensor(counts, torch::kLong).view({experts / ranks, ranks}).t().contiguous().to(device);
  auto theirs = torch::empty_like(mine);
  ep.all_to_all(mine, std::vector<int64_t>(ranks, 1), theirs, std::vector<int64_t>(ranks, 1)).wait();
  return make_layout(counts, theirs.to(torch::kCPU).t().contiguous());
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
