#include "core/device.h"

#include <cuda_runtime.h>

#include <c10/cuda/CUDACachingAllocator.h>

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

}  // namespace brigade
