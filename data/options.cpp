#include "data/options.h"

#include "core/error.h"

namespace brigade::data {

std::string to_string(DataSource source) {
  return source == DataSource::kShards ? "shards" : "synthetic";
}

DataSource parse_data_source(const std::string& name) {
  if (name == "synthetic") return DataSource::kSynthetic;
  if (name == "shards") return DataSource::kShards;
  BRIGADE_FAIL("unknown data source '", name, "' (expected synthetic or shards)");
}

}  // namespace brigade::data
