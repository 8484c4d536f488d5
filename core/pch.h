// Precompiled header shared by every brigade target (see cmake/Targets.cmake).
// Files still include what they use; this only makes LibTorch's headers cheap.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
