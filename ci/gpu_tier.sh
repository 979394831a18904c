#!/usr/bin/env bash
# GPU tier: the checks only a GPU can do, in order of value, each under its own time budget,
# results written into OUTDIR as they come (docs/gpu.md).
#
#   ci/gpu_tier.sh OUTDIR             run it (from the repository root, on the GPU machine)
#   ci/gpu_tier.sh --dry-run OUTDIR   on any machine: install .whl/ into a fresh folder, import
#                                     what the tier imports, check each step's command, print
#                                     the plan; exit 0 if the tier would start
#   ci/gpu_tier.sh --plan             print the plan only
#
# The GPU machine is offline. ci/gpu_prepare.sh (where a package index is reachable) puts the
# wheels it lacks (array-api-compat, array-api-strict) into .whl/, which travels with the
# working tree; the first step installs the missing modules from there with pip --no-index
# --no-deps --target into a scratch folder put on PYTHONPATH after the repository root, so the
# system site-packages stay untouched and xbn is imported from the working tree.
#
# Steps (budgets in seconds on an H100/H200; see the plan printed by --plan): deps, env
# (nvidia-smi, versions), pytest (the CuPy tier: tests naming cupy, the CUDA kernel tests
# first), parity (xbn parity --backend cupy), bench (xbn bench --gpu, planned within its
# budget), sanitize (ci/sanitize_kernels.py without a sanitizer: compiles the kernels into
# CuPy's cache and checks the script), compute-sanitizer memcheck, racecheck, synccheck and
# initcheck over it, and nvrtc (ci/check_kernels.py with the machine's NVRTC; CI runs it too). A step that overruns its budget is interrupted (SIGINT, then SIGKILL 5 s
# later) and the run goes on. A sanitizer that is absent or refuses the device is recorded as
# "skipped: <its message>", not as a failure; a refusal skips the remaining tools too.
#
# OUTDIR gets at most 8 files, none over 16 MiB, no subfolders (they are meant to be
# committed): summary.json (rewritten after every step, so a stopped run still leaves what
# finished), env.log, tests.log, bench.log, bench.json, sanitizer.log. Exit status 0 when
# every step that ran passed (summary.json's "problems" lists what did not).
#
# Environment: PYTHON (default: the active virtual environment's, else .venv/bin/python, else
# python3), XBN_WHEELS (default .whl), XBN_COMMIT (recorded as the commit when the tree has no
# .git), COMPUTE_SANITIZER (the binary, if not on PATH or under $CUDA_HOME/bin),
# XBN_TIER_BUDGETS and XBN_TIER_ONLY (below).
set -uo pipefail

MODE=run
case "${1:-}" in
    --dry-run) MODE=dry; shift ;;
    --plan) MODE=plan; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
if [ "$MODE" != plan ] && [ $# -ne 1 ]; then
    echo "usage: ci/gpu_tier.sh [--dry-run] OUTDIR | --plan" >&2
    exit 2
fi
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
# The interpreter: $PYTHON, else the active virtual environment's, else the repository's .venv,
# else python3 (the GPU machine's system Python).
PY=${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHEELS=${XBN_WHEELS:-$ROOT/.whl}

# -- the plan ----------------------------------------------------------------------------------
STEPS=(deps env pytest parity sync bench demo sanitize memcheck racecheck synccheck initcheck nvrtc)
declare -A BUDGET=([deps]=8 [env]=12 [pytest]=65 [parity]=15 [sync]=15 [bench]=40 [demo]=30
                   [sanitize]=10 [memcheck]=20 [racecheck]=25 [synccheck]=12 [initcheck]=15 [nvrtc]=20)
declare -A LOG=([deps]=env.log [env]=env.log [pytest]=tests.log [parity]=tests.log [sync]=tests.log
                [bench]=bench.log [demo]=bench.log [sanitize]=sanitizer.log [memcheck]=sanitizer.log
                [racecheck]=sanitizer.log [synccheck]=sanitizer.log [initcheck]=sanitizer.log
                [nvrtc]=tests.log)
declare -A WHAT=(
    [deps]="install what is missing from .whl/ (offline, --target a scratch folder)"
    [env]="nvidia-smi, driver, CUDA, CuPy, torch, xbn info"
    [pytest]="pytest --backend cupy -k cupy, tests/test_kernels_cupy*.py first"
    [parity]="xbn parity --backend cupy"
    [sync]="ci/gpu_sync_check.py: SyncBatchNorm on CuPy over NCCL and MPI host staging, world of one"
    [demo]="xbn demo --model cnn, 3 epochs on NumPy and CuPy: seconds per epoch into summary.json"
    [bench]="xbn bench --gpu: reference shapes, K launches per event pair, vs torch and generic"
    [sanitize]="ci/sanitize_kernels.py alone: compile, coverage, results"
    [memcheck]="compute-sanitizer --tool memcheck, representative set"
    [racecheck]="compute-sanitizer --tool racecheck, representative set"
    [synccheck]="compute-sanitizer --tool synccheck, representative set"
    [initcheck]="compute-sanitizer --tool initcheck, representative set"
    [nvrtc]="ci/check_kernels.py for this GPU's arch with this machine's NVRTC"
)
FILES=(summary.json env.log tests.log bench.log bench.json sanitizer.log)
# Modules the tier imports (the GPU machine lacks the two array-api ones); module=distribution.
NEED=(numpy=numpy pytest=pytest hypothesis=hypothesis array_api_compat=array-api-compat
      array_api_strict=array-api-strict)
GRACE=5            # seconds between SIGINT and SIGKILL at a step's budget
CAP=3000000        # bytes of one step's output kept in its bundled log (head and tail)
BENCH_STARTUP=8    # seconds of the bench's budget left for Python, CuPy and torch to start

# XBN_TIER_BUDGETS="pytest=120,bench=60" changes budgets (a slower GPU); XBN_TIER_ONLY=
# "memcheck,racecheck" runs only those steps besides deps (the others are recorded as skipped).
if [ -n "${XBN_TIER_BUDGETS:-}" ]; then
    IFS=, read -ra pairs <<< "$XBN_TIER_BUDGETS"
    for kv in "${pairs[@]}"; do
        k=${kv%%=*} v=${kv#*=}
        if [ -z "${BUDGET[$k]+set}" ] || ! [[ $v =~ ^[0-9]+$ ]] || [ "$v" -le 5 ]; then
            echo "gpu_tier: XBN_TIER_BUDGETS: '$kv' is not STEP=SECONDS (> 5) for a step of: ${STEPS[*]}" >&2
            exit 2
        fi
        BUDGET[$k]=$v
    done
fi
selected() { [ "$1" = deps ] || [ -z "${XBN_TIER_ONLY:-}" ] || [[ ",$XBN_TIER_ONLY," == *",$1,"* ]]; }

planned_total() {
    local total=0 s
    for s in "${STEPS[@]}"; do
        if selected "$s"; then total=$((total + BUDGET[$s])); fi
    done
    echo "$total"
}

print_plan() {
    local s
    echo "plan (budgets in seconds on an H100/H200; each step is stopped at its budget):"
    for s in "${STEPS[@]}"; do
        if selected "$s"; then
            printf '  %-10s %4d s  %-14s %s\n' "$s" "${BUDGET[$s]}" "${LOG[$s]}" "${WHAT[$s]}"
        else
            printf '  %-10s    - s  %-14s not selected (XBN_TIER_ONLY)\n' "$s" "${LOG[$s]}"
        fi
    done
    echo "files in OUTDIR: ${FILES[*]} (${#FILES[@]} of at most 8)"
    echo "planned total: $(planned_total) s"
}

if [ "$MODE" = plan ]; then
    print_plan
    exit 0
fi

mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/xbn-gpu-tier.XXXXXX") || exit 2
DEPS=$SCRATCH/pydeps
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONPATH="$ROOT:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore

tier() {  # tier ARGS...: the bookkeeping in xbn/bench/gpu.py, loaded without xbn/__init__.py
    "$PY" - "$@" <<'EOF'
import importlib.util, sys
# xbn/__init__.py needs array-api-compat: enter xbn as a bare package shell, so the bookkeeping
# (numpy and the standard library only) runs even where the dependencies are missing.
spec = importlib.util.spec_from_file_location("xbn", "xbn/__init__.py", submodule_search_locations=["xbn"])
sys.modules["xbn"] = importlib.util.module_from_spec(spec)
from xbn.bench import gpu
sys.exit(gpu.tier_main(sys.argv[1:]))
EOF
}

missing_modules() {  # the distributions of NEED whose module does not import here
    "$PY" - "${NEED[@]}" <<'EOF'
import importlib.util, sys
pairs = [a.split("=", 1) for a in sys.argv[1:]]
print(" ".join(dist for mod, dist in pairs if importlib.util.find_spec(mod) is None))
EOF
}

install_wheels() {  # install_wheels DIST...: from $WHEELS, offline, into $DEPS
    if ! compgen -G "$WHEELS/*.whl" > /dev/null; then
        echo "gpu_tier: missing Python packages: $*"
        echo "gpu_tier: no wheels in $WHEELS: run ci/gpu_prepare.sh where a package index is" \
             "reachable and carry .whl/ with the working tree"
        return 3
    fi
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps \
        --find-links "$WHEELS" --target "$DEPS" "$@"
}

SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}
for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /opt/cuda; do
    if [ -z "$SANITIZER" ] && [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ]; then
        SANITIZER=$d/bin/compute-sanitizer
    fi
done

pytest_args() {  # the CuPy tier: kernel test files first (pytest keeps the order of files)
    local first=(tests/test_kernels_cupy.py tests/test_kernels_cupy_wrappers.py tests/test_cupy_launch.py)
    local f files=()
    for f in "${first[@]}"; do [ -f "$f" ] && files+=("$f"); done
    for f in tests/test_*.py; do
        case " ${first[*]} " in *" $f "*) ;; *) files+=("$f") ;; esac
    done
    echo -q -ra -p no:cacheprovider --backend cupy -k cupy "${files[@]}"
}

# -- dry run -----------------------------------------------------------------------------------
if [ "$MODE" = dry ]; then
    failed=0
    check() {  # check WHAT COMMAND...: run quietly, print ok / FAILED with the output's tail
        local what=$1 out
        shift
        if out=$("$@" 2>&1); then
            printf '  ok      %s\n' "$what"
        else
            printf '  FAILED  %s\n' "$what"
            printf '%s\n' "$out" | tail -n 15 | sed 's/^/          /'
            failed=1
        fi
    }
    note() { printf '  note    %s\n' "$1"; }
    echo "gpu_tier dry run: $ROOT, $("$PY" -c 'import sys; print(sys.version.split()[0])') at $PY"
    dists=()
    for pair in "${NEED[@]}"; do
        case "$pair" in array_api*) dists+=("${pair#*=}") ;; esac
    done
    check "deps: pip install --no-index --no-deps --target <fresh folder> ${dists[*]} from $WHEELS" \
        install_wheels "${dists[@]}"
    check "deps: array_api_compat and array_api_strict import from that folder" \
        "$PY" -c "
import sys, array_api_compat, array_api_strict
for m in (array_api_compat, array_api_strict):
    assert m.__file__.startswith('$DEPS/'), f'{m.__name__} came from {m.__file__}, not the wheels'
print(array_api_compat.__version__, array_api_strict.__version__)"
    check "imports: every module the tier imports (CuPy without its GPU parts)" \
        "$PY" -c "
import numpy, pytest, hypothesis, cupy, torch, array_api_compat, array_api_strict
import xbn, xbn.backends, xbn.info, xbn.parity, xbn.bench.gpu, xbn.kernels.cupy, xbn.kernels._launch"
    check "bookkeeping: summary.json written without xbn/__init__.py" tier init --out "$OUT" \
        --planned-s "$(planned_total)"
    check "step tool: coreutils timeout" command -v timeout
    check "step deps: python -m pip" "$PY" -m pip --version
    if command -v nvidia-smi > /dev/null; then
        check "step env: nvidia-smi" nvidia-smi -L
    else
        note "step env: nvidia-smi not found here (the GPU machine has it)"
    fi
    check "step env: python -m xbn info" "$PY" -m xbn info
    # shellcheck disable=SC2046  # word splitting of the argument list is intended
    check "step pytest: the CuPy tier collects tests" "$PY" -m pytest --collect-only $(pytest_args)
    check "step parity: python -m xbn parity --help" "$PY" -m xbn parity --help
    check "step sync: ci/gpu_sync_check.py --dry-run --no-mpi" "$PY" ci/gpu_sync_check.py --dry-run --no-mpi
    check "step demo: python -m xbn demo --help" "$PY" -m xbn demo --help
    check "step bench: xbn bench --gpu -- --plan" "$PY" -m xbn bench --gpu -- --plan \
        --budget-s "$((BUDGET[bench] - BENCH_STARTUP))"
    check "step sanitize: ci/sanitize_kernels.py --list" "$PY" ci/sanitize_kernels.py --list
    check "step nvrtc: ci/check_kernels.py loads without array-api-compat" "$PY" -c '
import runpy, sys
sys.modules["array_api_compat"] = None  # what the GPU machine lacks
sys.argv = ["check_kernels.py", "--help"]
runpy.run_path("ci/check_kernels.py", run_name="__main__")'
    if [ -n "$SANITIZER" ]; then
        check "steps memcheck ... initcheck: $SANITIZER" "$SANITIZER" --version
    else
        note "steps memcheck ... initcheck: compute-sanitizer not found here (recorded as skipped)"
    fi
    for s in "${STEPS[@]}"; do
        tier record --out "$OUT" --step "$s" --skipped "dry run" \
            --kind "$(case $s in memcheck|racecheck|synccheck|initcheck) echo sanitizer ;; *) echo plain ;; esac)" \
            > /dev/null || failed=1
    done
    print_plan
    exit "$failed"
fi

# -- the run -----------------------------------------------------------------------------------
for f in "${FILES[@]}"; do rm -f "$OUT/$f"; done
tier init --out "$OUT" --planned-s "$(planned_total)" \
    --plan "$(for s in "${STEPS[@]}"; do printf '%s=%s,' "$s" "${BUDGET[$s]}"; done)"
T_START=$SECONDS
CHILD=
CURRENT='' CURRENT_KIND=plain STEP_T0=0 VERDICT=''

bundle() {  # bundle STEP SCRATCH_LOG RC SECONDS: append a step's log to its file in OUT, capped
    local dest=$OUT/${LOG[$1]} size
    size=$(wc -c < "$2")
    {
        printf '\n===== %s: exit %s after %s s (budget %s s)\n' "$1" "$3" "$4" "${BUDGET[$1]}"
        if [ "$size" -le "$CAP" ]; then
            cat "$2"
        else
            head -c $((CAP / 2)) "$2"
            printf '\n===== [%s bytes cut] =====\n' "$((size - CAP))"
            tail -c $((CAP / 2)) "$2"
        fi
    } >> "$dest"
}

on_signal() {  # stopped from outside: keep what the current step wrote, record it, stop
    trap - INT TERM
    # SIGINT to timeout goes on to the step (pytest still prints its summary), SIGKILL follows
    # GRACE seconds later.
    if [ -n "$CHILD" ]; then kill -INT "$CHILD" 2> /dev/null; { wait "$CHILD"; } 2> /dev/null; fi
    if [ -n "$CURRENT" ]; then
        bundle "$CURRENT" "$SCRATCH/$CURRENT.log" 143 "$((SECONDS - STEP_T0))"
        tier record --out "$OUT" --step "$CURRENT" --kind "$CURRENT_KIND" --rc 143 \
            --seconds "$((SECONDS - STEP_T0))" --log "$SCRATCH/$CURRENT.log" \
            --set "stopped=the tier was stopped from outside" > /dev/null
    fi
    tier verdict --out "$OUT"
    exit 143
}
trap on_signal INT TERM

run_step() {  # run_step STEP KIND COMMAND...: under the step's budget; log; record; echo verdict
    local step=$1 kind=$2 rc
    shift 2
    local budget=${BUDGET[$step]} log=$SCRATCH/$step.log
    if ! selected "$step"; then
        skip_step "$step" "$kind" "not selected (XBN_TIER_ONLY=$XBN_TIER_ONLY)"
        return 0
    fi
    echo "== $step (budget $budget s): $*"
    CURRENT=$step CURRENT_KIND=$kind STEP_T0=$SECONDS
    local cmd=("$@")
    if declare -F "$1" > /dev/null; then  # a function of this script: bash -c with its context
        cmd=(bash -c "$(declare -p PY WHEELS DEPS NEED OUT SANITIZER DEPS_OK 2> /dev/null)
$(declare -f)
$*")
    fi
    # In the background so that a signal to the tier is handled at once (on_signal).
    timeout --signal=INT --kill-after="$GRACE" "$((budget - GRACE))" "${cmd[@]}" > "$log" 2>&1 < /dev/null &
    CHILD=$!
    { wait "$CHILD"; } 2> /dev/null  # (without bash's "Killed" notice: the log says it)
    rc=$?
    CHILD=
    local dt=$((SECONDS - STEP_T0))
    bundle "$step" "$log" "$rc" "$dt"
    CURRENT=
    echo "   exit $rc after $dt s$( [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo ' (stopped at its budget)')"
    VERDICT=$(tier record --out "$OUT" --step "$step" --kind "$kind" --rc "$rc" --seconds "$dt" \
        --budget "$budget" --log "$log")
    [ -n "$VERDICT" ] && echo "$VERDICT"
    return 0
}

skip_step() {  # skip_step STEP KIND REASON
    echo "== $1: skipped: $3"
    printf '\n===== %s: skipped: %s\n' "$1" "$3" >> "$OUT/${LOG[$1]}"
    tier record --out "$OUT" --step "$1" --kind "$2" --skipped "$3" > /dev/null
}

# 1. dependencies
deps() {
    local missing
    missing=$(missing_modules)
    if [ -z "$missing" ]; then
        echo "every module the tier needs imports already: nothing to install"
        return 0
    fi
    echo "missing here: $missing; installing from $WHEELS into $DEPS"
    # shellcheck disable=SC2086  # one word per distribution
    install_wheels $missing || return $?
    missing=$(missing_modules)
    [ -z "$missing" ] || { echo "still missing after the install: $missing"; return 4; }
}
run_step deps plain deps
DEPS_OK=1
MISSING=$(missing_modules)
if [ -n "$MISSING" ]; then
    DEPS_OK=0
    echo "gpu_tier: Python packages missing (see $OUT/env.log): the steps that import xbn are" \
         "skipped; run ci/gpu_prepare.sh where a package index is reachable, carry .whl/"
fi

# 2. environment
env_report() {
    nvidia-smi || echo "nvidia-smi: not usable here"
    tier env --out "$OUT"
    local rc=$?
    if [ "$DEPS_OK" = 1 ]; then "$PY" -m xbn info; fi
    if [ -n "$SANITIZER" ]; then "$SANITIZER" --version; else echo "compute-sanitizer: not found"; fi
    if command -v ncu > /dev/null; then ncu --version; else echo "ncu: not found"; fi
    "$PY" -m pip list --disable-pip-version-check 2> /dev/null \
        | grep -iE '^(numpy|cupy|torch|numba|ml.dtypes|pytest|hypothesis|array.api|nvidia-cuda)' || true
    return "$rc"
}
run_step env plain env_report

need_deps() {  # need_deps STEP KIND COMMAND...: run the step if xbn imports, else skip it
    if [ "$DEPS_OK" = 1 ]; then run_step "$@"; else skip_step "$1" "$2" "Python packages missing: $MISSING"; fi
}

# 3. tests, 4. parity, 5. benchmark
# shellcheck disable=SC2046  # word splitting of the argument list is intended
need_deps pytest pytest "$PY" -m pytest $(pytest_args)
need_deps parity plain "$PY" -m xbn parity --backend cupy
sync_check() {  # MPI is optional on the GPU machine: without a loadable MPI library, NCCL alone
    if "$PY" -c "from mpi4py import MPI" > /dev/null 2>&1; then
        "$PY" ci/gpu_sync_check.py
    else
        echo "mpi4py finds no MPI library here: the MPICommunicator checks are skipped"
        "$PY" ci/gpu_sync_check.py --no-mpi
    fi
}
need_deps sync plain sync_check
need_deps bench plain "$PY" -m xbn bench --gpu -- --out "$OUT" --name bench --outputs json \
    --summary "$OUT/summary.json" --budget-s "$((BUDGET[bench] - BENCH_STARTUP))"

demo_cnn() {  # seconds per epoch of xbn demo --model cnn on NumPy and CuPy, into summary.json
    local dir b rc=0 sets=()
    "$PY" -c "import sklearn, matplotlib, tqdm, threadpoolctl" || { echo "the demo needs scikit-learn, matplotlib, tqdm, threadpoolctl"; return 3; }
    dir=$(mktemp -d) || return 2
    for b in numpy cupy; do
        "$PY" -m xbn demo --model cnn --backend "$b" --epochs 3 --quiet --out "$dir/$b" --json "$dir/$b.json" || rc=1
        [ -f "$dir/$b.json" ] && sets+=(--set "demo_cnn_${b}_s_per_epoch=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["median_epoch_seconds"])' "$dir/$b.json")")
    done
    tier record --out "$OUT" --step demo ${sets[@]+"${sets[@]}"} > /dev/null
    rm -rf "$dir"
    return "$rc"
}
need_deps demo plain demo_cnn

# 6. compute-sanitizer over the representative set
need_deps sanitize plain "$PY" ci/sanitize_kernels.py
refused=
for tool in memcheck racecheck synccheck initcheck; do
    if [ "$DEPS_OK" != 1 ]; then
        skip_step "$tool" sanitizer "Python packages missing: $MISSING"
    elif [ -z "$SANITIZER" ]; then
        skip_step "$tool" sanitizer "compute-sanitizer not found (set COMPUTE_SANITIZER)"
    elif [ -n "$refused" ]; then
        skip_step "$tool" sanitizer "$refused"
    else
        extra=()
        [ "$tool" = racecheck ] && extra=(--racecheck-report all)
        run_step "$tool" sanitizer "$SANITIZER" --tool "$tool" --error-exitcode 1 \
            --report-api-errors no ${extra[@]+"${extra[@]}"} "$PY" ci/sanitize_kernels.py
        case "$VERDICT" in *": skipped: "*) refused="refused on this host (see $tool): ${VERDICT#*skipped: }" ;; esac
    fi
done

# 7. the NVRTC compile check with this machine's NVRTC, for this GPU's architecture (no xbn import)
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -n 1 | tr -d ' .')
[[ $cap =~ ^[0-9]+$ ]] || cap=90
run_step nvrtc plain "$PY" ci/check_kernels.py --arch "sm_$cap"

echo
echo "== summary: $OUT/summary.json ($((SECONDS - T_START)) s of $(planned_total) s planned)"
tier verdict --out "$OUT" --elapsed "$((SECONDS - T_START))"
