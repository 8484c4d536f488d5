// What accelerators this process can see, and which device a run computes on.
// The queries are compiled from device_cuda.cu when the CUDA toolkit is found, from
// device_nocuda.cpp otherwise (chosen in cmake/Targets.cmake); the choice of device
// (device.cpp) is plain logic over those facts, so it is tested without a GPU.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <c10/core/Device.h>

namespace brigade {

// Number of usable CUDA devices (0 without CUDA, a driver or a GPU). Respects
// CUDA_VISIBLE_DEVICES: device i is the i-th visible one.
int cuda_device_count();
// Whether brigade was compiled with the CUDA toolkit.
bool cuda_built();
// One line for the start-up log: "CUDA: 1 device(s), NVIDIA H100 ..." or "CUDA: not built".
std::string describe_devices();
// Compute capability of visible device `index` as major * 10 + minor (90 for
// Hopper, 89 for Ada); 0 when there is no such device.
int cuda_capability(int index);
// The device's marketing name ("NVIDIA H200"); empty when there is no such device.
std::string cuda_device_name(int index);

// What the caching allocator holds on a GPU (zeros without one).
struct GpuMemory {
  int64_t peak_allocated_bytes = 0;  // most bytes in live tensors since the process started
  int64_t reserved_bytes = 0;        // held by LibTorch's caching allocator now
  int64_t total_bytes = 0;           // the device's memory
};
GpuMemory cuda_memory(int index);

// Counts, while it lives, the CUDA operations that make the host wait for the GPU
// (LibTorch's CUDA sync-debug mode set to warn, its warnings counted here instead of
// printed; the autograd engine replays its threads' warnings on the calling thread,
// so backward's count too). What the *_CUDA test of the sync-free step asserts.
// Without CUDA it counts nothing. One at a time per process.
class HostSyncCounter {
 public:
  HostSyncCounter();
  ~HostSyncCounter();
  HostSyncCounter(const HostSyncCounter&) = delete;
  HostSyncCounter& operator=(const HostSyncCounter&) = delete;
  int64_t count() const;
  // Where each one was raised (brigade's frames of the stack), for a failing test to print.
  std::vector<std::string> sites() const;

  struct Impl;

 private:
  Impl* impl_;
};

// `trainer.device`: auto is CUDA when a GPU is visible, else the CPU.
enum class DeviceKind { kAuto, kCpu, kCuda };
std::string to_string(DeviceKind kind);
DeviceKind parse_device_kind(const std::string& name);

// What the choice of a rank's device depends on (launch/ gathers it).
struct DeviceFacts {
  int local_rank = 0;                // this process's rank on its node
  int local_ranks = 1;               // processes of the job on this node
  std::vector<int> capabilities;     // per visible GPU, major * 10 + minor
  bool cuda_built = false;           // brigade was compiled with the CUDA toolkit
};

// The device this rank computes on: one process per GPU, local rank i on visible
// GPU i. Impossible requests (cuda without a GPU or without a CUDA build, more local
// ranks than visible GPUs) are an Error naming `key` and what is missing.
c10::Device choose_device(DeviceKind requested, const DeviceFacts& facts, const std::string& key);

}  // namespace brigade
