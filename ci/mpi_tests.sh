#!/usr/bin/env bash
# MPI tier: SyncBatchNorm across processes, under mpiexec -n 2 and -n 3, on the CPU.
#
#   ci/mpi_tests.sh PYTHON
#
# PYTHON is the interpreter of the virtual environment xbn is installed in. This installs an MPI
# library into that environment from pip (MPICH, whose mpiexec lands beside PYTHON and runs as
# root without extra flags) and mpi4py, which finds it, then runs tests/test_sync.py with
# XBN_REQUIRE_MPI=1: a missing mpiexec or MPI library fails the run instead of skipping the
# multi-process tests. Each mpiexec run has a timeout, so a deadlock fails rather than hangs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: ci/mpi_tests.sh PYTHON}

"$PY" -m pip install -q "mpich" "mpi4py>=4"
"$PY" -c "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])"
XBN_REQUIRE_MPI=1 "$PY" -m pytest -q -p no:cacheprovider tests/test_sync.py
