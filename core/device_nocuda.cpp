#include "core/device.h"

namespace brigade {

bool cuda_built() { return false; }
int cuda_device_count() { return 0; }
std::string describe_devices() { return "CUDA: not built"; }
int cuda_capability(int) { return 0; }
std::string cuda_device_name(int) { return {}; }
GpuMemory cuda_memory(int) { return {}; }

}  // namespace brigade
