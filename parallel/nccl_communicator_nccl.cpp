#include <thread>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <nccl.h>

#include "core/device.h"
#include "core/error.h"
#include "parallel/mpi_communicator.h"
#include "parallel/nccl_communicator.h"

namespace brigade::parallel {
namespace {

#define BRIGADE_NCCL(call, ...)                                                                         \
  do {                                                                                                  \
    const ncclResult_t _status = (call);                                                                \
    BRIGADE_CHECK(_status == ncclSuccess, #call " failed (", ncclGetErrorString(_status), "): ", __VA_ARGS__); \
  } while (0)

#define BRIGADE_CUDA_OK(call, ...)                                                                      \
  do {                                                                                                  \
    const cudaError_t _status = (call);                                                                 \
    BRIGADE_CHECK(_status == cudaSuccess, #call " failed (", cudaGetErrorString(_status), "): ", __VA_ARGS__); \
  } while (0)

ncclDataType_t nccl_type(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat: return ncclFloat32;
    case torch::kDouble: return ncclFloat64;
    case torch::kHalf: return ncclFloat16;
    case torch::kBFloat16: return ncclBfloat16;
    case torch::kLong: return ncclInt64;
    case torch::kInt: return ncclInt32;
    case torch::kChar: return ncclInt8;
    case torch::kByte:
    case torch::kBool: return ncclUint8;
    default: BRIGADE_FAIL("NCCL communicator: unsupported dtype ", dtype);
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kMax: return ncclMax;
    case ReduceOp::kMin: return ncclMin;
  }
  return ncclSum;
}

// Operations enqueued on a stream: finished when the event recorded after them
// completes. The tensors stay referenced until then (the caching allocator must
// not hand their memory to someone else while NCCL still reads or writes it).
class NcclWork final : public Work {
 public:
  NcclWork(std::string what, ncclComm_t comm, cudaStream_t stream, std::vector<torch::Tensor> keep_alive)
      : what_(std::move(what)), comm_(comm), keep_alive_(std::move(keep_alive)) {
    BRIGADE_CUDA_OK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), what_);
    BRIGADE_CUDA_OK(cudaEventRecord(event_, stream), what_);
  }
  ~NcclWork() override { cudaEventDestroy(event_); }

  bool test() override {
    if (done_) return true;
    const cudaError_t status = cudaEventQuery(event_);
    if (status == cudaErrorNotReady) {
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      BRIGADE_CHECK(async == ncclSuccess || async == ncclInProgress, what_, " failed (", ncclGetErrorString(async), ")");
      return false;
    }
    BRIGADE_CUDA_OK(status, what_);
    done_ = true;
    keep_alive_.clear();
    return true;
  }

  void wait(std::chrono::seconds timeout) override {
    const auto start = std::chrono::steady_clock::now();
    while (!test()) {
      if (std::chrono::steady_clock::now() - start >= timeout) {
        // Stops the kernels that wait for the missing peer, so the process can exit.
        ncclCommAbort(comm_);
        BRIGADE_FAIL(what_, " did not finish within ", timeout.count(),
                     " s: another rank died or hangs (parallel.timeout_s sets the limit)");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  std::string what_;
  ncclComm_t comm_;
  std::vector<torch::Tensor> keep_alive_;
  cudaEvent_t event_ = nullptr;
  bool done_ = false;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, int device, int rank, int size, std::string name, std::chrono::seconds timeout)
      : Communicator(rank, size, std::move(name), timeout), comm_(comm), device_(device) {}
  ~NcclCommunicator() override { ncclCommDestroy(comm_); }
  Backend backend() const override { return Backend::kNccl; }
  c10::Device device() const override { return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device_)); }

  Handle all_reduce(torch::Tensor& tensor, ReduceOp op) override {
    check_cuda(tensor, "all_reduce");
    auto stream = current_stream();
    BRIGADE_NCCL(ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), nccl_type(tensor.scalar_type()),
                               nccl_op(op), comm_, stream),
                 what("all_reduce"));
    return done("all_reduce", stream, {tensor});
  }

  Handle reduce_scatter(const torch::Tensor& input, torch::Tensor& output, ReduceOp op) override {
    check_reduce_scatter(input, output);
    check_cuda(input, "reduce_scatter");
    check_cuda(output, "reduce_scatter");
    auto stream = current_stream();
    BRIGADE_NCCL(ncclReduceScatter(input.data_ptr(), output.data_ptr(), output.numel(), nccl_type(input.scalar_type()),
                                   nccl_op(op), comm_, stream),
                 what("reduce_scatter"));
    return done("reduce_scatter", stream, {input, output});
  }

  Handle all_gather(const torch::Tensor& input, torch::Tensor& output) override {
    check_all_gather(input, output);
    check_cuda(input, "all_gather");
    check_cuda(output, "all_gather");
    auto stream = current_stream();
    BRIGADE_NCCL(ncclAllGather(input.data_ptr(), output.data_ptr(), input.numel(), nccl_type(input.scalar_type()),
                               comm_, stream),
                 what("all_gather"));
    return done("all_gather", stream, {input, output});
  }

  Handle broadcast(torch::Tensor& tensor, int root) override {
    BRIGADE_CHECK(root >= 0 && root < size(), "broadcast on ", describe(), ": root ", root, " is not a rank of the group");
    check_cuda(tensor, "broadcast");
    auto stream = current_stream();
    BRIGADE_NCCL(ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), nccl_type(tensor.scalar_type()),
                               root, comm_, stream),
                 what("broadcast"));
    return done("broadcast", stream, {tensor});
  }

  Handle all_to_all(const torch::Tensor& input, const std::vector<int64_t>& send_rows, torch::Tensor& output,
                    const std::vector<int64_t>& recv_rows) override {
    check_all_to_all(input, send_rows, output, recv_rows);
    check_cuda(input, "all_to_all");
    check_cuda(output, "all_to_all");
    const int64_t row = input.dim() == 1 ? 1 : input.size(0) > 0 ? input.numel() / input.size(0)
                                                                  : output.numel() / std::max<int64_t>(output.size(0), 1);
    const auto type = nccl_type(input.scalar_type());
    const int64_t element = input.element_size();
    auto stream = current_stream();
    // One group of paired sends and receives: NCCL schedules them together.
    BRIGADE_NCCL(ncclGroupStart(), what("all_to_all"));
    int64_t sent = 0, received = 0;
    for (int r = 0; r < size(); ++r) {
      if (send_rows[r] > 0) {
        BRIGADE_NCCL(ncclSend(static_cast<const char*>(input.data_ptr()) + sent * row * element, send_rows[r] * row,
                              type, r, comm_, stream),
                     what("all_to_all"));
      }
      if (recv_rows[r] > 0) {
        BRIGADE_NCCL(ncclRecv(static_cast<char*>(output.data_ptr()) + received * row * element, recv_rows[r] * row,
                              type, r, comm_, stream),
                     what("all_to_all"));
      }
      sent += send_rows[r];
      received += recv_rows[r];
    }
    BRIGADE_NCCL(ncclGroupEnd(), what("all_to_all"));
    return done("all_to_all", stream, {input, output});
  }

  Handle send(const torch::Tensor& tensor, int to, int) override {
    check_peer(to, "send");
    check_cuda(tensor, "send");
    auto stream = current_stream();
    BRIGADE_NCCL(ncclSend(tensor.data_ptr(), tensor.numel(), nccl_type(tensor.scalar_type()), to, comm_, stream),
                 what("send"));
    return done("send to rank " + std::to_string(to), stream, {tensor});
  }

  Handle recv(torch::Tensor& tensor, int from, int) override {
    check_peer(from, "recv");
    check_cuda(tensor, "recv");
    auto stream = current_stream();
    BRIGADE_NCCL(ncclRecv(tensor.data_ptr(), tensor.numel(), nccl_type(tensor.scalar_type()), from, comm_, stream),
                 what("recv"));
    return done("recv from rank " + std::to_string(from), stream, {tensor});
  }

  Handle barrier() override {
    // NCCL has no barrier: a one-element all-reduce every rank must join.
    c10::cuda::CUDAGuard guard(device_);
    auto token = torch::zeros({1}, torch::TensorOptions().device(torch::kCUDA, device_));
    return all_reduce(token, ReduceOp::kSum);
  }

  std::unique_ptr<Communicator> split(int color, int key, const std::string& name) override {
    BRIGADE_CHECK(color >= 0, "split of ", describe(), ": color must be >= 0, got ", color);
    ncclComm_t comm = nullptr;
    BRIGADE_NCCL(ncclCommSplit(comm_, color, key, &comm, nullptr), "split of ", describe(), " into ", name);
    int rank = 0, size = 0;
    ncclCommUserRank(comm, &rank);
    ncclCommCount(comm, &size);
    return std::make_unique<NcclCommunicator>(comm, device_, rank, size, name, timeout());
  }

 private:
  std::string what(const std::string& op) const { return op + " on " + describe(); }
  cudaStream_t current_stream() const { return c10::cuda::getCurrentCUDAStream(device_).stream(); }
  void check_cuda(const torch::Tensor& t, const char* op) const {
    BRIGADE_CHECK(t.is_cuda() && t.get_device() == device_ && t.is_contiguous(), op, " on ", describe(),
                  ": the NCCL back end needs contiguous tensors on cuda:", device_, ", got ", t.device(),
                  t.is_contiguous() ? "" : " (not contiguous)");
  }
  Handle done(const std::string& op, cudaStream_t stream, std::vector<torch::Tensor> keep_alive) const {
    return Handle(std::make_unique<NcclWork>(what(op), comm_, stream, std::move(keep_alive)), timeout());
  }

  ncclComm_t comm_;
  int device_;
};

}  // namespace

bool nccl_built() { return true; }

std::unique_ptr<Communicator> make_nccl_world(const World& world, std::chrono::seconds timeout) {
  const int devices = cuda_device_count();
  BRIGADE_CHECK(devices > 0, "the NCCL communicator needs a GPU; none is visible to rank ", world.rank);
  const int device = world.local_rank % devices;
  BRIGADE_CUDA_OK(cudaSetDevice(device), "selecting GPU ", device, " for rank ", world.rank);
  // Bootstrap over MPI: rank 0's unique id to everyone.
  auto mpi = make_mpi_world(world, timeout);
  ncclUniqueId id;
  if (world.rank == 0) BRIGADE_NCCL(ncclGetUniqueId(&id), "creating the NCCL unique id");
  auto bytes = torch::from_blob(&id, {static_cast<int64_t>(sizeof id)}, torch::kByte);
  mpi->broadcast(bytes, 0).wait();
  ncclComm_t comm = nullptr;
  BRIGADE_NCCL(ncclCommInitRank(&comm, world.size, id, world.rank), "joining NCCL as rank ", world.rank, " of ",
               world.size);
  return std::make_unique<NcclCommunicator>(comm, device, world.rank, world.size, "world", timeout);
}

}  // namespace brigade::parallel
