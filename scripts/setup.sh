#!/usr/bin/env bash
# Installs what brigade needs (Debian packages, a project-local Python venv with
# LibTorch from PyPI) and builds it into build/. Idempotent: a second run only
# rebuilds what changed.
#
#   scripts/setup.sh [make targets...]     (default target: brigade)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TORCH_VERSION=2.11.0
JOBS=${JOBS:-$(nproc)}

step() { printf '\n==> %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

# Building the tests or benchmarks also needs the reference tools they compare
# against (clang's libFuzzer, llama.cpp, headless Chromium for the report test); the
# demo alone does not.
FOR_TESTS=0
for t in "$@"; do
  case "$t" in brigade_tests|bench_*) FOR_TESTS=1 ;; esac
done

# 1. Debian packages ------------------------------------------------------------
PACKAGES=(build-essential cmake ccache git pkg-config libopenmpi-dev openmpi-bin libyaml-cpp-dev
          libgtest-dev libcli11-dev nlohmann-json3-dev libcurl4-openssl-dev libcpp-httplib-dev libpcre2-dev libutf8proc-dev python3 python3-venv)
[ "$FOR_TESTS" = 1 ] && PACKAGES+=(clang libclang-rt-dev chromium)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# A python3 that can already make venvs (pyenv, say) does not need Debian's.
if python3 -m venv --help >/dev/null 2>&1; then
  missing=("${missing[@]/python3-venv}"); missing=("${missing[@]/python3}")
fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
if [ ${#missing[@]} -gt 0 ]; then
  step "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
else
  step "Debian packages: all present"
fi

# 2. Python venv with LibTorch ----------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  step "creating the project venv (.venv)"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  step "installing torch==$TORCH_VERSION into .venv (LibTorch for the C++ build; a large download)"
  .venv/bin/pip install --progress-bar on "torch==$TORCH_VERSION" numpy
else
  step "torch $TORCH_VERSION: present in .venv"
fi
# Independent implementations the tests and benchmarks compare against (pinned:
# the MoE parity test relies on transformers 5's DeepSeek-V3 weight layout;
# tensorboard's event reader checks brigade's event files).
PY_TOOLS=("transformers==5.23.0" "safetensors==0.8.0" "tokenizers==0.23.3" "gguf==0.19.0" "tensorboard==2.20.0" "sentencepiece==0.2.3")
if ! .venv/bin/python -c "
import sys, importlib.metadata as m
want = dict(s.split('==') for s in sys.argv[1:])
sys.exit(0 if all(m.version(k) == v for k, v in want.items()) else 1)" "${PY_TOOLS[@]}" 2>/dev/null; then
  step "installing ${PY_TOOLS[*]} into .venv (reference implementations for tests and benchmarks)"
  .venv/bin/pip install --progress-bar on "${PY_TOOLS[@]}"
else
  step "${PY_TOOLS[*]}: present in .venv"
fi
# llama.cpp's Python binding runs brigade's GGUF exports in the tests. PyPI has only
# its source: pip compiles llama.cpp for this CPU (about 5 minutes on 2 cores, once;
# pip keeps the wheel in its cache).
# Its OpenAI-compatible server (the [server] extra) is a remote teacher in the tests.
LLAMA_CPP="llama-cpp-python[server]==0.3.36"
if [ "$FOR_TESTS" != 1 ]; then
  : # the demo does not run llama.cpp
elif ! .venv/bin/python -c "import importlib.metadata as m, sys, llama_cpp.server.app; sys.exit(0 if m.version('llama_cpp_python') == '${LLAMA_CPP#*==}' else 1)" 2>/dev/null; then
  step "building $LLAMA_CPP into .venv (llama.cpp, the reference GGUF runtime for the tests)"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    .venv/bin/pip install --progress-bar on "$LLAMA_CPP"
else
  step "$LLAMA_CPP: present in .venv"
fi

# 3. Configure and build ----------------------------------------------------------
if [ ! -f build/CMakeCache.txt ]; then
  step "configuring (build/)"
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release
fi
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(brigade)
step "building ${TARGETS[*]} with $JOBS jobs"
cmake --build build -j "$JOBS" --target "${TARGETS[@]}"
