#!/usr/bin/env bash
# Fuzzes the safetensors and GGUF parsers with libFuzzer (clang, AddressSanitizer,
# UBSan) for SECONDS each (default 60). Seeds come from small valid files written
# here; findings are saved under build/fuzz/ and fail the script.
#
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
CXX="${FUZZ_CXX:-clang++}"
if ! command -v "$CXX" >/dev/null; then
  echo "fuzz: $CXX not found (apt-get install clang)" >&2
  exit 1
fi
out=build/fuzz
mkdir -p "$out"
flags=(-std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I.)
build() {  # name sources...
  local name=$1; shift
  local bin="$out/$name"
  if [ ! -x "$bin" ] || [ -n "$(find "$@" -newer "$bin" 2>/dev/null)" ]; then
    echo "fuzz: building $name"
    "$CXX" "${flags[@]}" "$@" -o "$bin"
  fi
}
build safetensors_fuzz tests/fuzz/safetensors_fuzz.cpp model/safetensors_format.cpp core/error.cpp
build gguf_fuzz tests/fuzz/gguf_fuzz.cpp model/gguf_format.cpp model/gguf_quants.cpp model/gguf_kquants.cpp core/error.cpp

# Seeds: valid files the fuzzer mutates from.
seeds="$out/seeds"
mkdir -p "$seeds/safetensors" "$seeds/gguf"
python3 - "$seeds" <<'PY'
import json, struct, sys
d = sys.argv[1]
header = json.dumps({"__metadata__": {"format": "pt"},
                     "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                     "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}}).encode()
open(f"{d}/safetensors/seed", "wb").write(struct.pack("<Q", len(header)) + header + bytes(22))
def s(x): b = x.encode(); return struct.pack("<Q", len(b)) + b
kv = s("general.architecture") + struct.pack("<I", 8) + s("llama")
kv += s("general.alignment") + struct.pack("<I", 4) + struct.pack("<I", 32)
kv += s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + s("a") + s("b")
ti = s("t") + struct.pack("<I", 2) + struct.pack("<qq", 32, 2) + struct.pack("<I", 8) + struct.pack("<Q", 0)
body = b"GGUF" + struct.pack("<IQQ", 3, 1, 3) + kv + ti
body += bytes((-len(body)) % 32) + bytes(68)
open(f"{d}/gguf/seed", "wb").write(body)
PY

status=0
for name in safetensors gguf; do
  mkdir -p "$out/corpus_$name"
  echo "fuzz: $name for ${seconds}s"
  if ! "$out/${name}_fuzz" -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=1024 -print_final_stats=1 \
       -artifact_prefix="$out/${name}_" "$out/corpus_$name" "$seeds/$name" > "$out/$name.log" 2>&1; then
    echo "fuzz: $name FAILED (see $out/$name.log)" >&2
    tail -30 "$out/$name.log" >&2
    status=1
  else
    grep -E "stat::number_of_executed_units|cov:" "$out/$name.log" | tail -2
  fi
done
exit $status
