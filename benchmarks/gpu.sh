#!/usr/bin/env bash
# Every GPU figure of fastclip in one short run (well under 8 minutes), for a GPU machine that starts
# bare with the working tree copied in:
#
#     bash benchmarks/gpu.sh OUT_DIR                  # install, print the machine, run every step
#     bash benchmarks/gpu.sh OUT_DIR --only loss,train
#     bash benchmarks/gpu.sh --dry-run OUT_DIR        # the plan only: no install, nothing run
#
# 1. installs the working tree (pip install -e . --no-deps when the dependencies already import,
#    else with them; pytest and pytest-benchmark if missing), every attempt bounded by `timeout`
#    and logged to OUT_DIR/install.log; a failed install is printed and recorded, and the run goes
#    on with the working tree on PYTHONPATH;
# 2. prints the machine: nvidia-smi, torch / CUDA / triton versions, `python -m fastclip.info`,
#    and says what is missing (torch, a CUDA build, a visible device);
# 3. runs benchmarks/gpu_run.py (the steps, their commands and per-step timeouts: its docstring,
#    or --dry-run), which writes each step's JSON/XML and log and OUT_DIR/summary.json.
#
# The whole script is held under FASTCLIP_GPU_TOTAL_S seconds (default 470, under 8 minutes): the
# driver's budget is what the install and the machine print left of it (at most 450 s, or
# --budget-s), and the driver runs under an outer `timeout`.  Only an install that must download
# the dependencies (torch itself) can push it past that: each pip call has its own time limit.
# Exit status: the driver's (0 when every step is ok or skipped, e.g. without CUDA).
set -u -o pipefail

# No cd: OUT_DIR is relative to where this is started, as for any command.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
DRIVER="$HERE/gpu_run.py"
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3

# Only what this script needs from the arguments; gpu_run.py parses (and checks) them all.
DRY=0 OUT="" USER_BUDGET=""
prev=""
for a in "$@"; do
    case "$prev" in
        --budget-s) USER_BUDGET=$a; prev=""; continue ;;
        --only) prev=""; continue ;;
    esac
    case "$a" in
        --dry-run|-h|--help) DRY=1 ;;
        --budget-s|--only) prev=$a ;;
        --budget-s=*) USER_BUDGET=${a#--budget-s=} ;;
        -*) ;;
        *) [ -z "$OUT" ] && OUT=$a ;;
    esac
done
if [ "$DRY" = 1 ] || [ -z "$OUT" ]; then
    exec "$PY" "$DRIVER" "$@"  # the plan, the help, or the driver's usage error
fi

# Check every argument before spending minutes on the install (the driver's --dry-run parses them).
"$PY" "$DRIVER" "$@" --dry-run >/dev/null || exit 2

START=$SECONDS
TOTAL_S=${FASTCLIP_GPU_TOTAL_S:-470}
mkdir -p "$OUT" || { echo "gpu.sh: cannot create OUT_DIR $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/install.log"
: >"$LOG"

echo "== machine"
timeout 30 nvidia-smi 2>&1 || echo "nvidia-smi: not found or failed: no NVIDIA driver visible here"

torch_line() {
    timeout 120 "$PY" - <<'EOF' 2>&1
try:
    import torch
except Exception as exc:
    print(f"MISSING torch: it does not import ({type(exc).__name__}: {exc})")
    raise SystemExit(0)
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
      f"torch.cuda.is_available() = {torch.cuda.is_available()}")
if torch.version.cuda is None:
    print("MISSING a CUDA build of torch: this one is CPU-only")
elif not torch.cuda.is_available():
    print("MISSING a CUDA device: torch has CUDA but sees no device (driver? CUDA_VISIBLE_DEVICES?)")
else:
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as exc:
    print(f"MISSING triton ({type(exc).__name__}: {exc})")
EOF
}

echo "== python: $("$PY" --version 2>&1) ($(command -v "$PY"))"
torch_line

echo "== install (log: $LOG)"
pip_install() {  # pip_install SECONDS ARGS...: bounded by `timeout`, logged; pip's exit status
    local limit=$1; shift
    echo "\$ pip install $*" >>"$LOG"
    timeout "$limit" "$PY" -m pip install --disable-pip-version-check --retries 1 --timeout 20 "$@" \
        >>"$LOG" 2>&1
    local rc=$?
    [ "$rc" = 124 ] && echo "   (stopped after ${limit} s)" >>"$LOG"
    return "$rc"
}
# setuptools >= 64 already here: no isolated build env to download (the machine may have no network)
ISOLATION=""
"$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" 2>/dev/null \
    && ISOLATION="--no-build-isolation"
if "$PY" -c "import torch, triton, numpy, tokenizers, ftfy, PIL, yaml, tqdm" >/dev/null 2>&1; then
    HOW="pip install -e . --no-deps $ISOLATION"
    pip_install 120 -e "$REPO" --no-deps $ISOLATION
else
    MISSING=$("$PY" - <<'EOF' 2>&1
import importlib.util
names = {"torch": "torch", "triton": "triton", "numpy": "numpy", "tokenizers": "tokenizers",
         "ftfy": "ftfy", "PIL": "pillow", "yaml": "pyyaml", "tqdm": "tqdm"}
print(" ".join(p for m, p in names.items() if importlib.util.find_spec(m) is None))
EOF
)
    echo "dependencies missing: $MISSING; installing with them (needs a reachable package index)"
    HOW="pip install -e . $ISOLATION (missing: $MISSING)"
    pip_install 300 -e "$REPO" $ISOLATION
fi
RC=$?
if [ "$RC" = 0 ]; then
    INSTALL="ok: $HOW"
else
    INSTALL="FAILED (exit $RC): $HOW; see install.log; running the working tree from PYTHONPATH"
fi
if ! "$PY" -c "import pytest, pytest_benchmark" >/dev/null 2>&1; then
    if pip_install 120 pytest pytest-benchmark; then
        INSTALL="$INSTALL; ok: pip install pytest pytest-benchmark"
    else
        INSTALL="$INSTALL; FAILED: pip install pytest pytest-benchmark (the benchmark steps will fail)"
    fi
fi
echo "$INSTALL"
export FASTCLIP_GPU_INSTALL="$INSTALL"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

echo "== after the install"
torch_line
timeout 60 "$PY" -m fastclip.info 2>&1 || echo "python -m fastclip.info failed (above: why)"

ELAPSED=$((SECONDS - START))
# The driver keeps to its budget; the outer timeout (budget + 5 s, then 15 s to stop) is the net.
BUDGET=$((TOTAL_S - ELAPSED - 20))
[ "$BUDGET" -gt 450 ] && BUDGET=450
if [ "$BUDGET" -lt 30 ]; then
    echo "gpu.sh: the install took ${ELAPSED} s of ${TOTAL_S}; running with the minimum budget of 30 s"
    BUDGET=30
fi
if [ -n "$USER_BUDGET" ]; then  # already checked positive by the driver
    BUDGET=$("$PY" -c "import sys, math; print(max(1, math.ceil(min(map(float, sys.argv[1:])))))" \
             "$USER_BUDGET" "$BUDGET")
fi
echo "== steps: budget ${BUDGET} s (${ELAPSED} s spent so far of ${TOTAL_S})"
# The driver's own --budget-s goes last so that it wins over the one in "$@".
timeout -k 15 $((BUDGET + 5)) "$PY" "$DRIVER" "$@" --budget-s "$BUDGET"
RC=$?
[ "$RC" = 124 ] && echo "gpu.sh: the driver ran past its budget and was stopped;" \
    "$OUT/summary.json has the steps that ended"
echo "== done in $((SECONDS - START)) s; summary: $OUT/summary.json"
exit "$RC"
