// Checkpoints (DESIGN.md contract):
//
//   RUN/checkpoints/step_00000200/
//       model.safetensors       FP32 master weights, Hugging Face-style names
//       optimizer.safetensors   AdamW state: exp_avg.NAME, exp_avg_sq.NAME, step.NAME
//       rng.safetensors         RNG states (cpu)
//       precision.safetensors   FP8 delayed-scaling amax histories (empty without them)
//       trainer_state.json      step, tokens seen, model fingerprint, recipe hash, ...
//       recipe.yaml             the effective recipe (makes the directory self-contained)
//   RUN/checkpoints/latest -> step_00000200   (symlink, replaced atomically)
//
// A checkpoint is written into a hidden temporary directory, fsynced, then renamed
// into place; `latest` moves only after that. A process killed at any moment leaves
// the previous complete checkpoint loadable.
#pragma once

#include <cstdint>
#include <filesystem>
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

struct CheckpointData {
  model::NamedTensors model;
  model::NamedTensors optimizer;
  model::NamedTensors rng;
  model::NamedTensors precision;
  TrainerState state;
  std::string recipe_yaml;
};

struct LoadedCheckpoint {
  std::filesystem::path dir;
  model::SafetensorsFile model;
  model::SafetensorsFile optimizer;
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
