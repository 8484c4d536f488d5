// One communicator interface for every back end (STYLE.md: flashlight / c10d):
// MPI (CPU tensors; also bootstraps everything else), NCCL (GPU tensors) and a
// real single-process world where every collective is the identity. Sub-groups
// (data-parallel, expert-parallel) are Communicator objects made by split(),
// never globals. make_world_communicator() is the one factory.
//
// Every operation starts asynchronously and returns a Handle; wait() blocks until
// it finished. A collective that does not finish within the communicator's
// timeout (a rank died or hangs) is an Error naming this rank, the group and the
// operation, so no job waits forever.
//
// Tensors are contiguous and live on the back end's device. Collectives work on
// dim 0: reduce_scatter and all_gather split and concatenate along it, and
// all_to_all sends `send_rows[r]` consecutive rows to rank r (any row width,
// uneven and zero counts allowed).
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/types.h>

#include "parallel/world.h"

namespace brigade::parallel {

enum class ReduceOp { kSum, kMax, kMin };
enum class Backend { kSingle, kMpi, kNccl };
std::string to_string(ReduceOp op);
std::string to_string(Backend backend);

// An operation in flight. Back ends implement it.
class Work {
 public:
  virtual ~Work() = default;
  // Advances the operation; true once it finished (results are in place then).
  virtual bool test() = 0;
  // Blocks until the operation finished, or for at most `timeout` (then an Error).
  virtual void wait(std::chrono::seconds timeout) = 0;
};

// The waitable result of a communicator call. A default Handle is finished.
class Handle {
 public:
  Handle() = default;
  Handle(std::unique_ptr<Work> work, std::chrono::seconds timeout) : work_(std::move(work)), timeout_(timeout) {}
  Handle(Handle&&) = default;
  Handle& operator=(Handle&&) = default;
  // Waiting twice is fine; a finished handle returns at once.
  void wait();
  bool test();

 private:
  std::unique_ptr<Work> work_;
  std::chrono::seconds timeout_{0};
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  int rank() const { return rank_; }
  int size() const { return size_; }
  // "world", "dp", "ep", ...: names the group in errors and logs.
  const std::string& name() const { return name_; }
  std::chrono::seconds timeout() const { return timeout_; }
  virtual Backend backend() const = 0;
  // Where this back end's tensors live: every tensor passed to it, control scalars
  // included, is made there (the CPU for MPI and single-process, the rank's GPU for NCCL).
  virtual c10::Device device() const = 0;

  // In place: every rank ends with op over all ranks' `tensor`.
  virtual Handle all_reduce(torch::Tensor& tensor, ReduceOp op) = 0;
  // input [size * n, ...]: rank r ends with op over all ranks' rows [r * n, (r + 1) * n) in output [n, ...].
  virtual Handle reduce_scatter(const torch::Tensor& input, torch::Tensor& output, ReduceOp op) = 0;
  // input [n, ...] -> output [size * n, ...], rank r's rows at [r * n, (r + 1) * n).
  virtual Handle all_gather(const torch::Tensor& input, torch::Tensor& output) = 0;
  // In place: every rank ends with root's tensor.
  virtual Handle broadcast(torch::Tensor& tensor, int root) = 0;
  // input [sum(send_rows), ...] -> output [sum(recv_rows), ...]: the rows for rank r
  // are input's send_rows[r] rows after those for ranks < r; output holds what rank
  // r sent to this rank at the same place by recv_rows. Row widths must match.
  virtual Handle all_to_all(const torch::Tensor& input, const std::vector<int64_t>& send_rows, torch::Tensor& output,
                            const std::vector<int64_t>& recv_rows) = 0;
  virtual Handle send(const torch::Tensor& tensor, int to, int tag) = 0;
  virtual Handle recv(torch::Tensor& tensor, int from, int tag) = 0;
  virtual Handle barrier() = 0;

  // Collective over this group: ranks with the same color form a new group, ordered
  // by key (then by rank here).
  virtual std::unique_ptr<Communicator> split(int color, int key, const std::string& name) = 0;

  // "rank 1/4 of dp": for messages.
  std::string describe() const;

 protected:
  Communicator(int rank, int size, std::string name, std::chrono::seconds timeout)
      : rank_(rank), size_(size), name_(std::move(name)), timeout_(timeout) {}
  // Shape checks shared by every back end (errors name the operation and group).
  void check_reduce_scatter(const torch::Tensor& input, const torch::Tensor& output) const;
  void check_all_gather(const torch::Tensor& input, const torch::Tensor& output) const;
  void check_all_to_all(const torch::Tensor& input, const std::vector<int64_t>& send_rows, const torch::Tensor& output,
                        const std::vector<int64_t>& recv_rows) const;
  void check_peer(int peer, const char* op) const;

 private:
  int rank_;
  int size_;
  std::string name_;
  std::chrono::seconds timeout_;
};

struct CommunicatorOptions {
  Backend backend = Backend::kSingle;
  std::chrono::seconds timeout{300};  // a collective not finished by then is an Error
};

// The world communicator of this process. kSingle needs world.size == 1; kMpi
// initialises MPI (once per process) and checks MPI's rank and size against
// `world` (what the launcher's environment said); kNccl needs a CUDA build.
std::unique_ptr<Communicator> make_world_communicator(const World& world, const CommunicatorOptions& options);

// MPI bootstrap: whether MPI was initialised by make_world_communicator, and a
// last-resort stop of every rank (launch/ calls it after an error in a multi-rank
// job, so survivors of a dead or hung rank do not wait for it in MPI_Finalize).
bool mpi_initialized();
[[noreturn]] void mpi_abort(int code);
// Finalises MPI if it was initialised (launch/ calls it on a clean exit).
void mpi_finalize();

}  // namespace brigade::parallel
