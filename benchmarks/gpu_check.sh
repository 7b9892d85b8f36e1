#!/usr/bin/env bash
# One GPU check, in under 6 minutes: build the CUDA extension, run the CUDA/Triton tests, check and time the
# compiled kernels against each other (backends.tune), then the kernel and end-to-end pruning benchmarks.
# Every measurement is appended to $OUT/results.jsonl as one JSON line as soon as it is taken (so a run cut
# short still leaves what it measured); logs, the benchmarks' JSON and a summary go to $OUT too (no folders).
# Every step has a time limit under one deadline; a failed step does not stop the others, and the script
# exits non-zero at the end if any failed.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # here: the same steps on the CPU, tiny shapes,
#                                                # Triton's interpreter, in a throwaway copy and venv
#
# Environment: OUT (default: a new temporary folder), PYTHON (default python3), STEPS (default
# "build tests selfcheck kernels prune"; a rerun names the steps it wants), FORCE_BUILD=1 (rebuild even
# when the installed extension is current), DEADLINE_S (default 330; 4x that and 4x each step's limit in
# the dry run).  Carried wheels in .whl/
# (torch-pruning) are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--cpu-dry-run" ]; then
  # Never touch the shared checkout or its venv: copy the tree as the device would receive it, and
  # make a venv that sees the current interpreter's packages (but not its editable fastprune).
  PY=${PYTHON:-python3}
  work=$(mktemp -d /tmp/gpu_check_dry.XXXX)
  git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$work/"
  [ -d .whl ] && cp -r .whl "$work/"
  # the C++ extension this checkout built (same sources): the dry run checks the script, `make setup` the build
  if compgen -G "fastprune/_native/_C*.so" >/dev/null; then cp fastprune/_native/_C*.so "$work/fastprune/_native/"; fi
  "$PY" -m venv --without-pip "$work/.dryvenv"
  site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$site" > "$("$work/.dryvenv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/parent.pth"
  echo "dry run in $work"
  cd "$work" && GPU_CHECK_CPU=1 PYTHON="$work/.dryvenv/bin/python" OUT="${OUT:-$work/out}" bash benchmarks/gpu_check.sh
  exit $?
fi

PY=${PYTHON:-python3}
CPU=${GPU_CHECK_CPU:-0}
OUT=${OUT:-$(mktemp -d)}
STEPS=${STEPS:-"build tests selfcheck kernels prune"}
SCALE=$([ "$CPU" = 1 ] && echo 4 || echo 1)  # the dry run on a small shared CPU gets 4x the time limits
DEADLINE=$((SECONDS + ${DEADLINE_S:-$((330 * SCALE))}))
RESULTS="$OUT/results.jsonl"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
mkdir -p "$OUT"
failed=()
summary=()

# step NAME LIMIT_S LOG COMMAND...: run with a time limit capped by the deadline; record the outcome.
step() {
  local name=$1 limit=$(($2 * SCALE)) log=$3; shift 3
  local left=$((DEADLINE - SECONDS))
  [[ " $STEPS " == *" $name "* ]] || return 0
  if [ "$left" -lt 20 ]; then
    failed+=("$name"); summary+=("| $name | skipped: out of time | 0 |"); return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s, log $log)"
  local start=$SECONDS rc
  timeout -k 10 "$limit" "$@" >>"$OUT/$log" 2>&1
  rc=$?
  local took=$((SECONDS - start)) what=ok
  if [ "$rc" -ne 0 ]; then
    what="FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ", timed out"))"
    failed+=("$name")
    tail -n 15 "$OUT/$log"
  fi
  echo "   $what in ${took} s"
  summary+=("| $name | $what | $took |")
  printf '{"step": "%s", "exit": %d, "seconds": %d, "log": "%s"}\n' "$name" "$rc" "$took" "$log" >>"$RESULTS"
  return "$rc"
}

{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ) $([ "$CPU" = 1 ] && echo '(CPU dry run)')"
  echo
  echo '```'
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  git log -1 --format='commit %h %s' 2>/dev/null
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "no triton"
  echo '```'
} >"$OUT/summary.md"
cat "$OUT/summary.md"

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "warning: the carried wheels did not install"
fi

if [ "$CPU" = 1 ]; then
  export FASTPRUNE_CUDA=OFF TRITON_INTERPRET=1
  if compgen -G "fastprune/_native/_C*.so" >/dev/null; then export FASTPRUNE_NO_EXT=1; fi  # reuse the copied one
  want="import sys; from fastprune import backends; b = backends.available('cpu'); print(b); sys.exit('cpp' not in b)"
  test_args=()
  selfcheck_args=(cpu 64 48)
  kernels_args=(--small --device cpu --repeat 2)
  prune_args=(--device cpu --shapes tiny --tp-shapes tiny --tp-timeout 10 --dense-in-process --budget-s 90)
else
  export FASTPRUNE_CUDA=ON TRITON_INTERPRET=0
  want="import sys; from fastprune import backends; b = backends.available('cuda'); print(b); sys.exit(not {'cuda', 'triton'} <= set(b))"
  test_args=(-n 4)
  "$PY" -c "import xdist" 2>/dev/null || test_args=()
  selfcheck_args=(cuda 4096 4096)
  kernels_args=()
  prune_args=(--shapes llama2-7b llama3-8b --no-tp --no-dense --dense-in-process --budget-s 150)
fi

# Build, unless the installed extension is this tree's and newer than every source (a warm machine).
current() {
  local so
  so=$(ls fastprune/_native/_C*.so 2>/dev/null | head -1)
  [ -n "$so" ] && [ -z "${FORCE_BUILD:-}" ] && [ -z "$(find csrc CMakeLists.txt setup.py -newer "$so" 2>/dev/null)" ] \
    && "$PY" -c "import fastprune, sys; sys.exit(not fastprune.__file__.startswith('$PWD/'))" 2>/dev/null \
    && "$PY" -c "$want" >/dev/null 2>&1
}
build() {
  if current; then echo "extension is current: build skipped"; else
    "$PY" -m pip install --no-build-isolation --no-deps -e . || return 1
  fi
  "$PY" -c "$want"
}
export -f current build
export PY want
step build 150 build.log bash -c build

step tests 120 tests.log env FASTPRUNE_REQUIRE_EXT=1 FASTPRUNE_REQUIRE_TRITON=1 \
  "$PY" -m pytest tests/test_ops.py tests/test_triton.py tests/test_sync_free.py -q -p no:cacheprovider -rs \
  "${test_args[@]}"

# The fast path's first use on this device: every op's default kernel self-checked per dtype, then the
# compiled backends timed against each other (the faster one is what fastprune.backends.tune keeps).
step selfcheck 60 selfcheck.log "$PY" - "$RESULTS" "${selfcheck_args[@]}" <<'PYEOF'
import json, sys, warnings
import torch
from fastprune import backends
results, device, rows, cols = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for op, info in backends.OPS.items():
            default = backends.active(op, device)
            args = info.samples(torch.device(device), dtype, torch.Generator(device=device).manual_seed(1))[0]
            info.run(info.op, args)  # the first call on this device and dtype runs the self-check
            line = {"check": "self-check", "op": op, "device": device, "dtype": str(dtype), "default": default,
                    "serves": backends.active(op, device, dtype), "warnings": [str(w.message) for w in caught]}
            print(json.dumps(line), flush=True)
            with open(results, "a") as f:
                f.write(json.dumps(line) + "\n")
for dtype in (torch.bfloat16, torch.float32):
    timings = backends.tune(device, dtype, shape=(rows, cols))
    line = {"check": "tune", "device": device, "dtype": str(dtype), "shape": [rows, cols], "seconds": timings,
            "kept": {op: backends.active(op, device) for op in backends.OPS}}
    print(json.dumps(line), flush=True)
    with open(results, "a") as f:
        f.write(json.dumps(line) + "\n")
PYEOF

step kernels 60 kernels.log "$PY" benchmarks/bench_kernels.py "${kernels_args[@]}" --json "$OUT/kernels.json" \
  --jsonl "$RESULTS"

step prune 150 prune.log "$PY" benchmarks/bench_prune.py "${prune_args[@]}" --json "$OUT/prune.json" \
  --jsonl "$RESULTS"

{
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---:|"
  printf '%s\n' "${summary[@]}"
  for log in kernels.log prune.log; do
    [ -f "$OUT/$log" ] || continue
    echo
    grep -E '^(device:|\|)' "$OUT/$log"
  done
} >>"$OUT/summary.md"
echo
sed -n '/^| step/,$p' "$OUT/summary.md"
echo
echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "gpu_check: FAILED steps: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all steps passed"
