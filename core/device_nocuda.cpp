#include "core/device.h"

namespace brigade {

int cuda_device_count() { return 0; }
std::string describe_devices() { return "CUDA: not built"; }

}  // namespace brigade
