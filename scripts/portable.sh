#!/usr/bin/env bash
# The numeric part of the suite (equivalence, parity, oracle and FP8 tests) under
# CPU code paths other than the ones this machine picks by default: LibTorch's
# kernels for another vector width (ATEN_CPU_CAPABILITY), MKL's other GEMM code
# paths (MKL_CBWR) and two OpenMP threads. A bound that holds only on the CPU it
# was measured on fails here instead of on a user's machine.
#
#   scripts/portable.sh          every configuration below (scripts/test.sh --portable)
#   scripts/portable.sh ci       one: ATEN_CPU_CAPABILITY=default with MKL_CBWR=SSE4_2 (.ci/run)
#   scripts/portable.sh VAR=VALUE ...   one configuration of your own
#
# Needs a build with the tests (scripts/test.sh builds it).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=build/tests/brigade_tests
[ -x "$BIN" ] || { echo "portable.sh: $BIN is missing; run scripts/test.sh first" >&2; exit 1; }

# The numeric subset, by test suite: gradient/weight equivalences, parity with
# transformers / llama.cpp / float64 references, FP8 gaps, KD losses.
FILTER='ModelTransformer.*:Model/ModelReference.*:ModelKVCache.*:HfCheckpoint.*:Families/*:GgufQuant.*:GgufMoe.*'
FILTER+=':GgufExport.*:GgufImportRecipe.*:GgufLlamaCpp.*:GenerateSample.*:GenerateLoop.*:Fp8*:Formats/*'
FILTER+=':MoE*:ExpertParallel.*:TrainerTest.*:AdamWTest.*:DistillKd*:PairwiseSum.*:MicroBatchGradients.*'
FILTER+=':BlockSquares.*:SquareNorm.*:CliExport.*'
FILTER+=':*Mla*:*Mtp*:GgufDeepseek2.*:GgufRopeScaling.*:GgufTokenizer.*:GgufImport.*:Plan.*'
FILTER+=':DistillOnPolicy.*:DistillUld.*:GgufKQuant*:GgufSentencePiece.*'

MPIRUN=(mpirun --oversubscribe)
[ "$(id -u)" -eq 0 ] && MPIRUN+=(--allow-run-as-root)

failed=()
# run LABEL VAR=VALUE...: the subset in one process, then the multi-rank tests on 2 and 4 ranks.
run() {
  local label=$1; shift
  printf '\n==> portable: %s\n' "$label"
  local vars=(OMP_NUM_THREADS=1 "$@") forward=()
  for v in "${vars[@]}"; do forward+=(-x "${v%%=*}"); done
  if ! env "${vars[@]}" "$BIN" --gtest_filter="$FILTER" --gtest_brief=1; then failed+=("$label"); fi
  for np in 2 4; do
    if ! env "${vars[@]}" "${MPIRUN[@]}" "${forward[@]}" -np "$np" "$BIN" --gtest_filter='Mpi*' --gtest_brief=1 \
        > "build/portable-mpi.log" 2>&1; then
      tail -40 build/portable-mpi.log
      failed+=("$label, $np ranks")
    fi
  done
}

case "${1:-all}" in
  all)
    run "ATEN_CPU_CAPABILITY=default" ATEN_CPU_CAPABILITY=default
    run "ATEN_CPU_CAPABILITY=avx2" ATEN_CPU_CAPABILITY=avx2
    if grep -qw avx512f /proc/cpuinfo; then run "ATEN_CPU_CAPABILITY=avx512" ATEN_CPU_CAPABILITY=avx512; fi
    for path in COMPATIBLE SSE4_2 AVX AVX2; do run "MKL_CBWR=$path" MKL_CBWR=$path; done
    run "OMP_NUM_THREADS=2" OMP_NUM_THREADS=2
    ;;
  ci) run "ATEN_CPU_CAPABILITY=default MKL_CBWR=SSE4_2" ATEN_CPU_CAPABILITY=default MKL_CBWR=SSE4_2 ;;
  *) run "$*" "$@" ;;
esac

if [ ${#failed[@]} -gt 0 ]; then
  printf '\nportable.sh: failed under: %s\n' "${failed[@]}" >&2
  exit 1
fi
printf '\nportable.sh: every configuration passed\n'
