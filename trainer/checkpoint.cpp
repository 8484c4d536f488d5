#include "trainer/checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "core/log.h"

namespace brigade::trainer {
namespace fs = std::filesystem;
namespace {

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

bool is_step_dir(const fs::path& p) {
  const auto name = p.filename().string();
  return name.rfind("step_", 0) == 0 && fs::is_directory(p) && fs::exists(p / "trainer_state.json");
}

void fsync_file(const fs::path& p) {
  std::FILE* f = std::fopen(p.c_str(), "rb");
  if (!f) return;
  ::fsync(fileno(f));
  std::fclose(f);
}

}  // namespace

CheckpointStore::CheckpointStore(fs::path dir, int64_t keep) : dir_(std::move(dir)), keep_(keep) {
  BRIGADE_CHECK(keep_ > 0, "keep_checkpoints must be positive");
}

std::vector<fs::path> CheckpointStore::list() const {
  std::vector<fs::path> out;
  if (!fs::exists(dir_)) return out;
  for (const auto& entry : fs::directory_iterator(dir_)) {
    if (is_step_dir(entry.path())) out.push_back(entry.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::optional<fs::path> CheckpointStore::latest() const {
  fs::path link = dir_ / "latest";
  if (!fs::is_symlink(link)) return std::nullopt;
  fs::path target = dir_ / fs::read_symlink(link);
  if (!is_step_dir(target)) return std::nullopt;
  return target;
}

fs::path CheckpointStore::save(const CheckpointData& data) {
  fs::create_directories(dir_);
  const std::string name = step_name(data.state.step);
  const fs::path tmp = dir_ / (".tmp-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);

  model::save_safetensors(tmp / "model.safetensors", data.model, {{"format", "pt"}});
  model::save_safetensors(tmp / "optimizer.safetensors", data.optimizer);
  model::save_safetensors(tmp / "rng.safetensors", data.rng);
  model::save_safetensors(tmp / "precision.safetensors", data.precision);
  nlohmann::json state = {
      {"format_version", kCheckpointFormatVersion},
      {"step", data.state.step},
      {"tokens_seen", data.state.tokens_seen},
      {"skipped_steps", data.state.skipped_steps},
      {"model_fingerprint", data.state.model_fingerprint},
      {"recipe_hash", data.state.recipe_hash},
  };
  {
    std::ofstream out(tmp / "trainer_state.json");
    out << state.dump(2) << "\n";
  }
  {
    std::ofstream out(tmp / "recipe.yaml");
    out << data.recipe_yaml;
  }
  for (const auto& entry : fs::directory_iterator(tmp)) fsync_file(entry.path());
  fsync_dir(tmp);

  // Move into place. A directory of the same step (re-saved after a resume) is moved
  // aside first, so some complete copy exists at every moment.
  const fs::path final_dir = dir_ / name;
  const fs::path old_dir = dir_ / (".old-" + name + "-" + std::to_string(::getpid()));
  const bool replacing = fs::exists(final_dir);
  if (replacing) fs::rename(final_dir, old_dir);
  fs::rename(tmp, final_dir);
  fsync_dir(dir_);

  // Swing `latest` with a rename, which is atomic, rather than unlink + symlink.
  const fs::path link_tmp = dir_ / (".latest-" + std::to_string(::getpid()));
  fs::remove(link_tmp);
  fs::create_directory_symlink(name, link_tmp);
  fs::rename(link_tmp, dir_ / "latest");
  fsync_dir(dir_);
  if (replacing) fs::remove_all(old_dir);

  // Prune: oldest first, never the one just written.
  auto all = list();
  int64_t excess = static_cast<int64_t>(all.size()) - keep_;
  for (int64_t i = 0; i < excess; ++i) {
    if (all[i] != final_dir) fs::remove_all(all[i]);
  }
  // Leftovers of processes killed mid-write.
  for (const auto& entry : fs::directory_iterator(dir_)) {
    const auto fname = entry.path().filename().string();
    if ((fname.rfind(".tmp-", 0) == 0 || fname.rfind(".old-", 0) == 0) && entry.path() != tmp) {
      std::error_code ec;
      fs::remove_all(entry.path(), ec);
    }
  }
  return final_dir;
}

fs::path resolve_checkpoint(const fs::path& path) {
  BRIGADE_CHECK(fs::exists(path), "checkpoint not found: ", path.string());
  if (is_step_dir(path)) return path;
  for (const fs::path& candidate : {path / "latest", path / "checkpoints" / "latest"}) {
    if (fs::is_symlink(candidate) || fs::exists(candidate)) {
      fs::path target = candidate.parent_path() / fs::read_symlink(candidate);
      BRIGADE_CHECK(is_step_dir(target), "checkpoint link ", candidate.string(), " points to ",
                    target.string(), ", which is not a complete checkpoint");
      return target;
    }
  }
  BRIGADE_FAIL(path.string(), " is not a checkpoint: expected a step directory with trainer_state.json, "
               "or a run/checkpoints directory with a 'latest' link");
}

LoadedCheckpoint load_checkpoint(const fs::path& step_dir) {
  LoadedCheckpoint ck;
  ck.dir = step_dir;
  const std::string where = "checkpoint " + step_dir.string();
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(read_file(step_dir / "trainer_state.json"));
  } catch (const nlohmann::json::exception& e) {
    BRIGADE_FAIL(where, ": trainer_state.json is not valid JSON: ", e.what());
  }
  try {
    BRIGADE_CHECK(state.at("format_version").get<int>() == kCheckpointFormatVersion, where,
                  ": unsupported format_version ", state.at("format_version").dump());
    ck.state.step = state.at("step").get<int64_t>();
    ck.state.tokens_seen = state.at("tokens_seen").get<int64_t>();
    ck.state.skipped_steps = state.at("skipped_steps").get<int64_t>();
    ck.state.model_fingerprint = state.at("model_fingerprint").get<std::string>();
    ck.state.recipe_hash = state.at("recipe_hash").get<std::string>();
  } catch (const nlohmann::json::exception& e) {
    BRIGADE_FAIL(where, ": trainer_state.json: ", e.what());
  }
  ck.model = model::load_safetensors(step_dir / "model.safetensors");
  ck.optimizer = model::load_safetensors(step_dir / "optimizer.safetensors");
  ck.rng = model::load_safetensors(step_dir / "rng.safetensors");
  // Absent in checkpoints written before FP8 existed: no scaling state then.
  if (fs::exists(step_dir / "precision.safetensors")) ck.precision = model::load_safetensors(step_dir / "precision.safetensors");
  ck.recipe_yaml = read_file(step_dir / "recipe.yaml");
  return ck;
}

void load_weights(const model::NamedTensors& target, const model::SafetensorsFile& weights,
                  const std::string& source) {
  torch::NoGradGuard no_grad;
  std::set<std::string> expected;
  for (const auto& [name, tensor] : target) {
    expected.insert(name);
    auto it = weights.tensors.find(name);
    BRIGADE_CHECK(it != weights.tensors.end(), source, ": no tensor '", name,
                  "'; the checkpoint is from a different model shape");
    BRIGADE_CHECK(it->second.sizes() == tensor.sizes(), source, ": tensor '", name, "' has shape ",
                  it->second.sizes(), " but the model expects ", tensor.sizes(),
                  "; the checkpoint is from a different model shape");
  }
  for (const auto& [name, tensor] : weights.tensors) {
    BRIGADE_CHECK(expected.contains(name), source, ": unexpected tensor '", name,
                  "'; the checkpoint is from a different model shape");
  }
  // Copy only after every check passed, so a rejected checkpoint leaves the model as it was.
  for (const auto& [name, tensor] : target) tensor.copy_(weights.tensors.at(name));
}

}  // namespace brigade::trainer
