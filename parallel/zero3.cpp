#include "parallel/zero3.h"

#include <algorithm>

#include <c10/core/StorageImpl.h>
#include <torch/torch.h>

#include "core/error.h"

namespace brigade::parallel {
namespace {

// A buffer's memory goes back to its allocator while the storage object (which the
// parameter views and autograd's saved views point to) stays.
void free_storage(const torch::Tensor& flat) {
  auto* storage = flat.storage().unsafeGetStorageImpl();
  storage->set_data_ptr_noswap(at::DataPtr(nullptr, storage->device()));
  storage->set_nbytes(0);
}

void refill_storage(const torch::Tensor& flat, int64_t bytes) {
  auto* storage = flat.storage().unsafeGetStorageImpl();
  BRIGADE_ASSERT(storage->allocator() != nullptr, "a ZeRO-3 unit buffer without an allocator");
  storage->set_data_ptr_noswap(storage->allocator()->allocate(bytes));
  storage->set_nbytes(bytes);
}

int64_t buffer_bytes(const torch::Tensor& flat) { return flat.numel() * static_cast<int64_t>(flat.element_size()); }

}  // namespace

ShardedParameters::ShardedParameters(const std::vector<std::pair<std::string, torch::Tensor>>& params,
                                     const BucketLayout& layout, std::vector<size_t> unit_buckets,
                                     std::shared_ptr<Communicator> group)
    : params_(params), layout_(layout), group_(std::move(group)) {
  torch::NoGradGuard no_grad;
  const int ranks = group_->size(), rank = group_->rank();
  unit_of_bucket_.assign(layout_.buckets.size(), -1);
  for (size_t b : unit_buckets) {
    unit_of_bucket_.at(b) = static_cast<int64_t>(units_.size());
    const auto& spec = layout_.buckets.at(b);
    auto& unit = units_.emplace_back();
    unit.bucket = b;
    const auto on = params_[spec.params.front()].second.options().requires_grad(false);
    unit.flat = torch::zeros({spec.shard * ranks}, on);
    for (size_t k = 0; k < spec.params.size(); ++k) {
      auto& p = params_[spec.params[k]].second;
      auto view = unit.flat.narrow(0, spec.offsets[k], p.numel());
      view.copy_(p.reshape({-1}));
      // The parameter (the module's own tensor, autograd identity kept) now reads
      // from the unit's buffer.
      p.set_data(view.view(p.sizes()));
    }
    unit.shard = unit.flat.narrow(0, rank * spec.shard, spec.shard).clone();
    free_storage(unit.flat);
  }
}

ShardedParameters::~ShardedParameters() {
  for (auto& unit : units_) {
    if (unit.state == Unit::State::kInFlight) unit.handle.wait();
  }
}

void ShardedParameters::prefetch(int64_t u) {
  if (whole_ || u < 0 || u >= static_cast<int64_t>(units_.size())) return;
  auto& unit = units_[u];
  if (unit.state != Unit::State::kReleased) return;
  allocate(unit);
  unit.handle = group_->all_gather(unit.shard, unit.flat);
  unit.state = Unit::State::kInFlight;
}

void ShardedParameters::allocate(Unit& unit) {
  const int64_t bytes = buffer_bytes(unit.flat);
  refill_storage(unit.flat, bytes);
  gathered_bytes_ += bytes;
  peak_gathered_bytes_ = std::max(peak_gathered_bytes_, gathered_bytes_);
}

void ShardedParameters::gather(int64_t u) {
  BRIGADE_ASSERT(u >= 0 && u < static_cast<int64_t>(units_.size()), "no ZeRO-3 unit ", u);
  if (whole_) return;
  prefetch(u);
  auto& unit = units_[u];
  if (unit.state == Unit::State::kInFlight) {
    unit.handle.wait();
    unit.state = Unit::State::kGathered;
  }
}

void ShardedParameters::release(int64_t u) {
  BRIGADE_ASSERT(u >= 0 && u < static_cast<int64_t>(units_.size()), "no ZeRO-3 unit ", u);
  auto& unit = units_[u];
  if (whole_ || unit.state == Unit::State::kReleased) return;
  if (unit.state == Unit::State::kInFlight) unit.handle.wait();
  free_storage(unit.flat);
  gathered_bytes_ -= buffer_bytes(unit.flat);
  unit.state = Unit::State::kReleased;
}

void ShardedParameters::gather_all() {
  if (whole_) return;
  for (size_t u = 0; u < units_.size(); ++u) prefetch(static_cast<int64_t>(u));
  for (size_t u = 0; u < units_.size(); ++u) gather(static_cast<int64_t>(u));
  whole_ = true;
}

void ShardedParameters::release_all() {
  whole_ = false;
  for (size_t u = 0; u < units_.size(); ++u) release(static_cast<int64_t>(u));
}

int64_t ShardedParameters::unit_of_bucket(size_t b) const { return b < unit_of_bucket_.size() ? unit_of_bucket_[b] : -1; }

void ShardedParameters::refresh_shards() {
  torch::NoGradGuard no_grad;
  const int rank = group_->rank();
  for (auto& unit : units_) {
    BRIGADE_ASSERT(unit.state == Unit::State::kGathered, "refresh_shards() with a unit not gathered");
    const int64_t shard = layout_.buckets[unit.bucket].shard;
    unit.shard.copy_(unit.flat.narrow(0, rank * shard, shard));
  }
}

int64_t ShardedParameters::unit_bytes(size_t u) const { return buffer_bytes(units_.at(u).flat); }

int64_t ShardedParameters::largest_unit_bytes() const {
  int64_t most = 0;
  for (const auto& unit : units_) most = std::max(most, buffer_bytes(unit.flat));
  return most;
}

}  // namespace brigade::parallel
