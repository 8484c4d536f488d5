#include "distill/kd_objective.h"

#include <torch/torch.h>

#include "core/error.h"
#include "model/safetensors.h"

namespace brigade::distill {

KdTargets load_kd_targets(const std::filesystem::path& path) {
  BRIGADE_CHECK(std::filesystem::exists(path), "KD targets ", path.string(),
                " do not exist (the distill build stage writes kd.safetensors when the trace store has logprobs)");
  auto file = model::load_safetensors(path);
  auto take = [&](const std::string& name, torch::ScalarType dtype, int64_t dim) {
    auto it = file.tensors.find(name);
    BRIGADE_CHECK(it != file.tensors.end(), "KD targets ", path.string(), ": no tensor '", name, "'");
    BRIGADE_CHECK(it->second.scalar_type() == dtype && it->second.dim() == dim, "KD targets ", path.string(), ": '",
                  name, "' must be ", dim, "-d ", c10::toString(dtype), ", got ", it->second.dim(), "-d ",
                  c10::toString(it->second.scalar_type()));
    return it->second;
  };
  KdTargets t{take("ids", torch::kInt32, 2), take("logprobs", torch::kFloat32, 2), take("valid", torch::kUInt8, 1)};
  BRIGADE_CHECK(t.ids.sizes() == t.logprobs.sizes() && t.valid.size(0) == t.ids.size(0) && t.ids.size(1) >= 1,
                "KD targets ", path.string(), ": shapes disagree (ids ", t.ids.sizes(), ", logprobs ",
                t.logprobs.sizes(), ", valid ", t.valid.sizes(), ")");
  return t;
}

KdObjective::KdObjective(KdTargets targets, KdOptions options)
    : targets_(std::move(targets)), options_(options) {
  options_.validate();
  BRIGADE_CHECK(options_.loss != KdLoss::kNone, "KdObjective needs a KD loss (distill.kd.loss is none)");
  BRIGADE_CHECK(targets_.ids.defined() && targets_.ids.dim() == 2 && targets_.logprobs.sizes() == targets_.ids.sizes() &&
                    targets_.valid.dim() == 1 && targets_.valid.size(0) == targets_.ids.size(0),
                "KdObjective: ids, logprobs and valid must be [tokens, k], [tokens, k] and [tokens]");
}

torch::Tensor KdObjective::loss_sum(const torch::Tensor& logits, const data::Batch& batch) const {
  const int64_t rows = logits.size(0), T = logits.size(1);
  BRIGADE_CHECK(batch.offsets.defined() && batch.offsets.numel() == rows,
                "KD: the batch carries no row offsets (the sampler must set Batch::offsets)");
  BRIGADE_CHECK(batch.offsets.max().item<int64_t>() + T <= targets_.tokens(), "KD: a batch window ends past the ",
                targets_.tokens(), " positions of the KD targets (built for another shard?)");
  // Corpus position of every input token, then the positions that count: trained
  // targets with a teacher record.
  const auto positions = (batch.offsets.unsqueeze(1) + torch::arange(T, torch::kInt64)).reshape({-1});  // [rows*T]
  // The teacher's records live in host memory: the selection is made there and only
  // the picked rows travel to the logits' device.
  const auto counted = batch.targets.reshape({-1}).to(torch::kCPU).ne(data::kIgnoreIndex)
                           .logical_and(targets_.valid.index_select(0, positions).to(torch::kBool));
  const auto picked = counted.nonzero().reshape({-1});  // [n] indices into rows*T
  const int64_t n = picked.size(0);
  if (n == 0) return torch::zeros({}, logits.options().dtype(torch::kFloat32));
  const auto where = positions.index_select(0, picked);
  const auto student = logits.reshape({rows * T, logits.size(-1)}).index_select(0, picked.to(logits.device()));
  const auto device = logits.device();
  const auto mean = kd_loss(student, targets_.ids.index_select(0, where).to(device),
                            targets_.logprobs.index_select(0, where).to(device),
                            torch::ones({n}, torch::TensorOptions().dtype(torch::kBool).device(device)), options_);
  return mean * static_cast<double>(n);
}

}  // namespace brigade::distill
