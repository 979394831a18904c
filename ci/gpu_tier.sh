#!/usr/bin/env bash
# GPU tier: everything REFERENCE.md D asks of a GPU run, in one command, logged into OUTDIR.
#
#   ci/gpu_tier.sh OUTDIR
#
# Runs from the source tree (PYTHONPATH=., no install) on a machine with an NVIDIA GPU, its
# driver, CuPy (cupy-cuda13x >= 14 or cupy-cuda12x) and torch with CUDA:
#   1. env.log             nvidia-smi, versions, xbn info
#   2. check_kernels.log   the NVRTC compile check (registers, spills) with this machine's NVRTC
#   3. pytest.log          the whole suite with the CuPy tier (--backend cupy), including
#                          tests/test_kernels_cupy.py; junit XML in pytest.xml
#   4. parity.log          xbn parity --backend cupy (if xbn/parity.py exists); parity.json
#   5. sanitize-*.log      compute-sanitizer memcheck, racecheck, synccheck, initcheck over
#                          ci/sanitize_kernels.py (every kernel, every dtype)
#   6. bench.log           xbn bench --gpu; tables, JSON and plot in OUTDIR/bench
#   summary.txt            one line per step with its exit status
# Exit status 0 only if every step passed. Commit the evidence afterwards, e.g.
#   cp OUTDIR/bench/gpu.* benchmarks/results/ && cp OUTDIR/*.log benchmarks/results/gpu-tier/
#
# Python dependencies: the GPU machine may lack some of them and may have no internet. Carry
# wheels: on a connected machine with the same Python version,
#   pip download --only-binary=:all: -d .whl array-api-compat pytest hypothesis array-api-strict
# and copy the .whl directory (git-ignored) along with the tree. Missing modules are installed
# from it (pip --no-index --target OUTDIR/pydeps, added to PYTHONPATH; nothing else changes).
# Set XBN_WHEELS to use another directory, PYTHON to use another interpreter, and
# COMPUTE_SANITIZER to the compute-sanitizer binary if it is not on PATH or in $CUDA_HOME/bin.
set -uo pipefail

OUT=${1:?usage: ci/gpu_tier.sh OUTDIR}
cd "$(dirname "$0")/.."
ROOT=$PWD
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
WHEELS=${XBN_WHEELS:-$ROOT/.whl}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/summary.txt"
status=0

step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, record the exit status
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc ($((SECONDS - t0)) s), log: $OUT/$name.log"
    printf '%-22s rc=%s\n' "$name" "$rc" >> "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
    return 0
}

# -- dependencies ------------------------------------------------------------------------------
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"numpy": "numpy", "array_api_compat": "array-api-compat", "pytest": "pytest",
        "hypothesis": "hypothesis", "array_api_strict": "array-api-strict"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "== missing Python packages: $missing"
    if [ -d "$WHEELS" ]; then
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" --target "$OUT/pydeps" $missing \
            > "$OUT/pydeps.log" 2>&1 || { echo "installing from $WHEELS failed: see $OUT/pydeps.log"; status=1; }
        export PYTHONPATH="$PYTHONPATH:$OUT/pydeps"
    else
        echo "   no wheel directory $WHEELS: carry wheels (see the header of $0)"
        status=1
    fi
fi

# -- 1. environment ----------------------------------------------------------------------------
env_report() {
    nvidia-smi || echo "nvidia-smi not found"
    "$PY" - <<'EOF'
import platform
print("python", platform.python_version())
for mod in ("numpy", "array_api_compat", "cupy", "torch", "pytest", "ml_dtypes"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:
        print(mod, "unavailable:", e)
try:
    import cupy
    rt = cupy.cuda.runtime
    print("cuda runtime", rt.runtimeGetVersion(), "driver api", rt.driverGetVersion())
    print("device", rt.getDeviceProperties(0)["name"], "cc", cupy.cuda.Device(0).compute_capability)
    from cupy.cuda import nvrtc
    print("nvrtc", nvrtc.getVersion())
except Exception as e:
    print("cupy device query failed:", e)
try:
    import torch
    print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available())
except Exception as e:
    print("torch:", e)
EOF
    "$PY" -m xbn info
}
step env env_report

# -- 2. compile check --------------------------------------------------------------------------
step check_kernels "$PY" ci/check_kernels.py --json "$OUT/check_kernels.json"

# -- 3. test suite with the CuPy tier ----------------------------------------------------------
step pytest "$PY" -m pytest -q -ra -p no:cacheprovider --backend numpy --backend cupy \
    --junitxml="$OUT/pytest.xml"
if grep -q "SKIPPED.*test_kernels_cupy.py.*the CUDA kernels need" "$OUT/pytest.log"; then
    echo "   tests/test_kernels_cupy.py was skipped: see $OUT/pytest.log (no GPU seen?)"
    printf '%-22s rc=%s\n' "kernel-tests-skipped" 1 >> "$OUT/summary.txt"
    status=1
fi

# -- 4. parity ---------------------------------------------------------------------------------
if [ -f xbn/parity.py ]; then
    step parity "$PY" -m xbn parity --backend cupy --json "$OUT/parity.json"
fi

# -- 5. compute-sanitizer ----------------------------------------------------------------------
SAN=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}
for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /opt/cuda; do
    if [ -z "$SAN" ] && [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ]; then
        SAN="$d/bin/compute-sanitizer"
    fi
done
if [ -z "$SAN" ]; then
    echo "== compute-sanitizer not found: the sanitizer steps cannot run (set COMPUTE_SANITIZER)"
    printf '%-22s rc=%s\n' "sanitizer-missing" 1 >> "$OUT/summary.txt"
    status=1
else
    # Compile the kernels once outside the sanitizer (CuPy caches them on disk).
    step sanitize-warmup "$PY" ci/sanitize_kernels.py
    for tool in memcheck racecheck synccheck initcheck; do
        extra=()
        [ "$tool" = memcheck ] && extra=(--leak-check no)
        [ "$tool" = racecheck ] && extra=(--racecheck-report all)
        step "sanitize-$tool" "$SAN" --tool "$tool" --error-exitcode 1 ${extra[@]+"${extra[@]}"} \
            "$PY" ci/sanitize_kernels.py
    done
fi

# -- 6. benchmark ------------------------------------------------------------------------------
step bench "$PY" -m xbn bench --gpu -- --out "$OUT/bench"

echo
echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
exit "$status"
