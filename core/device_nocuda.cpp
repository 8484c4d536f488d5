#include "core/device.h"

namespace brigade {

bool cuda_built() { return false; }
int cuda_device_count() { return 0; }
std::string describe_devices() { return "CUDA: not built"; }
int cuda_capability(int) { return 0; }
std::string cuda_device_name(int) { return {}; }
GpuMemory cuda_memory(int) { return {}; }

struct HostSyncCounter::Impl {};
HostSyncCounter::HostSyncCounter() : impl_(nullptr) {}
HostSyncCounter::~HostSyncCounter() = default;
int64_t HostSyncCounter::count() const { return 0; }
std::vector<std::string> HostSyncCounter::sites() const { return {}; }

}  // namespace brigade
