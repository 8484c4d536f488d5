// bench_ep_dispatch: expert-parallel dispatch + combine (moe/expert_parallel.h)
// against a raw MPI_Alltoallv of the same bytes, measured in the same run.
//
//   mpirun --allow-run-as-root --oversubscribe -np 2 build-cuda/bench/bench_ep_dispatch \
//       [--tokens 4096] [--d-model 1024] [--top-k 8] [--experts 64] [--dtype bf16|fp32] \
//       [--fp8] [--backward] [--warmup 3] [--reps 11] [--threads 1]
//
// Every rank routes its own random tokens (top_k distinct experts each, uniform),
// sorts the copies in expert-parallel order (plan_dispatch + permute: not timed)
// and then, per rep:
//   brigade  dispatch() (counts exchange, then rows and weights in one all_to_all
//            round per local expert) then combine() (the rounds back); with
//            --backward also backward through both
//   raw      MPI_Alltoallv of the same bytes per rank pair: one for the dispatch
//            (rows and weights in one message; with --fp8 the codes, scales and
//            weights), one for the combine (and two for the gradients)
// The counts are known to the raw side, so it skips the counts exchange and sends
// one message per rank pair: it is the floor the brigade side is measured against. A rep's time is
// the slowest rank's; rank 0 prints the medians and their ratio.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include <mpi.h>
#include <torch/torch.h>

#include "core/error.h"
#include "launch/world.h"
#include "moe/expert_parallel.h"
#include "moe/permute.h"
#include "parallel/communicator.h"
#include "precision/quantize.h"

namespace {

using namespace brigade;
using Clock = std::chrono::steady_clock;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Seconds `fn` took on the slowest rank, all ranks started together.
template <typename Fn>
double timed(Fn&& fn) {
  MPI_Barrier(MPI_COMM_WORLD);
  const auto start = Clock::now();
  fn();
  double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  MPI_Allreduce(MPI_IN_PLACE, &seconds, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return seconds;
}

// One raw exchange: per-rank byte counts and displacements, buffers allocated once.
struct RawExchange {
  std::vector<int> send_counts, send_displs, recv_counts, recv_displs;
  torch::Tensor send, recv;  // uint8

  RawExchange(const std::vector<int64_t>& send_rows, const std::vector<int64_t>& recv_rows, int64_t row_bytes) {
    int64_t sent = 0, received = 0;
    for (size_t r = 0; r < send_rows.size(); ++r) {
      BRIGADE_CHECK((sent + send_rows[r]) * row_bytes <= INT32_MAX && (received + recv_rows[r]) * row_bytes <= INT32_MAX,
                    "message over 2 GiB: use fewer tokens");
      send_counts.push_back(static_cast<int>(send_rows[r] * row_bytes));
      send_displs.push_back(static_cast<int>(sent * row_bytes));
      recv_counts.push_back(static_cast<int>(recv_rows[r] * row_bytes));
      recv_displs.push_back(static_cast<int>(received * row_bytes));
      sent += send_rows[r];
      received += recv_rows[r];
    }
    send = torch::randint(256, {sent * row_bytes}, torch::kByte);
    recv = torch::empty({received * row_bytes}, torch::kByte);
  }
  void run(bool forward = true) {
    // Reverse direction: what was received goes back.
    auto& sc = forward ? send_counts : recv_counts;
    auto& sd = forward ? send_displs : recv_displs;
    auto& rc = forward ? recv_counts : send_counts;
    auto& rd = forward ? recv_displs : send_displs;
    auto& in = forward ? send : recv;
    auto& out = forward ? recv : send;
    MPI_Alltoallv(in.data_ptr(), sc.data(), sd.data(), MPI_BYTE, out.data_ptr(), rc.data(), rd.data(), MPI_BYTE,
                  MPI_COMM_WORLD);
  }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"expert-parallel dispatch + combine vs raw MPI_Alltoallv (run under mpirun)"};
  int64_t tokens = 4096, d_model = 1024, top_k = 8, experts = 64;
  int warmup = 3, reps = 11, threads = 1;
  std::string dtype_name = "bf16";
  bool fp8 = false, backward = false;
  app.add_option("--tokens", tokens, "tokens per rank");
  app.add_option("--d-model", d_model, "row width");
  app.add_option("--top-k", top_k, "experts per token");
  app.add_option("--experts", experts, "routed experts (a multiple of the rank count)");
  app.add_option("--dtype", dtype_name, "activation dtype: bf16 or fp32");
  app.add_flag("--fp8", fp8, "FP8 dispatch (E4M3 codes + 1x128 scales)");
  app.add_flag("--backward", backward, "time forward + backward (gradients travel back)");
  app.add_option("--warmup", warmup, "untimed reps");
  app.add_option("--reps", reps, "timed reps (median)");
  app.add_option("--threads", threads, "intra-op threads");
  CLI11_PARSE(app, argc, argv);

  int code = 0;
  try {
    at::set_num_threads(threads);
    const auto detected = launch::detect_world();
    auto ep = parallel::make_world_communicator(detected.world, {parallel::Backend::kMpi, std::chrono::seconds(300)});
    const int me = ep->rank(), ranks = ep->size();
    BRIGADE_CHECK(experts % ranks == 0, "--experts ", experts, " must be a multiple of the ", ranks, " ranks");
    BRIGADE_CHECK(top_k <= experts, "--top-k ", top_k, " exceeds --experts ", experts);
    BRIGADE_CHECK(dtype_name == "bf16" || dtype_name == "fp32", "--dtype must be bf16 or fp32, got ", dtype_name);
    const auto dtype = dtype_name == "bf16" ? torch::kBFloat16 : torch::kFloat;
    const int64_t element = dtype_name == "bf16" ? 2 : 4;

    torch::manual_seed(1234 + me);
    auto x = torch::randn({tokens, d_model}).to(dtype);
    auto indices = std::get<1>(torch::rand({tokens, experts}).topk(top_k, 1));
    auto weights = torch::rand({tokens, top_k});
    auto keys = moe::expert_parallel_keys(indices, experts, ranks);
    auto plan = moe::plan_dispatch(keys, weights, experts, -1, moe::DropPolicy::kProbs);
    auto rows = moe::permute(x, plan);
    auto row_weights = moe::row_weights(weights, plan);
    auto probe = torch::randn_like(rows);

    auto brigade_pass = [&] {
      if (!backward) {
        torch::NoGradGuard no_grad;
        auto d = moe::dispatch(*ep, rows, row_weights, plan.counts, fp8);
        moe::combine(*ep, d.rows, d.layout);
        return;
      }
      auto r = rows.detach().requires_grad_(true);
      auto w = row_weights.detach().requires_grad_(true);
      auto d = moe::dispatch(*ep, r, w, plan.counts, fp8);
      // No stand-in expert math: only the exchanges are timed. The weights' gradient
      // is zeros, still sent back.
      moe::combine(*ep, d.rows, d.layout).backward(probe);
    };

    // The raw side's byte counts, from the same layout.
    const auto layout = moe::exchange_counts(*ep, plan.counts);
    const int64_t groups = (d_model + precision::kScaleGroup - 1) / precision::kScaleGroup;
    const int64_t dispatch_bytes = fp8 ? d_model + 4 * (groups + 1) : d_model * element + 4;
    RawExchange raw_dispatch(layout.send_rows, layout.recv_rows, dispatch_bytes);
    RawExchange raw_combine(layout.recv_rows, layout.send_rows, d_model * element);
    RawExchange raw_grad_weights(layout.send_rows, layout.recv_rows, d_model * element + 4);
    auto raw_pass = [&] {
      raw_dispatch.run();
      raw_combine.run();
      if (backward) {
        raw_combine.run(false);       // d combine: back to the experts
        raw_grad_weights.run(false);  // d dispatch: rows and weights back to the sources
      }
    };

    for (int i = 0; i < warmup; ++i) {
      brigade_pass();
      raw_pass();
    }
    std::vector<double> brigade_s, raw_s;
    for (int i = 0; i < reps; ++i) {  // interleaved, so drift hits both sides
      brigade_s.push_back(timed(brigade_pass));
      raw_s.push_back(timed(raw_pass));
    }
    const double b = median(brigade_s), r = median(raw_s);
    int64_t sent = layout.sent(), total_sent = 0;
    MPI_Allreduce(&sent, &total_sent, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
    if (me == 0) {
      std::printf("ranks %d  tokens/rank %lld  d_model %lld  top_k %lld  experts %lld  dtype %s%s  %s\n", ranks,
                  static_cast<long long>(tokens), static_cast<long long>(d_model), static_cast<long long>(top_k),
                  static_cast<long long>(experts), dtype_name.c_str(), fp8 ? " (fp8 dispatch)" : "",
                  backward ? "forward+backward" : "forward");
      std::printf("rows/rank %.0f  dispatch %.1f MiB/rank  combine %.1f MiB/rank  reps %d (median of the slowest rank)\n",
                  static_cast<double>(total_sent) / ranks,
                  static_cast<double>(total_sent) / ranks * dispatch_bytes / (1 << 20),
                  static_cast<double>(total_sent) / ranks * d_model * element / (1 << 20), reps);
      std::printf("| side | median ms | ratio |\n|---|---|---|\n");
      std::printf("| brigade dispatch+combine | %.2f | %.2fx |\n", 1e3 * b, b / r);
      std::printf("| raw MPI_Alltoallv | %.2f | 1.00x |\n", 1e3 * r);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_ep_dispatch: %s\n", e.what());
    code = 1;
  }
  parallel::mpi_finalize();
  return code;
}
