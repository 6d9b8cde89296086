#!/usr/bin/env bash
# The checks that need a GPU, in one pass on a lent H100/H200 (repository root as cwd, no internet):
# build ppml._C for sm_90 against the machine's own torch, show the backends, run the tests (CUDA tests are selected
# by availability, Triton tests without the interpreter), compute-sanitizer memcheck on the CUDA and Triton kernels,
# then the quick throughput benchmark (GPU rows).
#
#   bash benchmarks/gpu_check.sh    # OUT=<folder> keeps gpu_check.log, build.log and the benchmark results;
#                                   # SKIP_BUILD=1 reuses the install of an earlier run on the same (warm) machine
#
# Every step runs under `timeout` and the whole script stays under GPU_CHECK_BUDGET_S (default 470 s, < 8 min): a
# device session is short, so a failing step is recorded and the next one still runs (one pass gives every answer);
# the exit status is non-zero when any step failed.
set -euo pipefail

export OUT="${OUT:-}"
if [[ -n "$OUT" ]]; then
    mkdir -p "$OUT"
    # Keep the full log: the caller may only see the tail of stdout.
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi

# Python block-buffers stdout into a pipe: without this the log interleaves stdout and stderr out of order.
export PYTHONUNBUFFERED=1
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
START=$SECONDS
FAILED=()
PASSED=()

header() {
    printf '\n========== %s (t=%ss) ==========\n' "$1" "$((SECONDS - START))"
}

# step NAME LIMIT_S CMD...: runs CMD (a program or one of the functions below) under timeout, capped by what is left
# of the budget, and records the outcome.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - START)))
    header "$name"
    if ((left < 15)); then
        echo "SKIPPED: only ${left}s of the ${BUDGET_S}s budget left"
        FAILED+=("$name (skipped: out of time)")
        return 0
    fi
    ((limit > left)) && limit=$left
    local t0=$SECONDS rc=0
    if declare -F "$1" >/dev/null; then
        # timeout runs programs, not shell functions: hand the (exported) function to a child bash.
        timeout --kill-after=10 "$limit" bash -c "$1" || rc=$?
    else
        timeout --kill-after=10 "$limit" "$@" || rc=$?
    fi
    # pytest's 5 means "no tests collected": an empty selection is not a failure of this machine.
    if [[ $rc -eq 5 && " $* " == *" pytest "* ]]; then
        echo "(pytest collected no tests)"
        rc=0
    fi
    local msg="$name: rc=$rc in $((SECONDS - t0))s"
    ((rc == 124 || rc == 137)) && msg+=" (timed out after ${limit}s)"
    echo "--- $msg"
    if ((rc == 0)); then PASSED+=("$msg"); else FAILED+=("$msg"); fi
    return 0
}

build() {
    local log="${OUT:+$OUT/build.log}"
    log="${log:-$(mktemp /tmp/ppml-build.XXXXXX.log)}"
    echo "build log: $log"
    # sm_90 only (H100/H200): one architecture builds several times faster than the default list.
    # --no-build-isolation builds against this machine's torch; --no-index/--no-deps: there is no internet.
    local rc=0
    PPML_CUDA_ARCH=90 MAX_JOBS="${MAX_JOBS:-16}" python -m pip install --no-build-isolation --no-deps --no-index \
        -v -e . >"$log" 2>&1 || rc=$?
    grep -E "ppml: CUDA kernels|error:|Successfully installed" "$log" | head -20 || true
    tail -n 5 "$log"
    return $rc
}

sanitize() {
    local cs
    cs="$(command -v compute-sanitizer || true)"
    [[ -z "$cs" && -x /usr/local/cuda/bin/compute-sanitizer ]] && cs=/usr/local/cuda/bin/compute-sanitizer
    if [[ -z "$cs" ]]; then
        echo "memcheck NOT RUN: compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
        return 0
    fi
    # Without the caching allocator every tensor is its own cudaMalloc, so an overrun past a small tensor is caught
    # instead of landing silently in the same pooled block.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool memcheck --error-exitcode 99 python - <<'PY'
import torch

import ppml
from ppml import reference

gen = torch.Generator().manual_seed(0)
perm = ppml.random_permutations(2, 16, generator=gen).cuda()
cases = {
    "float32": torch.randn(2, 3, 32, 32, generator=gen).cuda(),
    "float32 channels_last": torch.randn(2, 3, 32, 32, generator=gen).cuda().to(memory_format=torch.channels_last),
    "uint8": torch.randint(0, 256, (2, 3, 32, 32), generator=gen, dtype=torch.uint8).cuda(),
}
ops = {"native": torch.ops.ppml.shuffle_patches, "triton": torch.ops.ppml.shuffle_patches_triton}
for case, x in cases.items():
    expected = reference.shuffle_patches(x, perm, 8)
    for name, op in ops.items():
        y = op(x, perm, 8)
        torch.cuda.synchronize()
        assert torch.equal(y, expected), f"{name} {case}: differs from the reference"
        print(f"memcheck {name} {case}: ok")
PY
}

export -f build sanitize

header "GPU"
timeout 20 nvidia-smi -L || echo "nvidia-smi failed"
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
python - <<'PY' || true
import sys

import torch

print(f"python {sys.version.split()[0]} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"cuda available {torch.cuda.is_available()}")
PY
python -c "import triton; print('triton', triton.__version__)" || echo "triton not importable"

if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
    # A rerun on a machine that is still warm: the editable install from the first run is still there.
    header "build ppml._C (sm_90)"
    echo "SKIP_BUILD=1: using the ppml already installed"
else
    step "build ppml._C (sm_90)" 240 build
fi
step "backend_info" 60 python -c "import json, ppml; print(json.dumps(ppml.backend_info(), indent=2))"
# Here ppml._C was just built: a _C that does not load must fail the tests, not skip them.
export PPML_REQUIRE_NATIVE=1
step "pytest tests" 150 python -m pytest -q -x tests
# The Triton tests on the GPU itself: the interpreter would test Python semantics, not the compiled kernels.
step "pytest -m triton (GPU, no interpreter)" 120 env -u TRITON_INTERPRET python -m pytest -q -m triton tests
step "compute-sanitizer memcheck" 150 sanitize
step "throughput --quick" 180 python benchmarks/throughput.py --quick ${OUT:+--out "$OUT/results"}

header "summary"
for s in "${PASSED[@]+"${PASSED[@]}"}"; do echo "ok      $s"; done
for s in "${FAILED[@]+"${FAILED[@]}"}"; do echo "FAILED  $s"; done
echo "total $((SECONDS - START))s of a ${BUDGET_S}s budget"
((${#FAILED[@]} == 0))
