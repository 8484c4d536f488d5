#include "core/device.h"

#include <cuda_runtime.h>

namespace brigade {

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
  return "CUDA: " + std::to_string(count) + " device(s), " + prop.name;
}

}  // namespace brigade
