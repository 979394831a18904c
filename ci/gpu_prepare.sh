#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks into .whl/ (git-ignored), where a package index is
# reachable; ci/gpu_tier.sh installs them there offline.
#
#   ci/gpu_prepare.sh [EXTRA_REQUIREMENT ...]
#
# The GPU machine has no package index. It runs Python 3.12 on x86_64 Linux with CuPy, torch,
# numba, ml_dtypes, pytest and hypothesis installed, and lacks array-api-compat (a dependency of
# xbn) and array-api-strict (of the test extra). Both are pure Python: their wheels are
# downloaded here, at the versions pyproject.toml allows, for that interpreter and platform
# (pip download --python-version 3.12 --only-binary=:all: --no-deps), whatever this machine's
# own Python is. Extra requirements on the command line are fetched the same way.
#
# Set PYTHON for the interpreter that runs pip (default: the active virtual environment's,
# else .venv/bin/python, else python3) and XBN_WHEELS for another
# directory than .whl/. Running it again re-uses wheels already there.
set -euo pipefail
cd "$(dirname "$0")/.."
# The interpreter: $PYTHON, else the active virtual environment's, else the repository's .venv,
# else python3 (the GPU machine's system Python).
PY=${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
WHEELS=${XBN_WHEELS:-.whl}
GPU_PYTHON=3.12
GPU_PLATFORM=manylinux2014_x86_64

# The requirement strings, exactly as pyproject.toml writes them (dependencies and extras).
reqs=$("$PY" - <<'EOF'
import re
text = open("pyproject.toml", encoding="utf-8").read()
wanted = ("array-api-compat", "array-api-strict")
found = {}
for req in re.findall(r'"([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?\s*[<>=!~][^"]*)"', text):
    name = re.split(r"[\[<>=!~ ]", req, maxsplit=1)[0].lower().replace("_", "-")
    if name in wanted:
        found.setdefault(name, req.replace(" ", ""))
missing = [w for w in wanted if w not in found]
if missing:
    raise SystemExit(f"gpu_prepare: pyproject.toml names no version of {missing}")
print(" ".join(found[w] for w in wanted))
EOF
)
# shellcheck disable=SC2206  # requirement strings have no spaces (removed above)
reqs=($reqs "$@")

mkdir -p "$WHEELS"
echo "gpu_prepare: downloading ${reqs[*]} for Python $GPU_PYTHON ($GPU_PLATFORM) into $WHEELS/"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$GPU_PYTHON" --platform "$GPU_PLATFORM" --implementation cp \
    -d "$WHEELS" "${reqs[@]}"

echo "gpu_prepare: $WHEELS/ holds:"
for w in "$WHEELS"/*.whl; do echo "  $w"; done
cat <<EOF
gpu_prepare: carry $WHEELS/ with the working tree. On the GPU machine, ci/gpu_tier.sh OUTDIR
  installs every module it lacks from it, offline and outside the system site-packages:
    pip install --no-index --no-deps --find-links $WHEELS --target <scratch>/pydeps <names>
  with <scratch>/pydeps on PYTHONPATH (after the repository root). ci/gpu_tier.sh --dry-run
  OUTDIR checks that install into a fresh folder on any machine.
EOF
