// libFuzzer target: the GGUF parser on arbitrary bytes. Any input must parse or
// throw brigade::Error; a crash, another exception or a sanitizer report is a
// finding. Built and run by scripts/fuzz.sh.
#include <cstdint>
#include <span>

#include "core/error.h"
#include "model/gguf_format.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    brigade::model::gguf::parse_gguf({data, size}, "fuzz input");
  } catch (const brigade::Error&) {
  }
  return 0;
}
