"""Run under ``mpiexec -n K``: SyncBatchNorm over MPI equals one BatchNorm on the concatenated batch.

Every process builds the same global batches (same seeds), trains on its own slice, and checks
its slice of y and dx, the sum over processes of dgamma and dbeta, the running statistics and
num_batches_tracked against a BatchNorm it runs itself on the whole batch, to 1e-10 in float64.
Equal and unequal batch sizes, an empty batch, NCHW, channels-last and (N, C), momentum=None,
on NumPy (and on torch's CPU tensors when torch is installed). Prints "rank R/K: parity OK" and
exits 0, or prints the failure and aborts the whole world (no process is left waiting).
"""

from __future__ import annotations

import sys
import traceback

import numpy as np

import xbn
from xbn._reference import assert_close, to_numpy
from xbn.distributed import MPICommunicator

TOL = 1e-10


def batch_sizes(kind: str, size: int, step: int) -> list[int]:
    if kind == "equal":
        return [3] * size
    if kind == "unequal":
        return [2 + 3 * r + step for r in range(size)]
    if kind == "empty":  # rank 1 has nothing on even steps, rank 0 on odd ones
        return [0 if r == 1 - step % 2 else 2 + r for r in range(size)]
    raise ValueError(kind)


def run_case(
    comm: MPICommunicator, backend: str, kind: str, sample: tuple[int, ...], axis: int, momentum: float | None
) -> None:
    rank, size = comm.rank, comm.size
    xb = xbn.backends.resolve(backend)
    c = sample[axis - 1] if axis > 0 else sample[-1]
    layer = xbn.SyncBatchNorm(c, comm=comm, axis=axis, momentum=momentum, backend=backend, dtype="float64")
    plain = xbn.BatchNorm(c, axis=axis, momentum=momentum, backend="numpy", dtype="float64")
    rng = np.random.default_rng(0)
    w, b = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    layer.weight.data = xb.xp.asarray(w, device=xb.device)
    layer.bias.data = xb.xp.asarray(b, device=xb.device)
    plain.weight.data, plain.bias.data = w.copy(), b.copy()
    for step in range(3):
        sizes = batch_sizes(kind, size, step)
        rng = np.random.default_rng(100 + step)
        x = rng.normal(0.5 + step, 2.0, size=(sum(sizes), *sample))
        dy = rng.normal(size=x.shape)
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        y = to_numpy(layer(xb.xp.asarray(x[lo:hi], device=xb.device)))
        dx = to_numpy(layer.backward(xb.xp.asarray(dy[lo:hi], device=xb.device)))
        y_want, dx_want = plain(x), plain.backward(dy)
        what = f"{backend} {kind} {sample} axis={axis} momentum={momentum} step {step} rank {rank}"
        assert_close(y, y_want[lo:hi], TOL, f"y, {what}")
        assert_close(dx, dx_want[lo:hi], TOL, f"dx, {what}")
        for name in ("weight", "bias"):
            total = comm.allreduce_sum(np.ascontiguousarray(to_numpy(getattr(layer, name).grad)))
            assert_close(total, getattr(plain, name).grad, TOL, f"summed {name}.grad, {what}")
        assert_close(to_numpy(layer.running_mean), plain.running_mean, TOL, f"running_mean, {what}")
        assert_close(to_numpy(layer.running_var), plain.running_var, TOL, f"running_var, {what}")
        assert layer.num_batches_tracked == plain.num_batches_tracked == step + 1, what


def main() -> int:
    comm = MPICommunicator()
    backends = ["numpy"]
    try:
        import torch  # noqa: F401

        backends.append("torch")
    except ImportError:
        pass
    cases = 0
    for backend in backends:
        for kind in ("equal", "unequal", "empty"):
            for sample, axis in (((4, 3, 3), 1), ((3, 3, 4), -1), ((5,), 1)):
                for momentum in (0.1, None):
                    run_case(comm, backend, kind, sample, axis, momentum)
                    cases += 1
    print(f"rank {comm.rank}/{comm.size}: parity OK ({cases} cases, {', '.join(backends)})", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        from mpi4py import MPI  # imported here: pytest imports this file (doctests) without MPI

        MPI.COMM_WORLD.Abort(1)
