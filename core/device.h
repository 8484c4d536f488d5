// What accelerators this process can see. Compiled from device_cuda.cu when the CUDA
// toolkit is found, from device_nocuda.cpp otherwise (chosen in cmake/Targets.cmake).
#pragma once

#include <string>

namespace brigade {

// Number of usable CUDA devices (0 without CUDA, a driver or a GPU).
int cuda_device_count();
// One line for the start-up log: "CUDA: 1 device(s), NVIDIA H100 ..." or "CUDA: not built".
std::string describe_devices();

}  // namespace brigade
