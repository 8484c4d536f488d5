#include "core/device.h"

#include <cuda_runtime.h>

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

}  // namespace brigade
