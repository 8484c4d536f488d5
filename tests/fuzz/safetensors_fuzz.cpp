// libFuzzer target: the safetensors header parser on arbitrary bytes. Any input
// must either parse (and then every range lies inside the input) or throw
// brigade::Error; anything else (a crash, another exception, a sanitizer report)
// is a finding. Built and run by scripts/fuzz.sh.
#include <cstdint>
#include <cstdlib>
#include <span>

#include "core/error.h"
#include "model/safetensors_format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto header = brigade::model::parse_safetensors_header({data, size}, "fuzz input");
    for (const auto& t : header.tensors)
      if (header.data_begin + t.end > size) std::abort();  // the parser promised in-bounds ranges
  } catch (const brigade::Error&) {
  }
  return 0;
}
