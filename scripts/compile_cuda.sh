#!/usr/bin/env bash
# Compile every .cu file under csrc/ with nvcc (sm_80 and sm_90) into a temporary directory.
# Kernels and launchers include CUDA headers only, so no torch or GPU is needed; fails on any error.
# Without nvcc it skips with a message, unless FASTPRUNE_REQUIRE_NVCC=1 (set by .ci/run) makes that an error.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
  [ "${FASTPRUNE_REQUIRE_NVCC:-0}" = 1 ] \
    && { echo "compile_cuda.sh: nvcc not found and FASTPRUNE_REQUIRE_NVCC=1 (set NVCC or put it on PATH)" >&2; exit 1; }
  echo "compile_cuda.sh: nvcc not found: the CUDA compile check is skipped (set NVCC or put it on PATH)" >&2
  exit 0
fi
ARCHS=${CUDA_ARCHS:-"80 90"}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gencode=()
for a in $ARCHS; do gencode+=(-gencode "arch=compute_$a,code=sm_$a"); done
mapfile -t files < <(find csrc -name '*.cu' | sort)
[ "${#files[@]}" -gt 0 ] || { echo "compile_cuda.sh: no .cu files under csrc/" >&2; exit 1; }
for f in "${files[@]}"; do
  out="$tmp/$(echo "$f" | tr / _).o"
  "$NVCC" -std=c++17 -O3 -Icsrc -Werror all-warnings "${gencode[@]}" -c "$f" -o "$out"
  echo "ok  $f (sm ${ARCHS// /, sm })"
done
echo "compile_cuda.sh: ${#files[@]} CUDA file(s) compiled with $("$NVCC" --version | tail -1)"
