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

std::string optimizer_shard_file(int rank, int ranks) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "optimizer.rank%05d-of-%05d.safetensors", rank, ranks);
  return buf;
}

fs::path CheckpointStore::staging_dir(int64_t step) const { return dir_ / (".tmp-" + step_name(step) + "-shards"); }

void CheckpointStore::prepare_staging(const fs::path& staged) const {
  fs::create_directories(dir_);
  fs::remove_all(staged);
  fs::create_directories(staged);
}

fs::path CheckpointStore::save(const CheckpointData& data) {
  const fs::path tmp = dir_ / (".tmp-" + step_name(data.state.step) + "-" + std::to_string(::getpid()));
  prepare_staging(tmp);
  return save(data, tmp);
}

fs::path CheckpointStore::save(const CheckpointData& data, const fs::path& tmp) {
  const std::string name = step_name(data.state.step);
  model::save_safetensors(tmp / "model.safetensors", data.model, {{"format", "pt"}});
  if (data.optimizer_shards) {
    nlohmann::json manifest = {{"format", "brigade-optimizer-shards"}, {"version", 1},
                               {"world_size", data.optimizer_shards->shards.size()},
                               {"shapes", data.optimizer_shards->shapes}, {"shards", nlohmann::json::array()}};
    for (size_t r = 0; r < data.optimizer_shards->shards.size(); ++r) {
      const auto& shard = data.optimizer_shards->shards[r];
      BRIGADE_CHECK(fs::exists(tmp / shard.file), "checkpoint ", tmp.string(), ": rank ", r, " did not write ",
                    shard.file);
      nlohmann::json ranges = nlohmann::json::object();
      for (const auto& [param, range] : shard.ranges) ranges[param] = {range.first, range.second};
      manifest["shards"].push_back({{"rank", r}, {"file", shard.file}, {"ranges", ranges}});
    }
    std::ofstream out(tmp / "optimizer_shards.json");
    out << manifest.dump(1) << "\n";
  } else {
    model::save_safetensors(tmp / "optimizer.safetensors", data.optimizer);
  }
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
  ck.optimizer = OptimizerStateReader(step_dir);
  ck.rng = model::load_safetensors(step_dir / "rng.safetensors");
  // Absent in checkpoints written before FP8 existed: no scaling state then.
  if (fs::exists(step_dir / "precision.safetensors")) ck.precision = model::load_safetensors(step_dir / "precision.safetensors");
  ck.recipe_yaml = read_file(step_dir / "recipe.yaml");
  return ck;
}

// ---------------------------------------------------------------------------------
// Optimizer state by element range.

namespace {

// "exp_avg_sq.NAME" -> ("exp_avg_sq", "NAME")
std::pair<std::string, std::string> split_key(const std::string& key) {
  const auto dot = key.find('.');
  BRIGADE_ASSERT(dot != std::string::npos, "optimizer state key without a kind: ", key);
  return {key.substr(0, dot), key.substr(dot + 1)};
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

}  // namespace

OptimizerStateReader::OptimizerStateReader(const fs::path& step_dir) : dir_(step_dir) {
  const std::string where = "checkpoint " + step_dir.string();
  const fs::path manifest_path = step_dir / "optimizer_shards.json";
  if (!fs::exists(manifest_path)) {
    files_ = {"optimizer.safetensors"};
    loaded_.push_back(std::make_shared<model::SafetensorsFile>(model::load_safetensors(step_dir / files_[0])));
    for (const auto& [key, t] : loaded_[0]->tensors) {
      const auto [kind, param] = split_key(key);
      if (kind != "exp_avg") continue;
      shapes_[param] = t.sizes().vec();
      pieces_[param] = {{0, 0, t.numel()}};
    }
    return;
  }
  const std::string mwhere = where + ": optimizer_shards.json";
  try {
    const auto manifest = nlohmann::json::parse(read_file(manifest_path));
    BRIGADE_CHECK(manifest.at("format").get<std::string>() == "brigade-optimizer-shards" &&
                      manifest.at("version").get<int>() == 1,
                  mwhere, ": unknown format ", manifest.at("format").dump(), " version ", manifest.at("version").dump());
    const int world = manifest.at("world_size").get<int>();
    shapes_ = manifest.at("shapes").get<std::map<std::string, std::vector<int64_t>>>();
    const auto& shards = manifest.at("shards");
    BRIGADE_CHECK(shards.is_array() && static_cast<int>(shards.size()) == world && world > 0, mwhere,
                  ": expected ", world, " shards, found ", shards.size());
    for (const auto& shard : shards) {
      const auto file = shard.at("file").get<std::string>();
      BRIGADE_CHECK(file.find('/') == std::string::npos && fs::exists(step_dir / file), mwhere, ": shard file '",
                    file, "' is missing");
      for (const auto& [param, range] : shard.at("ranges").items()) {
        const int64_t begin = range.at(0).get<int64_t>(), end = range.at(1).get<int64_t>();
        auto shape = shapes_.find(param);
        BRIGADE_CHECK(shape != shapes_.end(), mwhere, ": ", file, " holds '", param, "', which has no shape");
        BRIGADE_CHECK(0 <= begin && begin < end && end <= numel_of(shape->second), mwhere, ": ", file,
                      " holds elements [", begin, ", ", end, ") of '", param, "', which has ",
                      numel_of(shape->second));
        pieces_[param].push_back({files_.size(), begin, end});
      }
      files_.push_back(file);
      shard_ranks_.push_back(shard.at("rank").get<int>());
    }
  } catch (const nlohmann::json::exception& e) {
    BRIGADE_FAIL(mwhere, ": ", e.what());
  }
  loaded_.resize(files_.size());
  // Every element of every parameter in exactly one shard.
  for (auto& [param, pieces] : pieces_) {
    std::sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) { return a.begin < b.begin; });
    int64_t next = 0;
    for (const auto& piece : pieces) {
      BRIGADE_CHECK(piece.begin == next, mwhere, ": elements [", std::min(next, piece.begin), ", ",
                    std::max(next, piece.begin), ") of '", param, "' are ",
                    piece.begin > next ? "in no shard" : "in two shards");
      next = piece.end;
    }
    BRIGADE_CHECK(next == numel_of(shapes_.at(param)), mwhere, ": elements [", next, ", ",
                  numel_of(shapes_.at(param)), ") of '", param, "' are in no shard");
  }
  for (const auto& [param, shape] : shapes_) {
    BRIGADE_CHECK(pieces_.contains(param) || numel_of(shape) == 0, mwhere, ": '", param, "' is in no shard");
  }
}

const model::SafetensorsFile& OptimizerStateReader::file(size_t index) const {
  if (!loaded_[index]) {
    loaded_[index] = std::make_shared<model::SafetensorsFile>(model::load_safetensors(dir_ / files_[index]));
  }
  return *loaded_[index];
}

const torch::Tensor& OptimizerStateReader::tensor(size_t index, const std::string& key) const {
  const auto& f = file(index);
  auto it = f.tensors.find(key);
  BRIGADE_CHECK(it != f.tensors.end(), "checkpoint ", (dir_ / files_[index]).string(), ": no tensor '", key, "'");
  return it->second;
}

std::vector<int64_t> OptimizerStateReader::shape(const std::string& name) const {
  auto it = shapes_.find(name);
  BRIGADE_CHECK(it != shapes_.end(), "checkpoint ", dir_.string(), ": optimizer state has no 'exp_avg.", name, "'");
  return it->second;
}

torch::Tensor OptimizerStateReader::read(const std::string& key, int64_t begin, int64_t length) const {
  const auto [kind, param] = split_key(key);
  const int64_t total = numel_of(shape(param)), end = begin + length;
  BRIGADE_ASSERT(0 <= begin && end <= total, "range [", begin, ", ", end, ") of ", key, " outside ", total);
  torch::Tensor out;
  for (const auto& piece : pieces_.at(param)) {
    const int64_t a = std::max(begin, piece.begin), z = std::min(end, piece.end);
    if (a >= z) continue;
    const auto& t = tensor(piece.file, key);
    BRIGADE_CHECK(t.numel() == piece.end - piece.begin, "checkpoint ", (dir_ / files_[piece.file]).string(),
                  ": '", key, "' has ", t.numel(), " elements, the manifest says ", piece.end - piece.begin);
    if (!out.defined()) out = torch::empty({length}, t.options());
    out.narrow(0, a - begin, z - a).copy_(t.reshape({-1}).narrow(0, a - piece.begin, z - a));
  }
  if (!out.defined()) out = torch::empty({0}, torch::kFloat);  // length 0
  return out;
}

torch::Tensor OptimizerStateReader::step(const std::string& name) const {
  shape(name);
  const auto& pieces = pieces_.at(name);
  BRIGADE_CHECK(!pieces.empty(), "checkpoint ", dir_.string(), ": no step count for '", name, "'");
  return tensor(pieces.front().file, "step." + name);
}

model::NamedTensors OptimizerStateReader::all() const {
  model::NamedTensors out;
  for (const auto& [name, shape] : shapes_) {
    const int64_t n = numel_of(shape);
    out.emplace_back("exp_avg." + name, read("exp_avg." + name, 0, n).view(shape));
    out.emplace_back("exp_avg_sq." + name, read("exp_avg_sq." + name, 0, n).view(shape));
    out.emplace_back("step." + name, step(name));
  }
  return out;
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
