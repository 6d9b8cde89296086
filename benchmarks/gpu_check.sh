#!/usr/bin/env bash
# The checks that need a GPU, in one pass on a lent H100/H200 (repository root as cwd, no internet), under 6 minutes:
#   1. the toolchain: compilers, the C++ runtime torch loads, which compiler setup.py will pick (ppml/_toolchain.py);
#   2. build ppml._C for sm_90 against the machine's torch; the build's self-test proves a C++ error from _C reaches
#      Python as a ValueError (a crash there is diagnosed with cuda-gdb's backtrace); ldd and the runtime symbols;
#   3. the test suite (CUDA tests selected by availability; tests/test_cuda_runtime.py: no host sync under
#      torch.cuda.set_sync_debug_mode("error"), bad keys stop the stream with a named device-side assert), then the
#      Triton tests compiled for the GPU (no interpreter). Per-test timeouts, no -x, every failure listed by name;
#   4. (after the throughput rows, step 5, so that they survive a pass that runs out of time)
#      `ppml train --device cuda` (bf16 autocast, stopped and resumed) and `--device cuda:0`;
#   5. the quick throughput benchmark with its GPU rows (shuffle and MI against the copy, anchor loss against eager,
#      patch tokens against the bytes-moved bound and eager);
#   6. compute-sanitizer memcheck on every CUDA and Triton kernel.
#
#   bash benchmarks/gpu_check.sh    # OUT=<folder> keeps gpu_check.log, build.log, pytest logs, junit XML,
#                                   # failures.txt and the benchmark results; SKIP_BUILD=1 reuses a warm machine's build
#
# Every step runs under `timeout`, capped by what is left of GPU_CHECK_BUDGET_S (default 400 s): a failing or slow step
# is recorded and the next one still runs, so one pass gives every answer. The summary and failures.txt name every
# failed step and test, even for a step that ran out of time (pytest runs with -v into a log that survives a kill).
# The exit status is non-zero when anything failed.
set -uo pipefail

export OUT="${OUT:-}"
LOGDIR="${OUT:-$(mktemp -d /tmp/ppml-gpu-check.XXXXXX)}"
mkdir -p "$LOGDIR"
# Keep the full log: the caller may only see the tail of stdout.
exec > >(tee -a "$LOGDIR/gpu_check.log") 2>&1

# Python block-buffers stdout into a pipe: without this the log interleaves stdout and stderr out of order.
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
BUDGET_S="${GPU_CHECK_BUDGET_S:-400}"
START=$SECONDS
FAILED=()
PASSED=()
FAILURES="$LOGDIR/failures.txt"
: >"$FAILURES"

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
        echo "step skipped (out of time): $name" >>"$FAILURES"
        return 0
    fi
    ((limit > left)) && limit=$left
    local t0=$SECONDS rc=0
    if declare -F "$1" >/dev/null; then
        # timeout runs programs, not shell functions: hand the (exported) function to a child bash.
        timeout --kill-after=10 "$limit" bash -c "$*" || rc=$?
    else
        timeout --kill-after=10 "$limit" "$@" || rc=$?
    fi
    local msg="$name: rc=$rc in $((SECONDS - t0))s"
    ((rc == 124 || rc == 137)) && msg+=" (timed out after ${limit}s)"
    echo "--- $msg"
    if ((rc == 0)); then
        PASSED+=("$msg")
    else
        FAILED+=("$msg")
        echo "step failed: $msg" >>"$FAILURES"
    fi
    return 0
}

# run_pytest NAME ARGS...: verbose into its own log (each test's outcome is written as it finishes, so a kill keeps
# them), per-test timeout when pytest-timeout is there, xdist workers when pytest-xdist is there (a worker that
# crashes is reported by name and replaced, so one crash does not end the run), junit XML at the end.
run_pytest() {
    local name=$1
    shift
    local log="$LOGDIR/pytest-$name.log" opts=(-v -rfE -p no:cacheprovider --junitxml="$LOGDIR/junit-$name.xml")
    python -c "import pytest_timeout" 2>/dev/null && opts+=(--timeout="${PER_TEST_TIMEOUT_S:-90}")
    python -c "import xdist" 2>/dev/null && opts+=(-n "${PYTEST_WORKERS:-4}" --max-worker-restart=20)
    local rc=0
    python -m pytest "${opts[@]}" "$@" >"$log" 2>&1 || rc=$?
    # pytest's 5 means "no tests collected": an empty selection is not a failure of this machine.
    ((rc == 5)) && rc=0
    tail -n 3 "$log"
    return $rc
}

# pytest_failures NAME: the failed and errored tests of run_pytest NAME, read from its log by the main shell (so even
# a step killed by its timeout is listed), plus the test that was running when the log ends without a verdict.
pytest_failures() {
    local log="$LOGDIR/pytest-$1.log"
    [[ -f "$log" ]] || return 0
    grep -E "(^| )(FAILED|ERROR)( |$)|node down|worker .*crashed|Timeout \+" "$log" | grep -vE "^=+ " | sort -u \
        | sed "s/^/[$1] /" | tee -a "$FAILURES" || true
    local last
    last="$(grep -E "::" "$log" | tail -n 1)"
    if [[ -n "$last" && ! "$last" =~ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) ]]; then
        echo "[$1] unfinished when the step ended: $last" | tee -a "$FAILURES"
    fi
}

build() {
    local log="$LOGDIR/build.log" rc=0
    echo "build log: $log"
    # sm_90 only (H100/H200): one architecture builds several times faster than the default list.
    # --no-build-isolation builds against this machine's torch; --no-index/--no-deps: there is no internet.
    FORCE_CUDA=1 PPML_CUDA_ARCH=90 MAX_JOBS="${MAX_JOBS:-16}" python -m pip install --no-build-isolation --no-deps \
        --no-index -v -e . >"$log" 2>&1 || rc=$?
    grep -E "ppml: |error:|Successfully installed" "$log" | head -20 || true
    if ((rc != 0)); then
        tail -n 25 "$log"
        # The self-test crashed: get the native stack of the crash (cuda-gdb debugs host code too; no gdb here).
        if grep -q "crashed with signal" "$log" && command -v cuda-gdb >/dev/null; then
            echo "--- native backtrace of the self-test crash (cuda-gdb)"
            timeout 120 cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args \
                python ppml/_selftest.py "$PWD" 2>&1 | tail -n 60 | tee "$LOGDIR/selftest-crash.txt"
        fi
    fi
    return $rc
}

native_facts() {
    python -m ppml._toolchain ppml/_C*.so
    echo "--- ldd ppml/_C*.so"
    ldd ppml/_C*.so
    python -m ppml._selftest
}

sanitize() {
    local cs
    cs="$(command -v compute-sanitizer || true)"
    [[ -z "$cs" && -x /usr/local/cuda/bin/compute-sanitizer ]] && cs=/usr/local/cuda/bin/compute-sanitizer
    if [[ -z "$cs" ]]; then
        echo "memcheck NOT RUN: compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
        return 1
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

anchor_ops = {"native": torch.ops.ppml.anchor_loss, "triton": torch.ops.ppml.anchor_loss_triton}
for C in (3, 1 << 20):
    f = torch.randn(5, 8, generator=gen)
    a = ppml.make_anchors(C, 8, "random", generator=gen)
    y = torch.randint(0, C, (5,), generator=gen)
    for metric in ("sqeuclidean", "euclidean", "cosine"):
        l2, g2 = loss_and_grad(f.double(), a.double(), y, metric, 2.0, 0.1, True)
        for name, op in anchor_ops.items():
            loss, grad = op(f.cuda(), a.cuda(), y.cuda(), metric, 2.0, 0.1, True)
            torch.cuda.synchronize()
            ok = torch.allclose(loss.cpu().double(), l2, rtol=1e-3, atol=1e-4) and torch.allclose(
                grad.cpu().double(), g2, rtol=1e-2, atol=1e-4)
            print(f"memcheck anchor_loss {name} {metric} C={C}: {'ok' if ok else 'DIFFERS'}")
            if not ok:
                wrong.append(f"anchor_loss {name} {metric} C={C}")

# Patch tokens: the uint8 and float32 images, p = 8, keyed; bit-exact expected.
perm = ppml.random_permutations(2, 16, generator=gen).cuda()
token_ops = {"native": torch.ops.ppml.patch_tokens, "triton": torch.ops.ppml.patch_tokens_triton}
for case in ("float32", "uint8"):
    expected = reference.patch_tokens(cases[case], 8, perm, [0.5, 0.4, 0.3], [0.2, 0.3, 0.4])
    for name, op in token_ops.items():
        check(f"patch_tokens {name} {case}", op(cases[case], perm, 8, [0.5, 0.4, 0.3], [0.2, 0.3, 0.4], torch.float32),
              expected)

if wrong:
    print(f"{len(wrong)} kernel(s) differ from the reference: {', '.join(wrong)}")
    sys.exit(1)
PY
}

train_gpu() {
    if ! python -c "import timm, sklearn" 2>/dev/null; then
        echo "NOT RUN: timm or scikit-learn is not installed here (pip install ppml[train])"
        return 1
    fi
    local out rc=0
    out="$(mktemp -d /tmp/ppml-train.XXXXXX)"
    # The digits on RS ciphertext, bf16 autocast: stopped after 12 steps, resumed to the end of epoch 2 (`cuda`,
    # the bare name the first GPU run failed on), then one epoch on an explicit `cuda:0`.
    local model=(--depth 4 --embed-dim 96 --num-heads 3)
    python -m ppml train --device cuda --encryption rs --epochs 2 --stop-after 12 "${model[@]}" --out "$out/a" \
        && python -m ppml train --device cuda --encryption rs --epochs 2 "${model[@]}" --out "$out/a" --resume \
        && tail -n 2 "$out/a/metrics.jsonl" || rc=1
    python -m ppml train --device cuda:0 --encryption rs --epochs 1 "${model[@]}" --out "$out/b" \
        && tail -n 1 "$out/b/metrics.jsonl" || rc=1
    return $rc
}

export LOGDIR FAILURES
export -f build native_facts sanitize train_gpu run_pytest

header "GPU and toolchain"
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo "nvidia-smi failed"
python - <<'PY' || true
import sys

import torch

print(f"python {sys.version.split()[0]} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"cuda available {torch.cuda.is_available()}")
PY
python -c "import triton; print('triton', triton.__version__)" || echo "triton not importable"
nvcc --version 2>/dev/null | tail -n 2 || echo "nvcc not on PATH"
# Before the build: which compiler setup.py will take, and the C++ runtime torch runs with.
timeout 60 python ppml/_toolchain.py || true

if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
    header "build ppml._C (sm_90)"
    echo "SKIP_BUILD=1: using the ppml already installed"
else
    step "build ppml._C (sm_90) + self-test" 170 build
fi
step "toolchain, ldd, self-test of the installed _C" 60 native_facts
step "backend_info" 60 python -c "import json, ppml; print(json.dumps(ppml.backend_info(), indent=2))"
# A _C that was just built but does not load must fail the tests, not skip them.
python -c "import ppml, sys; sys.exit(0 if ppml._extension.native_loaded() else 1)" 2>/dev/null \
    && export PPML_REQUIRE_NATIVE=1
# The attack, detection and training tests are CPU-only (and need scipy / pycocotools); training on the GPU is the
# `ppml train` step below.
step "pytest tests (CUDA)" 100 run_pytest tests tests --ignore=tests/test_train.py \
    --ignore=tests/test_detection.py --ignore=tests/test_attacks_learned.py --ignore=tests/test_attack_defences.py \
    --ignore=tests/test_attacks.py
pytest_failures tests
# The speed rows of the GPU-speed issue come before the slower checks, so a pass that runs out of time still has them.
step "throughput --quick (shuffle, mix, anchor, tokens; GPU rows)" 150 python benchmarks/throughput.py --quick \
    --sections shuffle,mix,anchor,tokens ${OUT:+--out "$OUT/results"}
# The Triton tests on the GPU itself: the interpreter would test Python semantics, not the compiled kernels.
step "pytest -m triton (GPU, no interpreter)" 100 env -u TRITON_INTERPRET bash -c 'run_pytest triton -m triton tests'
pytest_failures triton
step "ppml train on the GPU (cuda: AMP, stop + resume; cuda:0)" 60 train_gpu
step "compute-sanitizer memcheck" 60 sanitize

header "summary"
for s in "${PASSED[@]+"${PASSED[@]}"}"; do echo "ok      $s"; done
for s in "${FAILED[@]+"${FAILED[@]}"}"; do echo "FAILED  $s"; done
if [[ -s "$FAILURES" ]]; then
    echo "--- every failure by name ($FAILURES):"
    cat "$FAILURES"
fi
echo "total $((SECONDS - START))s of a ${BUDGET_S}s budget; logs in $LOGDIR"
((${#FAILED[@]} == 0))
