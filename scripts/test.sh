#!/usr/bin/env bash
# The README's test command: installs what is missing, builds everything, runs the
# whole suite (unit, e2e, recipe/format checks) through CTest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh brigade brigade_tests bench_train_step
printf '\n==> running the tests\n'
ctest --test-dir build --output-on-failure -j "${JOBS:-$(nproc)}" "$@"
