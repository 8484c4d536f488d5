// libFuzzer target: the GGUF parser on arbitrary bytes, then the dequantization of
// every (small enough) tensor it accepts. Any input must parse or throw
// brigade::Error; a crash, another exception or a sanitizer report is a finding.
// Built and run by scripts/fuzz.sh.
#include <cstdint>
#include <span>
#include <vector>

#include "core/error.h"
#include "model/gguf_format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto file = brigade::model::gguf::parse_gguf({data, size}, "fuzz input");
    for (const auto& t : file.tensors) {
      if (t.numel() > (int64_t{1} << 16)) continue;  // the parser checked it fits the file; keep runs fast
      std::vector<float> out(static_cast<size_t>(t.numel()));
      brigade::model::gguf::decode(t.type, {data + file.data_offset + t.offset, t.nbytes}, out);
    }
  } catch (const brigade::Error&) {
  }
  return 0;
}
