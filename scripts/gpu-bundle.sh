#!/usr/bin/env bash
# Packs what a GPU machine needs to run scripts/gpu-check.sh: brigade, the test
# binary and the GPU benchmarks built here for Hopper (sm_90), plus the shared
# libraries a CUDA/PyTorch image usually lacks (yaml-cpp, Open MPI and its helpers,
# curl, pcre2, utf8proc, ...). LibTorch, CUDA and NCCL are not packed: the GPU
# machine's PyTorch wheel brings them, and gpu-check.sh finds them there.
#
#   scripts/gpu-bundle.sh [DIR]      (default .gpu-bundle, git-ignored)
#
# Prints the bundle's size and fails above 60 MiB (what a device call can carry
# beside the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.gpu-bundle}
LIMIT_MIB=60
BINARIES=(brigade tests/brigade_tests bench/bench_train_step bench/bench_fp8_gemm bench/bench_cross_entropy)

scripts/setup.sh brigade brigade_tests bench_train_step bench_fp8_gemm bench_cross_entropy
# The CUDA flags CMake compiled brigade's kernels with (cmake/Dependencies.cmake).
arch=$(grep -ho 'arch=compute_[0-9a-z]*,code=sm_[0-9a-z]*' build/CMakeFiles/brigade_core.dir/flags.make 2>/dev/null | sort -u | tr '\n' ' ')
case "$arch" in
  *code=sm_90*) ;;
  *) echo "gpu-bundle: build/ compiles CUDA for '${arch:-nothing}', not sm_90 (a CUDA toolkit in /usr/local/cuda, CMAKE_CUDA_ARCHITECTURES=90)" >&2; exit 1 ;;
esac

rm -rf "$DIR"
mkdir -p "$DIR/bin" "$DIR/lib"
for b in "${BINARIES[@]}"; do
  [ -x "build/$b" ] || { echo "gpu-bundle: build/$b was not built" >&2; exit 1; }
  strip --strip-unneeded -o "$DIR/bin/$(basename "$b")" "build/$b"
done

# Every shared library the binaries load, except the C runtime (every image has
# it) and what the GPU image's PyTorch wheel provides (LibTorch, CUDA, NCCL, cuDNN).
provided='^(libc|libm|libdl|librt|libpthread|ld-linux.*|libstdc\+\+|libgcc_s|libutil|libresolv)\.so'
from_wheel='^(libtorch.*|libc10.*|libgomp.*|libcu.*|libnccl|libnv.*|libcudnn.*|libshm|libcaffe2.*)\.so'
for b in "$DIR"/bin/*; do
  ldd "$b" | awk '/=> \// {print $1, $3}'
done | sort -u | while read -r name path; do
  if [[ "$name" =~ $provided || "$name" =~ $from_wheel ]]; then continue; fi
  cp -L "$path" "$DIR/lib/$name"
done
# Open MPI loads its components and help texts at run time (only multi-rank runs
# start MPI; a one-GPU check never does, so they are not packed).

cat > "$DIR/MANIFEST" <<EOF
built $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD)$(git diff --quiet || echo "+changes")
cuda architectures: $arch
torch (LibTorch ABI the binaries need): $(.venv/bin/python -c 'import torch; print(torch.__version__)')
EOF
ls "$DIR/lib" >> "$DIR/MANIFEST"
# What travels to the GPU machine is the xz archive (a device run carries 64 MiB
# at most); gpu-check.sh unpacks it there. The directory stays for local runs.
ARCHIVE="$DIR.tar.xz"
tar -cJf "$ARCHIVE.tmp" -C "$(dirname "$DIR")" "$(basename "$DIR")" && mv "$ARCHIVE.tmp" "$ARCHIVE"
dir_mib=$(( ($(du -sk "$DIR" | cut -f1) + 1023) / 1024 ))
size_mib=$(( ($(du -sk "$ARCHIVE" | cut -f1) + 1023) / 1024 ))
echo "gpu-bundle: $DIR holds ${#BINARIES[@]} binaries and $(ls "$DIR/lib" | wc -l) libraries, ${dir_mib} MiB; $ARCHIVE ${size_mib} MiB (limit ${LIMIT_MIB} MiB)"
[ "$size_mib" -le "$LIMIT_MIB" ] || { echo "gpu-bundle: $ARCHIVE is over ${LIMIT_MIB} MiB" >&2; exit 1; }
