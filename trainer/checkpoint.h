// Checkpoints (DESIGN.md contract):
//
//   RUN/checkpoints/step_00000200/
//       model.safetensors       FP32 master weights, Hugging Face-style names
//       optimizer.safetensors   AdamW state: exp_avg.NAME, exp_avg_sq.NAME, step.NAME
//     or, with ZeRO-1 (parallel.zero: true), one file per data-parallel rank:
//       optimizer_shards.json   manifest: world size, every parameter's shape, and for
//                               each shard file the element range [begin, end) of each
//                               flattened parameter it holds
//       optimizer.rank00001-of-00002.safetensors
//                               exp_avg.NAME / exp_avg_sq.NAME: those elements only
//                               (1-D); step.NAME: the step count
//       rng.safetensors         RNG states (cpu)
//       precision.safetensors   FP8 delayed-scaling amax histories (empty without them)
//       trainer_state.json      step, tokens seen, model fingerprint, recipe hash, ...
//       recipe.yaml             the effective recipe (makes the directory self-contained)
//   RUN/checkpoints/latest -> step_00000200   (symlink, replaced atomically)
//
// A checkpoint is written into a hidden temporary directory, fsynced, then renamed
// into place; `latest` moves only after that. A process killed at any moment leaves
// the previous complete checkpoint loadable. Sharded state is written by every rank
// into the same staging directory (staging_dir()) before rank 0 completes it.
// Optimizer state is read by element range (OptimizerStateReader), so a run on any
// number of ranks, sharded or not, resumes from either layout.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/nn/module.h>

#include "model/safetensors.h"

namespace brigade::trainer {

inline constexpr int kCheckpointFormatVersion = 1;

struct TrainerState {
  int64_t step = 0;            // optimizer steps completed
  int64_t tokens_seen = 0;     // input tokens processed (all ranks)
  int64_t skipped_steps = 0;   // steps skipped for non-finite values
  std::string model_fingerprint;  // the model section of the recipe; must match to resume
  std::string recipe_hash;        // of the whole effective recipe (informational)
};

// ZeRO-1 optimizer state: which elements of which parameter each shard file holds.
struct OptimizerShard {
  std::string file;  // relative to the step directory
  std::map<std::string, std::pair<int64_t, int64_t>> ranges;  // NAME -> [begin, end) of the flattened parameter
};
struct OptimizerShards {
  std::vector<OptimizerShard> shards;  // one per rank, in rank order
  std::map<std::string, std::vector<int64_t>> shapes;  // every parameter's shape
};
// "optimizer.rank00001-of-00002.safetensors"
std::string optimizer_shard_file(int rank, int ranks);

struct CheckpointData {
  model::NamedTensors model;
  model::NamedTensors optimizer;  // empty when `optimizer_shards` is set
  std::optional<OptimizerShards> optimizer_shards;  // files already in the staging directory
  model::NamedTensors rng;
  model::NamedTensors precision;
  TrainerState state;
  std::string recipe_yaml;
};

// A checkpoint's optimizer state, unsharded or sharded over any number of ranks.
class OptimizerStateReader {
 public:
  OptimizerStateReader() = default;
  // Reads the manifest (sharded) or optimizer.safetensors; shard files are opened
  // when first needed.
  explicit OptimizerStateReader(const std::filesystem::path& step_dir);

  bool sharded() const { return !shard_ranks_.empty(); }
  int shard_count() const { return static_cast<int>(files_.size()); }
  // The parameter's shape; an Error naming the checkpoint when it has no state for it.
  std::vector<int64_t> shape(const std::string& name) const;
  // Elements [begin, begin + length) of the flattened "exp_avg.NAME" or
  // "exp_avg_sq.NAME", assembled from whichever files hold them.
  torch::Tensor read(const std::string& key, int64_t begin, int64_t length) const;
  // "step.NAME": the parameter's step count.
  torch::Tensor step(const std::string& name) const;
  // Every entry as whole tensors (exp_avg.NAME, ..., step.NAME), in name order.
  model::NamedTensors all() const;

 private:
  struct Piece {
    size_t file;
    int64_t begin, end;
  };
  const model::SafetensorsFile& file(size_t index) const;
  const torch::Tensor& tensor(size_t file, const std::string& key) const;

  std::filesystem::path dir_;
  std::vector<std::string> files_;
  std::vector<int> shard_ranks_;  // sharded: the rank of each file
  mutable std::vector<std::shared_ptr<model::SafetensorsFile>> loaded_;
  std::map<std::string, std::vector<Piece>> pieces_;  // NAME -> pieces by begin
  std::map<std::string, std::vector<int64_t>> shapes_;
};

struct LoadedCheckpoint {
  std::filesystem::path dir;
  model::SafetensorsFile model;
  OptimizerStateReader optimizer;
  model::SafetensorsFile rng;
  model::SafetensorsFile precision;
  TrainerState state;
  std::string recipe_yaml;
};

class CheckpointStore {
 public:
  // keep: how many step directories to keep (oldest removed first).
  CheckpointStore(std::filesystem::path dir, int64_t keep);
  // Writes atomically, points `latest` at it, prunes old ones. Returns the step directory.
  std::filesystem::path save(const CheckpointData& data);
  // Sharded checkpoints. staging_dir(): where every rank writes its shard of step
  // `step` (the same path on every rank); prepare_staging() empties it (rank 0,
  // before the others write); save(data, staged) completes and commits it.
  std::filesystem::path staging_dir(int64_t step) const;
  void prepare_staging(const std::filesystem::path& staged) const;
  std::filesystem::path save(const CheckpointData& data, const std::filesystem::path& staged);
  // The step directory `latest` points to, if any.
  std::optional<std::filesystem::path> latest() const;
  // Complete step directories, oldest first.
  std::vector<std::filesystem::path> list() const;
  const std::filesystem::path& dir() const { return dir_; }

 private:
  std::filesystem::path dir_;
  int64_t keep_;
};

// Accepts a step directory, a checkpoints directory or a run directory (following
// `latest`); anything else is an Error naming the path.
std::filesystem::path resolve_checkpoint(const std::filesystem::path& path);

// Reads and validates every file of a step directory.
LoadedCheckpoint load_checkpoint(const std::filesystem::path& step_dir);

// Copies weights into `target` (a model's state_dict(): parameters and training-state
// buffers) by name. A missing, extra or differently shaped tensor is an Error that
// says the checkpoint is from another model.
void load_weights(const model::NamedTensors& target, const model::SafetensorsFile& weights,
                  const std::string& source);

}  // namespace brigade::trainer
