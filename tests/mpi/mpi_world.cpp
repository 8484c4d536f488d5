#include "tests/mpi/mpi_world.h"

#include <gtest/gtest.h>

#include <chrono>
#include <memory>

#include "launch/world.h"

namespace brigade::testing {
namespace {

class MpiEnvironment : public ::testing::Environment {
 public:
  void TearDown() override { parallel::mpi_finalize(); }
};
[[maybe_unused]] auto* const g_mpi_env = ::testing::AddGlobalTestEnvironment(new MpiEnvironment);

}  // namespace

parallel::Communicator* mpi_world() {
  static std::unique_ptr<parallel::Communicator> world = []() -> std::unique_ptr<parallel::Communicator> {
    const auto detected = launch::detect_world();
    if (detected.world.size < 2) return nullptr;
    return parallel::make_world_communicator(detected.world, {parallel::Backend::kMpi, std::chrono::seconds(120)});
  }();
  return world.get();
}

}  // namespace brigade::testing
