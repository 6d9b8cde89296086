#!/usr/bin/env bash
# CI, second half: prove the floor torch. Builds ppml._C (CPU and CUDA kernels, as the GPU machine builds them:
# FORCE_CUDA=1, PPML_CUDA_ARCH=90) against torch 2.11.0+cu130 / triton 3.6.0 -- what the GPU machine runs -- in a
# venv of its own, then runs the op tests (bad-input tests included), the build tests, the Triton sm_90 AOT compiles
# and the Triton interpreter tests there, and checks for real that a _C built for one torch is refused, with its
# reason, by the other.
#
# The main build is left alone: ppml is built from a copy of this checkout (tracked and untracked-but-not-ignored
# files; no build/, no _C) in a temporary directory and installed non-editable into the floor venv, and pytest runs
# from that copy, where `import ppml` can only find the venv's copy (the copy has no _C, so a wrong one fails
# test_native_loaded_when_required).
#
# Settings (environment):
#   PPML_FLOOR_VENV   the venv (default ${TMPDIR:-/tmp}/ppml-floor-venv). Reused when it already has the floor torch
#                     (pip's HTTP cache keeps nothing on the CI machine, so the venv is the cache: ~3 GB of wheels).
#   PPML_FLOOR_FRESH  1: delete and recreate the venv.
#   PPML_FLOOR_PYTHON the interpreter that makes the venv (default: python). If its own torch is another version, it
#                     is also used for the cross-version refusal check.
#   PPML_CUDA_ARCH    default 90 (the GPU machine: H200). MAX_JOBS default 2.
# Exit status: 0 when everything passed; non-zero on any failure, with the failing step named at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

FLOOR_TORCH=2.11.0               # pip requirement (PyPI's Linux wheel of 2.11.0 is the CUDA 13.0 build)
FLOOR_TORCH_VERSION=2.11.0+cu130 # what torch.__version__ must then say: the GPU machine's torch
FLOOR_TRITON=3.6.0               # what torch 2.11.0 pins; also the GPU machine's
# numpy<2.4: triton 3.6.0's interpreter converts 1-element arrays with int(), which NumPy 2.4 made an error
# ("only 0-dimensional arrays can be converted to Python scalars"); every TRITON_INTERPRET=1 kernel launch fails.
# Triton 3.8 squeezes first. Not a ppml problem, and the compiled (GPU) path does not touch it.
FLOOR_REQS=("torch==$FLOOR_TORCH" "numpy<2.4" "pytest>=7" "hypothesis>=6" expecttest ninja "setuptools>=64,<82" wheel)

VENV=${PPML_FLOOR_VENV:-${TMPDIR:-/tmp}/ppml-floor-venv}
HOST_PY=${PPML_FLOOR_PYTHON:-python}
export FORCE_CUDA=1
export PPML_CUDA_ARCH=${PPML_CUDA_ARCH:-90}
export MAX_JOBS=${MAX_JOBS:-2}
export PIP_PROGRESS_BAR=off
unset PPML_DISABLE_NATIVE PPML_BACKEND TRITON_INTERPRET PYTHONPATH

T0=$SECONDS
TIMES=()
FAILED=()
step() { STEP_NAME=$1; STEP_T0=$SECONDS; printf '\n=== floor: %s ===\n' "$1"; }
step_done() { TIMES+=("$(printf '%-58s %5ds' "$STEP_NAME" $((SECONDS - STEP_T0)))"); }
die() { printf '\nfloor: FAILED in step "%s": %s\n' "${STEP_NAME:-setup}" "$*" >&2; exit 1; }

SRC=""
XDIR=""
cleanup() { [[ -n $SRC ]] && rm -rf "$SRC"; [[ -n $XDIR ]] && rm -rf "$XDIR"; return 0; }
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------------------------------
step "venv with torch $FLOOR_TORCH ($VENV)"
command -v "$HOST_PY" >/dev/null || die "no $HOST_PY on PATH (set PPML_FLOOR_PYTHON)"
command -v git >/dev/null || die "git is needed to copy the checkout"
VPY=$VENV/bin/python
if [[ -e $VENV ]]; then
    have=$("$VPY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
    if [[ ${PPML_FLOOR_FRESH:-0} == 1 || $have != "$FLOOR_TORCH_VERSION" ]]; then
        [[ -f $VENV/pyvenv.cfg ]] || die "$VENV exists and is not a venv; not deleting it (set PPML_FLOOR_VENV)"
        echo "floor: recreating $VENV (it has torch '${have:-none}')"
        rm -rf "$VENV"
    else
        echo "floor: reusing $VENV (torch $have)"
    fi
fi
[[ -e $VENV ]] || "$HOST_PY" -m venv "$VENV" || die "python -m venv $VENV failed"
# No -U: an existing venv that satisfies the requirements is left as it is (fast); otherwise pip fetches them.
"$VPY" -m pip install "${FLOOR_REQS[@]}" || die "pip install ${FLOOR_REQS[*]} failed"
"$VPY" - "$FLOOR_TORCH_VERSION" "$FLOOR_TRITON" <<'EOF' || die "the floor venv does not have the expected versions"
import sys, platform, numpy, torch, triton
want_torch, want_triton = sys.argv[1:3]
print(f"floor: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, numpy {numpy.__version__}")
ok = torch.__version__ == want_torch and triton.__version__ == want_triton and torch.version.cuda is not None
if not ok:
    print(f"floor: expected torch {want_torch} with CUDA and triton {want_triton}", file=sys.stderr)
sys.exit(0 if ok else 1)
EOF
echo "floor: venv size $(du -sh "$VENV" 2>/dev/null | cut -f1)"
step_done

# ---------------------------------------------------------------------------------------------------------------------
step "build ppml._C against torch $FLOOR_TORCH (CUDA arch $PPML_CUDA_ARCH)"
SRC=$(mktemp -d "${TMPDIR:-/tmp}/ppml-floor-src.XXXXXX")
# Tracked plus untracked-not-ignored files, as they are in the working tree (build/, *.so, _build_info.json stay out).
git -C "$REPO" ls-files -z --cached --others --exclude-standard --deduplicate \
    | tar -C "$REPO" --null --ignore-failed-read -T - -cf - | tar -C "$SRC" -xf - \
    || die "copying the checkout to $SRC failed"
echo "floor: source copy $SRC; nvcc: $( (nvcc --version 2>/dev/null || /usr/local/cuda/bin/nvcc --version) | tail -1)"
BUILD_LOG=$VENV/ppml-build.log
if ! (cd "$SRC" && "$VPY" -m pip install -v --no-build-isolation --no-deps --force-reinstall .) >"$BUILD_LOG" 2>&1; then
    tail -n 80 "$BUILD_LOG"
    die "building ppml against torch $FLOOR_TORCH failed (full log: $BUILD_LOG)"
fi
# setup.py's own lines (once: pip runs it twice) and one line per ninja step; the full log stays in $BUILD_LOG.
grep -E '^ *ppml:|\[[0-9]+/[0-9]+\] ' "$BUILD_LOG" \
    | sed -E 's/^ +//; s/^(\[[0-9]+\/[0-9]+\] [^ ]+).* -c ([^ ]+).*/\1 \2/' \
    | awk '!seen[$0]++' || true
step_done

# ---------------------------------------------------------------------------------------------------------------------
step "the installed ppml is the floor build"
# From the copy's tests/ dir, as pytest will import it: must be the venv's ppml, with _C loaded and CUDA kernels in.
(cd "$SRC/tests" && "$VPY" - "$VENV" "$FLOOR_TORCH_VERSION") <<'EOF' \
    || die "the floor venv's ppml is not the floor build"
import os, sys, torch, ppml
from ppml import _extension
venv, want = sys.argv[1:3]
info = _extension.build_info()
print(f"floor: ppml from {os.path.dirname(ppml.__file__)}; build info {info}")
problems = []
if not os.path.realpath(ppml.__file__).startswith(os.path.realpath(venv) + os.sep):
    problems.append("ppml does not come from the floor venv")
if not _extension.native_loaded():
    problems.append(f"ppml._C did not load: {_extension.load_reason()}")
if info.get("torch") != want or not info.get("cuda"):
    problems.append(f"_build_info.json should say torch {want} with CUDA kernels")
for op in ("shuffle_patches", "shuffle_patches.out", "mix_subpatches", "anchor_loss"):
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ppml::{op}", "CUDA"):
        problems.append(f"no CUDA kernel registered for ppml::{op}")
for p in problems:
    print("floor: " + p, file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
step_done

# ---------------------------------------------------------------------------------------------------------------------
# Test steps run on after a failure (so one CI log shows every failure); the script fails at the end.
run_pytest() {
    local name=$1
    shift
    step "$name"
    if (cd "$SRC" && "$@"); then :; else FAILED+=("$name"); fi
    step_done
}
PYTEST=("$VENV/bin/pytest" -p no:cacheprovider)  # the script, not `python -m pytest`: the cwd must not shadow ppml
OP_TESTS=(tests/test_shuffle_patches.py tests/test_mix_subpatches.py tests/test_anchor_loss.py tests/test_build.py
          tests/test_augment.py)
TRITON_TESTS=(tests/test_shuffle_patches_triton.py tests/test_mix_subpatches_triton.py tests/test_anchor_loss_triton.py)

run_pytest "op, bad-input and build tests" env PPML_REQUIRE_NATIVE=1 "${PYTEST[@]}" "${OP_TESTS[@]}"
run_pytest "Triton $FLOOR_TRITON AOT compile (sm_90)" env PPML_REQUIRE_NATIVE=1 "${PYTEST[@]}" -k aot \
    "${TRITON_TESTS[@]}"
run_pytest "Triton $FLOOR_TRITON interpreter" env PPML_REQUIRE_NATIVE=1 TRITON_INTERPRET=1 "${PYTEST[@]}" -m triton \
    "${TRITON_TESTS[@]}"

# ---------------------------------------------------------------------------------------------------------------------
step "a _C built for another torch is refused, with the reason"
# For real, both ways, when the host python has another torch: each side imports the other's ppml package (copied
# with its _C and _build_info.json into a scratch dir put first on sys.path) and must refuse its _C.
XDIR=$(mktemp -d "${TMPDIR:-/tmp}/ppml-floor-x.XXXXXX")
CHECK='
import os, sys
sys.path.insert(0, sys.argv[1])
import torch, ppml
from ppml import _extension
built = sys.argv[2]
reason = _extension.load_reason() or ""
shown = reason or "LOADED (not refused)"
print(f"floor: torch {torch.__version__}, {os.path.dirname(ppml.__file__)}/_C built for torch {built}: {shown}")
ok = (os.path.dirname(ppml.__file__) == os.path.join(sys.argv[1], "ppml") and not _extension.native_loaded()
      and f"built against torch {built} but torch {torch.__version__} is running" in reason)
sys.exit(0 if ok else 1)
'
host_torch=$(cd "$XDIR" && "$HOST_PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [[ -z $host_torch || $host_torch == "$FLOOR_TORCH_VERSION" ]]; then
    echo "floor: skipped: $HOST_PY has torch '${host_torch:-none}', not another version (test_build.py's" \
         "test_extension_for_another_torch_is_refused covers the logic)"
else
    SITE=$(cd "$XDIR" && "$VPY" -c 'import os, ppml; print(os.path.dirname(os.path.dirname(ppml.__file__)))')
    mkdir "$XDIR/floor" && cp -r "$SITE/ppml" "$XDIR/floor/"
    (cd "$XDIR" && "$HOST_PY" -c "$CHECK" "$XDIR/floor" "$FLOOR_TORCH_VERSION") \
        || FAILED+=("refusal: floor _C in host torch")
    # The host's installed ppml (CI's `pip install .`), when it has a _C; not the checkout, which the cwd would give.
    host_pkg=$(cd "$XDIR" && "$HOST_PY" -c '
import importlib.util as u, os
s = u.find_spec("ppml")
d = os.path.dirname(s.origin) if s and s.origin else ""
print(d if os.path.exists(os.path.join(d, "_build_info.json")) and u.find_spec("ppml._C") else "")' 2>/dev/null || true)
    if [[ -n $host_pkg ]]; then
        mkdir "$XDIR/host" && cp -r "$host_pkg" "$XDIR/host/ppml"
        (cd "$XDIR" && "$VPY" -c "$CHECK" "$XDIR/host" "$host_torch") || FAILED+=("refusal: host _C in floor torch")
    else
        echo "floor: host ppml with a _C not installed; checked one way only"
    fi
fi
step_done

# ---------------------------------------------------------------------------------------------------------------------
printf '\n=== floor: summary (torch %s, triton %s, CUDA arch %s) ===\n' "$FLOOR_TORCH_VERSION" "$FLOOR_TRITON" \
    "$PPML_CUDA_ARCH"
printf '  %s\n' "${TIMES[@]}"
printf '  %-58s %5ds\n' "total" $((SECONDS - T0))
if ((${#FAILED[@]})); then
    printf 'floor: FAILED: %s\n' "${FAILED[@]}" >&2
    exit 1
fi
echo "floor: OK"
