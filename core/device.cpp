#include "core/device.h"

#include "core/error.h"

namespace brigade {

std::string to_string(DeviceKind kind) {
  switch (kind) {
    case DeviceKind::kAuto: return "auto";
    case DeviceKind::kCpu: return "cpu";
    case DeviceKind::kCuda: return "cuda";
  }
  return "?";
}

DeviceKind parse_device_kind(const std::string& name) {
  if (name == "auto") return DeviceKind::kAuto;
  if (name == "cpu") return DeviceKind::kCpu;
  if (name == "cuda" || name == "gpu") return DeviceKind::kCuda;
  BRIGADE_FAIL("unknown device '", name, "' (expected auto, cpu or cuda)");
}

c10::Device choose_device(DeviceKind requested, const DeviceFacts& facts, const std::string& key) {
  const int gpus = static_cast<int>(facts.capabilities.size());
  if (requested == DeviceKind::kCpu || (requested == DeviceKind::kAuto && gpus == 0)) return c10::Device(c10::kCPU);
  BRIGADE_CHECK(facts.cuda_built, key, " is cuda but this brigade was built without the CUDA toolkit; "
                "rebuild with CUDA (scripts/build.sh finds /usr/local/cuda) or set ", key, "=cpu");
  BRIGADE_CHECK(gpus > 0, key, " is cuda but no GPU is visible to this process (check nvidia-smi and "
                "CUDA_VISIBLE_DEVICES), or set ", key, "=cpu");
  BRIGADE_CHECK(facts.local_ranks <= gpus, facts.local_ranks, " ranks of this job run on this node but only ", gpus,
                " GPU(s) are visible: start one rank per GPU (mpirun -np / srun --ntasks-per-node), or set ", key,
                "=cpu");
  BRIGADE_CHECK(facts.local_rank >= 0 && facts.local_rank < gpus, "local rank ", facts.local_rank,
                " has no GPU: only ", gpus, " are visible");
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(facts.local_rank));
}

}  // namespace brigade
