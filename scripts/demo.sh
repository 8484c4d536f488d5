#!/usr/bin/env bash
# The README's main command: installs and builds what is missing, then runs
# `brigade demo` (the distillation pipeline of recipes/distill-arith.yaml end to end:
# MoE teacher, verified traces, dense student, teacher/student pass@k table).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh brigade
printf '\n==> brigade demo\n'
exec build/brigade demo "$@"
