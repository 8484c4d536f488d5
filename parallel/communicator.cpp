#include "parallel/communicator.h"

#include <numeric>

#include "core/error.h"
#include "parallel/mpi_communicator.h"
#include "parallel/nccl_communicator.h"

namespace brigade::parallel {

std::string to_string(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kMin: return "min";
  }
  return "?";
}

std::string to_string(Backend backend) {
  switch (backend) {
    case Backend::kSingle: return "single";
    case Backend::kMpi: return "mpi";
    case Backend::kNccl: return "nccl";
  }
  return "?";
}

void Handle::wait() {
  if (!work_) return;
  work_->wait(timeout_);
  work_.reset();
}

bool Handle::test() {
  if (!work_) return true;
  if (!work_->test()) return false;
  work_.reset();
  return true;
}

std::string Communicator::describe() const {
  return "rank " + std::to_string(rank_) + "/" + std::to_string(size_) + " of " + name_;
}

void Communicator::check_reduce_scatter(const torch::Tensor& input, const torch::Tensor& output) const {
  BRIGADE_CHECK(input.dim() >= 1 && output.dim() == input.dim() && input.size(0) == output.size(0) * size() &&
                    input.sizes().slice(1) == output.sizes().slice(1) && input.scalar_type() == output.scalar_type(),
                "reduce_scatter on ", describe(), ": input ", input.sizes(), " must be ", size(),
                " x the output's rows ", output.sizes(), " of the same dtype");
}

void Communicator::check_all_gather(const torch::Tensor& input, const torch::Tensor& output) const {
  BRIGADE_CHECK(input.dim() >= 1 && output.dim() == input.dim() && output.size(0) == input.size(0) * size() &&
                    input.sizes().slice(1) == output.sizes().slice(1) && input.scalar_type() == output.scalar_type(),
                "all_gather on ", describe(), ": output ", output.sizes(), " must be ", size(), " x the input's rows ",
                input.sizes(), " of the same dtype");
}

void Communicator::check_all_to_all(const torch::Tensor& input, const std::vector<int64_t>& send_rows,
                                    const torch::Tensor& output, const std::vector<int64_t>& recv_rows) const {
  BRIGADE_CHECK(static_cast<int>(send_rows.size()) == size() && static_cast<int>(recv_rows.size()) == size(),
                "all_to_all on ", describe(), ": needs one send and one receive count per rank, got ", send_rows.size(),
                " and ", recv_rows.size());
  for (int r = 0; r < size(); ++r) {
    BRIGADE_CHECK(send_rows[r] >= 0 && recv_rows[r] >= 0, "all_to_all on ", describe(), ": negative row count for rank ",
                  r);
  }
  const int64_t sent = std::accumulate(send_rows.begin(), send_rows.end(), int64_t{0});
  const int64_t received = std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t{0});
  BRIGADE_CHECK(input.dim() >= 1 && output.dim() == input.dim() && input.size(0) == sent &&
                    output.size(0) == received && input.sizes().slice(1) == output.sizes().slice(1) &&
                    input.scalar_type() == output.scalar_type(),
                "all_to_all on ", describe(), ": input ", input.sizes(), " must have ", sent, " rows and output ",
                output.sizes(), " ", received, " rows of the same width and dtype");
}

void Communicator::check_peer(int peer, const char* op) const {
  BRIGADE_CHECK(peer >= 0 && peer < size() && peer != rank(), op, " on ", describe(), ": peer rank ", peer,
                " is not another rank of the group");
}

namespace {

// A process alone: every collective is the identity (copies where input and
// output differ). Point-to-point has no peer.
class SingleCommunicator final : public Communicator {
 public:
  SingleCommunicator(std::string name, std::chrono::seconds timeout) : Communicator(0, 1, std::move(name), timeout) {}
  Backend backend() const override { return Backend::kSingle; }
  c10::Device device() const override { return c10::Device(c10::kCPU); }
  Handle all_reduce(torch::Tensor&, ReduceOp) override { return {}; }
  Handle reduce_scatter(const torch::Tensor& input, torch::Tensor& output, ReduceOp) override {
    check_reduce_scatter(input, output);
    output.copy_(input);
    return {};
  }
  Handle all_gather(const torch::Tensor& input, torch::Tensor& output) override {
    check_all_gather(input, output);
    output.copy_(input);
    return {};
  }
  Handle broadcast(torch::Tensor&, int root) override {
    BRIGADE_CHECK(root == 0, "broadcast on ", describe(), ": root ", root, " is not a rank of the group");
    return {};
  }
  Handle all_to_all(const torch::Tensor& input, const std::vector<int64_t>& send_rows, torch::Tensor& output,
                    const std::vector<int64_t>& recv_rows) override {
    check_all_to_all(input, send_rows, output, recv_rows);
    BRIGADE_CHECK(send_rows[0] == recv_rows[0], "all_to_all on ", describe(), ": sends ", send_rows[0],
                  " rows to itself but expects ", recv_rows[0]);
    output.copy_(input);
    return {};
  }
  Handle send(const torch::Tensor&, int to, int) override {
    check_peer(to, "send");
    return {};
  }
  Handle recv(torch::Tensor&, int from, int) override {
    check_peer(from, "recv");
    return {};
  }
  Handle barrier() override { return {}; }
  std::unique_ptr<Communicator> split(int, int, const std::string& name) override {
    return std::make_unique<SingleCommunicator>(name, timeout());
  }
};

}  // namespace

std::unique_ptr<Communicator> make_world_communicator(const World& world, const CommunicatorOptions& options) {
  BRIGADE_CHECK(options.timeout.count() > 0, "communicator timeout must be positive, got ", options.timeout.count(), " s");
  switch (options.backend) {
    case Backend::kSingle:
      BRIGADE_CHECK(world.size == 1, "the single-process back end cannot serve a world of ", world.size,
                    " ranks; use mpi");
      return std::make_unique<SingleCommunicator>("world", options.timeout);
    case Backend::kMpi: return make_mpi_world(world, options.timeout);
    case Backend::kNccl: return make_nccl_world(world, options.timeout);
  }
  BRIGADE_FAIL("unknown communicator back end");
}

}  // namespace brigade::parallel
