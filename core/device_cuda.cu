#include "core/device.h"

#include <cuda_runtime.h>

#include <mutex>
#include <sstream>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Backtrace.h>
#include <c10/util/Exception.h>

namespace brigade {

bool cuda_built() { return true; }

int cuda_device_count() {
  int count = 0;
  // No driver or no GPU is not an error here: the answer is simply zero devices.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::string describe_devices() {
  const int count = cuda_device_count();
  if (count == 0) return "CUDA: built, no device visible";
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  return "CUDA: " + std::to_string(count) + " device(s), " + prop.name + " (sm_" + std::to_string(prop.major) +
         std::to_string(prop.minor) + ")";
}

int cuda_capability(int index) {
  if (index < 0 || index >= cuda_device_count()) return 0;
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, index) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return prop.major * 10 + prop.minor;
}

std::string cuda_device_name(int index) {
  if (index < 0 || index >= cuda_device_count()) return {};
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, index) != cudaSuccess) {
    cudaGetLastError();
    return {};
  }
  return prop.name;
}

GpuMemory cuda_memory(int index) {
  GpuMemory m;
  if (index < 0 || index >= cuda_device_count()) return m;
  size_t free = 0, total = 0;
  if (cudaSetDevice(index) == cudaSuccess && cudaMemGetInfo(&free, &total) == cudaSuccess) {
    m.total_bytes = static_cast<int64_t>(total);
  } else {
    cudaGetLastError();
  }
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(index));
  const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  m.peak_allocated_bytes = stats.allocated_bytes[all].peak;
  m.reserved_bytes = stats.reserved_bytes[all].current;
  return m;
}

struct HostSyncCounter::Impl : c10::WarningHandler {
  void process(const c10::Warning& warning) override {
    const auto& message = warning.msg();
    if (message.find("synchroniz") == std::string::npos) {
      previous->process(warning);  // not ours: as it would have been
      return;
    }
    // The warning is raised in LibTorch's sync helper: brigade's frames of the stack
    // say which of our calls waited.
    std::string where;
    std::istringstream stack(c10::get_backtrace(/*frames_to_skip=*/2, /*maximum_number_of_frames=*/40));
    for (std::string frame; std::getline(stack, frame);) {
      if (frame.find("brigade") != std::string::npos) where += (where.empty() ? "" : " <- ") + frame;
    }
    std::lock_guard<std::mutex> lock(mutex);
    sites.push_back(where.empty() ? warning.msg() : where);
  }
  c10::WarningHandler* previous = nullptr;
  c10::cuda::SyncDebugMode mode = c10::cuda::SyncDebugMode::L_DISABLED;
  mutable std::mutex mutex;
  std::vector<std::string> sites;
};

HostSyncCounter::HostSyncCounter() : impl_(new Impl) {
  impl_->previous = c10::WarningUtils::get_warning_handler();
  impl_->mode = c10::cuda::warning_state().get_sync_debug_mode();
  c10::WarningUtils::set_warning_handler(impl_);
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_WARN);
}

HostSyncCounter::~HostSyncCounter() {
  c10::cuda::warning_state().set_sync_debug_mode(impl_->mode);
  c10::WarningUtils::set_warning_handler(impl_->previous);
  delete impl_;
}

int64_t HostSyncCounter::count() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return static_cast<int64_t>(impl_->sites.size());
}

std::vector<std::string> HostSyncCounter::sites() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->sites;
}

}  // namespace brigade
