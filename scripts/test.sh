#!/usr/bin/env bash
# The README's test command: installs what is missing, builds everything, runs the
# whole suite (unit, e2e, recipe/format checks) through CTest.
#
#   scripts/test.sh [--portable] [ctest arguments...]
#
# --portable: afterwards, the numeric tests again under the other CPU code paths
# (ATen capabilities, MKL code paths, two threads; scripts/portable.sh), so a
# bound that holds only on this CPU fails here.
set -euo pipefail
cd "$(dirname "$0")/.."
PORTABLE=0
if [ "${1:-}" = "--portable" ]; then PORTABLE=1; shift; fi
scripts/setup.sh brigade brigade_tests bench_train_step
printf '\n==> running the tests\n'
ctest --test-dir build --output-on-failure -j "${JOBS:-$(nproc)}" "$@"
if [ "$PORTABLE" = 1 ]; then scripts/portable.sh all; fi
