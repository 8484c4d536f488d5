#!/usr/bin/env bash
# The README's main command: installs and builds what is missing, then runs
# `brigade demo` (trains recipes/tiny-dense.yaml, prints sample generations).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh brigade
printf '\n==> brigade demo\n'
exec build/brigade demo "$@"
