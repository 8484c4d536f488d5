// ZeRO-1 optimizer state on disk: OptimizerStateReader assembles any element range
// from the shard files the manifest lists, and rejects manifests that lose or
// double-count elements, name missing files or point past a parameter's end.
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "tests/testing.h"
#include "trainer/checkpoint.h"

namespace brigade {
namespace {

using testing::TempDir;

// Parameter "w" [2, 3] (exp_avg = 0..5, exp_avg_sq = 10..15) split at `cut` over two
// shard files; "b" [2] entirely in the second.
void write_shards(const std::filesystem::path& dir, int64_t cut, nlohmann::json ranges0, nlohmann::json ranges1) {
  std::filesystem::create_directories(dir);
  auto m = torch::arange(6, torch::kFloat), v = torch::arange(10, 16, torch::kFloat);
  auto step = torch::full({}, 7.0f);
  model::save_safetensors(dir / "optimizer.rank00000-of-00002.safetensors",
                          {{"exp_avg.w", m.narrow(0, 0, cut)}, {"exp_avg_sq.w", v.narrow(0, 0, cut)}, {"step.w", step}});
  model::save_safetensors(dir / "optimizer.rank00001-of-00002.safetensors",
                          {{"exp_avg.w", m.narrow(0, cut, 6 - cut)}, {"exp_avg_sq.w", v.narrow(0, cut, 6 - cut)},
                           {"step.w", step}, {"exp_avg.b", torch::ones({2})}, {"exp_avg_sq.b", torch::ones({2})},
                           {"step.b", step}});
  nlohmann::json manifest = {
      {"format", "brigade-optimizer-shards"}, {"version", 1}, {"world_size", 2},
      {"shapes", {{"w", {2, 3}}, {"b", {2}}}},
      {"shards", {{{"rank", 0}, {"file", "optimizer.rank00000-of-00002.safetensors"}, {"ranges", ranges0}},
                  {{"rank", 1}, {"file", "optimizer.rank00001-of-00002.safetensors"}, {"ranges", ranges1}}}}};
  std::ofstream(dir / "optimizer_shards.json") << manifest.dump();
}

TEST(OptimizerShards, ReadsAnyRangeAcrossShardFiles) {
  TempDir dir;
  write_shards(dir.path(), 4, {{"w", {0, 4}}}, {{"w", {4, 6}}, {"b", {0, 2}}});
  trainer::OptimizerStateReader reader(dir.path());
  EXPECT_TRUE(reader.sharded());
  EXPECT_EQ(reader.shard_count(), 2);
  EXPECT_EQ(reader.shape("w"), (std::vector<int64_t>{2, 3}));
  EXPECT_TRUE(torch::equal(reader.read("exp_avg.w", 2, 3), torch::tensor({2.0f, 3.0f, 4.0f})));
  EXPECT_TRUE(torch::equal(reader.read("exp_avg_sq.w", 3, 3), torch::tensor({13.0f, 14.0f, 15.0f})));
  EXPECT_EQ(reader.step("w").item<float>(), 7.0f);
  const auto all = reader.all();
  ASSERT_EQ(all.size(), 6u);  // b, w: exp_avg, exp_avg_sq, step each
  EXPECT_EQ(all[3].first, "exp_avg.w");
  EXPECT_TRUE(torch::equal(all[3].second, torch::arange(6, torch::kFloat).view({2, 3})));
  EXPECT_BRIGADE_ERROR(reader.shape("missing"), "optimizer state has no 'exp_avg.missing'");
}

TEST(OptimizerShards, RejectsManifestsThatLoseOrRepeatElements) {
  TempDir dir;
  write_shards(dir / "gap", 4, {{"w", {0, 3}}}, {{"w", {4, 6}}, {"b", {0, 2}}});
  EXPECT_BRIGADE_ERROR(trainer::OptimizerStateReader(dir / "gap"), "elements [3, 4) of 'w' are in no shard");
  write_shards(dir / "overlap", 4, {{"w", {0, 5}}}, {{"w", {4, 6}}, {"b", {0, 2}}});
  EXPECT_BRIGADE_ERROR(trainer::OptimizerStateReader(dir / "overlap"), "of 'w' are in two shards");
  write_shards(dir / "short", 4, {{"w", {0, 4}}}, {{"w", {4, 6}}});
  EXPECT_BRIGADE_ERROR(trainer::OptimizerStateReader(dir / "short"), "'b' is in no shard");
  write_shards(dir / "past", 4, {{"w", {0, 4}}}, {{"w", {4, 9}}, {"b", {0, 2}}});
  EXPECT_BRIGADE_ERROR(trainer::OptimizerStateReader(dir / "past"), "holds elements [4, 9) of 'w', which has 6");
  write_shards(dir / "missing", 4, {{"w", {0, 4}}}, {{"w", {4, 6}}, {"b", {0, 2}}});
  std::filesystem::remove(dir / "missing" / "optimizer.rank00001-of-00002.safetensors");
  EXPECT_BRIGADE_ERROR(trainer::OptimizerStateReader(dir / "missing"),
                       "shard file 'optimizer.rank00001-of-00002.safetensors' is missing");
  write_shards(dir / "json", 4, {{"w", {0, 4}}}, {{"w", {4, 6}}, {"b", {0, 2}}});
  std::ofstream(dir / "json" / "optimizer_shards.json") << "{\"format\": ";
  EXPECT_BRIGADE_ERROR(trainer::OptimizerStateReader(dir / "json"), "optimizer_shards.json");
  // The manifest and the file disagree on a piece's size: found when it is read.
  write_shards(dir / "size", 3, {{"w", {0, 4}}}, {{"w", {4, 6}}, {"b", {0, 2}}});
  trainer::OptimizerStateReader size_reader(dir / "size");
  EXPECT_BRIGADE_ERROR(size_reader.read("exp_avg.w", 0, 6), "'exp_avg.w' has 3 elements, the manifest says 4");
}

}  // namespace
}  // namespace brigade
