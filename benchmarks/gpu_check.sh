#!/usr/bin/env bash
# The checks that need a GPU, in one pass on a lent H100/H200 (repository root as cwd, no internet):
# build ppml._C for sm_90 against the machine's own torch, show the backends, run the tests (CUDA tests are selected
# by availability, Triton tests without the interpreter), compute-sanitizer memcheck on the CUDA and Triton kernels
# (shuffle, shuffle out=, mix mean and weighted, anchor loss), a short `ppml train` on the GPU (bf16 autocast, stopped
# and resumed), then the quick throughput benchmark (GPU rows: shuffle, mix, anchor).
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
import sys

import torch

import ppml
from ppml import reference

# Every kernel runs under memcheck even when an earlier one gives a wrong result: the mismatches are listed at the end.
wrong = []


def check(label, got, expected):
    torch.cuda.synchronize()
    if torch.equal(got, expected):
        print(f"memcheck {label}: ok")
    else:
        wrong.append(label)
        err = (got.double() - expected.double()).abs().max().item() if got.shape == expected.shape else "shape"
        print(f"memcheck {label}: DIFFERS from the reference (max abs diff {err})")


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
        check(f"shuffle {name} {case}", op(x, perm, 8), expected)
    out = torch.empty_like(x)
    torch.ops.ppml.shuffle_patches.out(x, perm, 8, out=out)
    check(f"shuffle native out= {case}", out, expected)

# MI: [2, 3, 32, 32], p = 8, g = 2 (N = 16 patches of 4 sub-patches); float32 output either way, bit-exact expected.
weights = ppml.random_mixing_weights(2, 16, 2, generator=gen).cuda()
mix_ops = {"native": torch.ops.ppml.mix_subpatches, "triton": torch.ops.ppml.mix_subpatches_triton}
for case in ("float32", "uint8"):
    x = cases[case]
    for wname, w in (("mean", None), ("weighted", weights)):
        expected = reference.mix_subpatches(x, 8, 2, w)
        for name, op in mix_ops.items():
            check(f"mix {name} {case} {wname}", op(x, 8, 2, w), expected)

# Anchor loss: [5, 8] features, 3 classes and 2^20 classes (several row chunks); within float32 rounding.
from ppml.ops.anchor_loss import loss_and_grad

for C in (3, 1 << 20):
    f = torch.randn(5, 8, generator=gen)
    a = ppml.make_anchors(C, 8, "random", generator=gen)
    y = torch.randint(0, C, (5,), generator=gen)
    for metric in ("sqeuclidean", "euclidean", "cosine"):
        loss, grad = torch.ops.ppml.anchor_loss(f.cuda(), a.cuda(), y.cuda(), metric, 2.0, 0.1, True)
        torch.cuda.synchronize()
        l2, g2 = loss_and_grad(f.double(), a.double(), y, metric, 2.0, 0.1, True)
        ok = torch.allclose(loss.cpu().double(), l2, rtol=1e-3, atol=1e-4) and torch.allclose(
            grad.cpu().double(), g2, rtol=1e-2, atol=1e-4)
        print(f"memcheck anchor_loss {metric} C={C}: {'ok' if ok else 'DIFFERS'}")
        if not ok:
            wrong.append(f"anchor_loss {metric} C={C}")

if wrong:
    print(f"{len(wrong)} kernel(s) differ from the reference: {', '.join(wrong)}")
    sys.exit(1)
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
# test_train.py trains on the CPU (its DDP test uses gloo): the GPU training check is the AMP run below. The
# attack and detection tests are CPU-only too (and need scipy / pycocotools, which that machine may lack).
step "pytest tests" 150 python -m pytest -q -x tests --ignore=tests/test_train.py \
    --ignore=tests/test_detection.py --ignore=tests/test_attacks_learned.py --ignore=tests/test_attack_defences.py
# The Triton tests on the GPU itself: the interpreter would test Python semantics, not the compiled kernels.
step "pytest -m triton (GPU, no interpreter)" 120 env -u TRITON_INTERPRET python -m pytest -q -m triton tests
step "compute-sanitizer memcheck" 150 sanitize
train_gpu() {
    if ! python -c "import timm, sklearn" 2>/dev/null; then
        echo "NOT RUN: timm or scikit-learn is not installed here (pip install ppml[train])"
        return 0
    fi
    local out
    out="$(mktemp -d /tmp/ppml-train.XXXXXX)"
    # One epoch of the digits on RS ciphertext, bf16 autocast, then a resumed second epoch: the CUDA training path.
    python -m ppml train --device cuda --encryption rs --epochs 2 --stop-after 12 --depth 4 --embed-dim 96 \
        --num-heads 3 --out "$out" && python -m ppml train --device cuda --encryption rs --epochs 2 --depth 4 \
        --embed-dim 96 --num-heads 3 --out "$out" --resume && cat "$out/metrics.jsonl"
}
export -f train_gpu
step "ppml train on the GPU (AMP, stop + resume)" 90 train_gpu
step "throughput --quick (shuffle, mix, anchor)" 200 python benchmarks/throughput.py --quick --sections shuffle,mix,anchor \
    ${OUT:+--out "$OUT/results"}

header "summary"
for s in "${PASSED[@]+"${PASSED[@]}"}"; do echo "ok      $s"; done
for s in "${FAILED[@]+"${FAILED[@]}"}"; do echo "FAILED  $s"; done
echo "total $((SECONDS - START))s of a ${BUDGET_S}s budget"
((${#FAILED[@]} == 0))
