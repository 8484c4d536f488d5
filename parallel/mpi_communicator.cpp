#include "parallel/mpi_communicator.h"

#include <climits>
#include <cstdlib>
#include <functional>
#include <thread>

#include <mpi.h>

#include "core/error.h"

namespace brigade::parallel {
namespace {

bool g_initialized_here = false;

std::string mpi_error(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  return std::string(text, length);
}

#define BRIGADE_MPI(call, ...)                                                                              \
  do {                                                                                                      \
    const int _status = (call);                                                                             \
    BRIGADE_CHECK(_status == MPI_SUCCESS, #call " failed (", mpi_error(_status), "): ", __VA_ARGS__);       \
  } while (0)

// How a tensor travels: its MPI type and element count. bfloat16 and float16
// have no MPI type: they travel as 16-bit words, and reductions over them run in
// float32 (see reduce_buffer).
struct Buffer {
  MPI_Datatype type;
  int64_t count;
};

MPI_Datatype mpi_type(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat: return MPI_FLOAT;
    case torch::kDouble: return MPI_DOUBLE;
    case torch::kLong: return MPI_INT64_T;
    case torch::kInt: return MPI_INT32_T;
    case torch::kShort: return MPI_INT16_T;
    case torch::kChar: return MPI_INT8_T;
    case torch::kByte:
    case torch::kBool: return MPI_UINT8_T;
    case torch::kBFloat16:
    case torch::kHalf: return MPI_UINT16_T;
    default: BRIGADE_FAIL("MPI communicator: unsupported dtype ", dtype);
  }
}

bool reducible(torch::ScalarType dtype) { return dtype != torch::kBFloat16 && dtype != torch::kHalf && dtype != torch::kBool; }

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return MPI_SUM;
    case ReduceOp::kMax: return MPI_MAX;
    case ReduceOp::kMin: return MPI_MIN;
  }
  return MPI_SUM;
}

// One MPI operation in flight: its requests, the tensors it must keep alive, and
// what to do once it finished (copy a float32 reduction back to bfloat16, ...).
class MpiWork final : public Work {
 public:
  MpiWork(std::string what, std::vector<torch::Tensor> keep_alive)
      : what_(std::move(what)), keep_alive_(std::move(keep_alive)) {}
  std::vector<MPI_Request> requests;
  std::vector<int> counts, displacements;  // all_to_all's arrays live until completion
  std::function<void()> on_done;

  bool test() override {
    if (done_) return true;
    int flag = 0;
    BRIGADE_MPI(MPI_Testall(static_cast<int>(requests.size()), requests.data(), &flag, MPI_STATUSES_IGNORE), what_);
    if (!flag) return false;
    finish();
    return true;
  }

  void wait(std::chrono::seconds timeout) override {
    // Polls instead of MPI_Waitall so a dead or hung peer cannot block forever.
    // Spins briefly (short collectives), then sleeps between polls.
    const auto start = std::chrono::steady_clock::now();
    while (!test()) {
      const auto now = std::chrono::steady_clock::now();
      BRIGADE_CHECK(now - start < timeout, what_, " did not finish within ", timeout.count(),
                    " s: another rank died or hangs (parallel.timeout_s sets the limit)");
      if (now - start > std::chrono::milliseconds(1)) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  void finish() {
    done_ = true;
    if (on_done) on_done();
    keep_alive_.clear();
  }
  std::string what_;
  std::vector<torch::Tensor> keep_alive_;
  bool done_ = false;
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, bool owned, int rank, int size, std::string name, std::chrono::seconds timeout)
      : Communicator(rank, size, std::move(name), timeout), comm_(comm), owned_(owned) {}
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owned_ && !finalized) MPI_Comm_free(&comm_);
  }
  Backend backend() const override { return Backend::kMpi; }
  c10::Device device() const override { return c10::Device(c10::kCPU); }

  Handle all_reduce(torch::Tensor& tensor, ReduceOp op) override {
    check_cpu(tensor, "all_reduce");
    auto buffer = reduce_buffer(tensor);
    auto work = start("all_reduce", {tensor, buffer});
    BRIGADE_MPI(MPI_Iallreduce(MPI_IN_PLACE, buffer.data_ptr(), count(buffer.numel(), "all_reduce"),
                               mpi_type(buffer.scalar_type()), mpi_op(op), comm_, &work->requests.emplace_back()),
                what("all_reduce"));
    if (!buffer.is_same(tensor)) work->on_done = [tensor, buffer]() mutable { tensor.copy_(buffer); };
    return handle(std::move(work));
  }

  Handle reduce_scatter(const torch::Tensor& input, torch::Tensor& output, ReduceOp op) override {
    check_reduce_scatter(input, output);
    check_cpu(input, "reduce_scatter");
    check_cpu(output, "reduce_scatter");
    auto in = reduce_buffer(input);
    auto out = reduce_buffer(output);
    auto work = start("reduce_scatter", {input, output, in, out});
    BRIGADE_MPI(MPI_Ireduce_scatter_block(in.data_ptr(), out.data_ptr(), count(out.numel(), "reduce_scatter"),
                                          mpi_type(in.scalar_type()), mpi_op(op), comm_, &work->requests.emplace_back()),
                what("reduce_scatter"));
    if (!out.is_same(output)) work->on_done = [output, out]() mutable { output.copy_(out); };
    return handle(std::move(work));
  }

  Handle all_gather(const torch::Tensor& input, torch::Tensor& output) override {
    check_all_gather(input, output);
    check_cpu(input, "all_gather");
    check_cpu(output, "all_gather");
    auto work = start("all_gather", {input, output});
    const auto type = mpi_type(input.scalar_type());
    const int n = count(input.numel(), "all_gather");
    BRIGADE_MPI(MPI_Iallgather(input.data_ptr(), n, type, output.data_ptr(), n, type, comm_,
                               &work->requests.emplace_back()),
                what("all_gather"));
    return handle(std::move(work));
  }

  Handle broadcast(torch::Tensor& tensor, int root) override {
    BRIGADE_CHECK(root >= 0 && root < size(), "broadcast on ", describe(), ": root ", root, " is not a rank of the group");
    check_cpu(tensor, "broadcast");
    auto work = start("broadcast", {tensor});
    BRIGADE_MPI(MPI_Ibcast(tensor.data_ptr(), count(tensor.numel(), "broadcast"), mpi_type(tensor.scalar_type()),
                           root, comm_, &work->requests.emplace_back()),
                what("broadcast"));
    return handle(std::move(work));
  }

  Handle all_to_all(const torch::Tensor& input, const std::vector<int64_t>& send_rows, torch::Tensor& output,
                    const std::vector<int64_t>& recv_rows) override {
    check_all_to_all(input, send_rows, output, recv_rows);
    check_cpu(input, "all_to_all");
    check_cpu(output, "all_to_all");
    auto work = start("all_to_all", {input, output});
    const int64_t width = input.dim() == 1 ? 1 : input.numel() / std::max<int64_t>(input.size(0), 1);
    const int64_t out_width = output.dim() == 1 ? 1 : output.numel() / std::max<int64_t>(output.size(0), 1);
    const int64_t row = std::max(width, out_width);  // equal unless a side has no rows
    // counts | displacements, each [send ranks..., receive ranks...].
    work->counts.resize(2 * size());
    work->displacements.resize(2 * size());
    int64_t sent = 0, received = 0;
    for (int r = 0; r < size(); ++r) {
      work->counts[r] = count(send_rows[r] * row, "all_to_all");
      work->displacements[r] = count(sent, "all_to_all");
      work->counts[size() + r] = count(recv_rows[r] * row, "all_to_all");
      work->displacements[size() + r] = count(received, "all_to_all");
      sent += send_rows[r] * row;
      received += recv_rows[r] * row;
    }
    const auto type = mpi_type(input.scalar_type());
    BRIGADE_MPI(MPI_Ialltoallv(input.data_ptr(), work->counts.data(), work->displacements.data(), type,
                               output.data_ptr(), work->counts.data() + size(), work->displacements.data() + size(),
                               type, comm_, &work->requests.emplace_back()),
                what("all_to_all"));
    return handle(std::move(work));
  }

  Handle send(const torch::Tensor& tensor, int to, int tag) override {
    check_peer(to, "send");
    check_cpu(tensor, "send");
    auto work = start("send to rank " + std::to_string(to), {tensor});
    BRIGADE_MPI(MPI_Isend(tensor.data_ptr(), count(tensor.numel(), "send"), mpi_type(tensor.scalar_type()), to,
                          tag, comm_, &work->requests.emplace_back()),
                what("send"));
    return handle(std::move(work));
  }

  Handle recv(torch::Tensor& tensor, int from, int tag) override {
    check_peer(from, "recv");
    check_cpu(tensor, "recv");
    auto work = start("recv from rank " + std::to_string(from), {tensor});
    BRIGADE_MPI(MPI_Irecv(tensor.data_ptr(), count(tensor.numel(), "recv"), mpi_type(tensor.scalar_type()),
                          from, tag, comm_, &work->requests.emplace_back()),
                what("recv"));
    return handle(std::move(work));
  }

  Handle barrier() override {
    auto work = start("barrier", {});
    BRIGADE_MPI(MPI_Ibarrier(comm_, &work->requests.emplace_back()), what("barrier"));
    return handle(std::move(work));
  }

  std::unique_ptr<Communicator> split(int color, int key, const std::string& name) override {
    BRIGADE_CHECK(color >= 0, "split of ", describe(), ": color must be >= 0, got ", color);
    MPI_Comm comm;
    BRIGADE_MPI(MPI_Comm_split(comm_, color, key, &comm), "split of ", describe(), " into ", name);
    MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    int rank = 0, size = 0;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    return std::make_unique<MpiCommunicator>(comm, true, rank, size, name, timeout());
  }

 private:
  std::string what(const std::string& op) const { return op + " on " + describe(); }
  // MPI counts are ints; the message is built only when one overflows.
  int count(int64_t n, const char* op) const {
    BRIGADE_CHECK(n <= INT_MAX, what(op), ": ", n, " elements exceed MPI's int count; split the message");
    return static_cast<int>(n);
  }

  void check_cpu(const torch::Tensor& t, const char* op) const {
    BRIGADE_CHECK(t.device().is_cpu() && t.is_contiguous(), op, " on ", describe(),
                  ": the MPI back end needs contiguous CPU tensors, got ", t.device(),
                  t.is_contiguous() ? "" : " (not contiguous)");
  }

  // The tensor itself when MPI can reduce its dtype, else a float32 copy.
  static torch::Tensor reduce_buffer(const torch::Tensor& t) {
    if (reducible(t.scalar_type())) return t;
    BRIGADE_CHECK(t.scalar_type() != torch::kBool, "MPI reductions over bool tensors are not supported");
    return t.to(torch::kFloat);
  }

  std::unique_ptr<MpiWork> start(const std::string& op, std::vector<torch::Tensor> keep_alive) const {
    return std::make_unique<MpiWork>(what(op), std::move(keep_alive));
  }
  Handle handle(std::unique_ptr<MpiWork> work) const { return Handle(std::move(work), timeout()); }

  MPI_Comm comm_;
  bool owned_;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_world(const World& world, std::chrono::seconds timeout) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    BRIGADE_MPI(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided), "MPI start-up");
    g_initialized_here = true;
    BRIGADE_CHECK(provided == MPI_THREAD_MULTIPLE, "this MPI library does not support MPI_THREAD_MULTIPLE (got level ",
                  provided, "); brigade needs it for gradient hooks");
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  BRIGADE_CHECK(rank == world.rank && size == world.size, "MPI says rank ", rank, " of ", size,
                " but the launcher's environment said rank ", world.rank, " of ", world.size,
                ": start brigade with mpirun, srun or `brigade launch`");
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, false, rank, size, "world", timeout);
}

bool mpi_initialized() { return g_initialized_here; }

void mpi_abort(int code) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

void mpi_finalize() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (g_initialized_here && !finalized) MPI_Finalize();
}

}  // namespace brigade::parallel
