#!/usr/bin/env bash
# Compile every .cu file under csrc/ with nvcc (sm_80 and sm_90) into a temporary directory, then check
# the C++ glue of the CUDA build with g++ -fsyntax-only (below).  Kernels and launchers include CUDA
# headers only; the glue needs torch's headers (a CPU wheel has them); no GPU is needed; fails on any error.
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

# The C++ glue only a CUDA build compiles (csrc/cuda/*.cpp, and the CUDA branches of files that test
# FASTPRUNE_WITH_CUDA): g++ -fsyntax-only against torch's headers and the CUDA toolkit's.  A CPU wheel of
# torch ships c10/cuda and ATen/cuda but not the generated c10/cuda/impl/cuda_cmake_macros.h: a stand-in
# with its one definition takes its place.
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
CXX=${CXX:-g++}
cuda_include=$("$NVCC" --dryrun -x cu -E /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p')/include  # nvcc's own toolkit
mkdir -p "$tmp/stand-in/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$tmp/stand-in/c10/cuda/impl/cuda_cmake_macros.h"
mapfile -t includes < <("$PY" -c "import sysconfig, torch.utils.cpp_extension as e
print(*e.include_paths(), sysconfig.get_paths()['include'], sep='\n')")
mapfile -t glue < <({ find csrc/cuda -name '*.cpp'; grep -rl FASTPRUNE_WITH_CUDA csrc --include='*.cpp'; } | sort -u)
pids=()
for f in "${glue[@]}"; do
  "$CXX" -std=c++20 -fsyntax-only -Wall -Werror -Wno-unused-function -DFASTPRUNE_WITH_CUDA=1 \
    -DTORCH_EXTENSION_NAME=_C -I"$tmp/stand-in" "${includes[@]/#/-isystem}" -isystem "$cuda_include" -Icsrc "$f" \
    && echo "ok  $f (g++ -fsyntax-only, CUDA build)" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ "$status" -eq 0 ] || { echo "compile_cuda.sh: the CUDA glue does not compile" >&2; exit 1; }
echo "compile_cuda.sh: ${#glue[@]} C++ file(s) of the CUDA build checked with $("$CXX" --version | head -1)"
