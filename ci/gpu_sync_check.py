"""GPU tier step: SyncBatchNorm on CuPy in a world of one process, over NCCL and over MPI.

    python ci/gpu_sync_check.py [--no-mpi] [--dry-run]

Checks, on CUDA device 0 (exit status 0 only if every check passed):

1. NCCLCommunicator (an NCCL communicator of one rank) sums float32 and float64 CuPy buffers on
   the default stream and on a non-blocking stream, and refuses a layer on NumPy, at
   construction and in ``to()``.
2. SyncBatchNorm with it is BatchNorm exactly (a world of one makes no collective call).
3. The synchronized path on the GPU: ``Replicated`` presents the communicator as a world of two
   identical processes (the sum is twice this process's buffer, still through NCCL), which must
   equal BatchNorm on the batch concatenated with itself: y, dx, running statistics and
   num_batches_tracked, and this process's dgamma, dbeta as half of BatchNorm's; 1e-10 in
   float64, 1e-5 in float32; NCHW and channels-last; on a non-blocking stream too.
4. The same over MPICommunicator with host staging (``cuda_aware=False``), and as MPI reports
   itself (CUDA-aware or not); skipped only with ``--no-mpi``.

``--dry-run`` runs checks 2-4 on the NumPy backend (LocalCommunicator and MPI), without a GPU:
the script's own logic, as the CPU test suite runs it.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

import xbn
from xbn._reference import assert_close, to_numpy
from xbn.distributed import Communicator, LocalCommunicator, MPICommunicator

CASES = [((6, 5, 4, 4), 1), ((6, 4, 4, 5), -1), ((12, 7), 1)]


class Replicated(Communicator):
    """``inner`` as a world of ``copies`` identical processes of which this is rank 0.

    The all-reduce runs through ``inner`` (on the device, for NCCL) and is then multiplied by
    ``copies``: the sum over that many processes holding this process's buffer. Exact in binary
    floating point for copies = 2.
    """

    def __init__(self, inner: Communicator, copies: int = 2) -> None:
        self.inner, self.copies = inner, copies

    @property
    def rank(self) -> int:
        return 0

    @property
    def size(self) -> int:
        return self.copies

    def check_backend(self, backend: Any) -> None:
        self.inner.check_backend(backend)

    def allreduce_sum(self, buf: Any) -> Any:
        return self.inner.allreduce_sum(buf) * self.copies


def check_world_of_one(comm: Communicator, backend: str) -> None:
    xb = xbn.backends.resolve(backend)
    for shape, axis in CASES:
        c = shape[axis]
        plain = xbn.BatchNorm(c, axis=axis, backend=backend)
        synced = xbn.SyncBatchNorm(c, comm=comm, axis=axis, backend=backend)
        rng = np.random.default_rng(0)
        for _ in range(2):
            x = xb.xp.asarray(rng.normal(1.0, 2.0, size=shape).astype(np.float32), device=xb.device)
            dy = xb.xp.asarray(rng.normal(size=shape).astype(np.float32), device=xb.device)
            for got, want in zip((synced(x), synced.backward(dy)), (plain(x), plain.backward(dy))):
                np.testing.assert_array_equal(to_numpy(got), to_numpy(want))
        for name in ("running_mean", "running_var"):
            np.testing.assert_array_equal(to_numpy(getattr(synced, name)), to_numpy(getattr(plain, name)))
        np.testing.assert_array_equal(to_numpy(synced.weight.grad), to_numpy(plain.weight.grad))


def check_replicated(comm: Communicator, backend: str, stream: Callable[[], Any] | None = None) -> None:
    """SyncBatchNorm over Replicated(comm) against BatchNorm on [x, x], three training steps."""
    xb = xbn.backends.resolve(backend)
    for dtype, tol in (("float64", 1e-10), ("float32", 1e-5)):
        for shape, axis in CASES:
            c = shape[axis]
            world = Replicated(comm)
            synced = xbn.SyncBatchNorm(c, comm=world, axis=axis, backend=backend, dtype=dtype)
            plain = xbn.BatchNorm(c, axis=axis, backend=backend, dtype=dtype)
            rng = np.random.default_rng(1)
            for step in range(3):
                x = rng.normal(0.5 + step, 2.0, size=shape).astype(dtype)
                dy = rng.normal(size=shape).astype(dtype)
                x_dev = xb.xp.asarray(x, device=xb.device)
                dy_dev = xb.xp.asarray(dy, device=xb.device)
                both = xb.xp.asarray(np.concatenate([x, x]), device=xb.device)
                both_dy = xb.xp.asarray(np.concatenate([dy, dy]), device=xb.device)
                if stream is None:
                    y, dx = synced(x_dev), synced.backward(dy_dev)
                else:
                    with stream():
                        y, dx = synced(x_dev), synced.backward(dy_dev)
                y_want, dx_want = plain(both), plain.backward(both_dy)
                what = f"{world.inner!r} {dtype} {shape} axis={axis} step {step}"
                n = shape[0]
                assert_close(to_numpy(y), to_numpy(y_want)[:n], tol, f"y, {what}")
                assert_close(to_numpy(dx), to_numpy(dx_want)[:n], tol, f"dx, {what}")
                for name in ("weight", "bias"):
                    half = to_numpy(getattr(plain, name).grad) / 2
                    assert_close(to_numpy(getattr(synced, name).grad), half, tol, f"{name}.grad, {what}")
                for name in ("running_mean", "running_var"):
                    got, want = to_numpy(getattr(synced, name)), to_numpy(getattr(plain, name))
                    assert_close(got, want, tol, f"{name}, {what}")
                assert synced.num_batches_tracked == plain.num_batches_tracked == step + 1
                synced.zero_grad()
                plain.zero_grad()


def check_nccl() -> list[tuple[str, Callable[[], None]]]:
    from xbn.distributed import NCCLCommunicator, _import_nccl

    cupy, nccl = _import_nccl()  # says which library is missing
    cupy.cuda.Device(0).use()
    comm = NCCLCommunicator(nccl.NcclCommunicator(1, nccl.get_unique_id(), 0))

    def allreduce() -> None:
        for dtype in (cupy.float32, cupy.float64):
            buf = cupy.arange(1000, dtype=dtype) / 7
            for stream in (cupy.cuda.Stream.null, cupy.cuda.Stream(non_blocking=True)):
                with stream:
                    out = comm.allreduce_sum(buf)
                    assert out.dtype == buf.dtype and out.data.ptr != buf.data.ptr
                    stream.synchronize()
                    np.testing.assert_array_equal(out.get(), buf.get())

    def refuses_numpy() -> None:
        try:
            xbn.SyncBatchNorm(3, comm=comm, backend="numpy")
        except TypeError as e:
            assert "NCCLCommunicator reduces CuPy arrays" in str(e), e
        else:
            raise AssertionError("a NumPy layer with an NCCL communicator was accepted")
        bn = xbn.SyncBatchNorm(3, comm=comm, backend="cupy")
        try:
            bn.to("numpy")
        except TypeError as e:
            assert "cannot move SyncBatchNorm" in str(e), e
        else:
            raise AssertionError("to('numpy') with an NCCL communicator was accepted")
        assert bn.backend == "cupy"

    return [
        ("NCCL all-reduce on the default and a non-blocking stream", allreduce),
        ("NCCL refuses a NumPy layer, at construction and in to()", refuses_numpy),
        ("NCCL, world of one: SyncBatchNorm is BatchNorm exactly", lambda: check_world_of_one(comm, "cupy")),
        ("NCCL, synchronized path (2 replicas)", lambda: check_replicated(comm, "cupy")),
        (
            "NCCL, synchronized path on a non-blocking stream",
            lambda: check_replicated(comm, "cupy", lambda: cupy.cuda.Stream(non_blocking=True)),
        ),
    ]


def check_mpi(backend: str) -> list[tuple[str, Callable[[], None]]]:
    staged = MPICommunicator(cuda_aware=False)
    native = MPICommunicator()
    return [
        (f"MPI (host staging), world of one on {backend}", lambda: check_world_of_one(staged, backend)),
        (f"MPI (host staging), synchronized path on {backend}", lambda: check_replicated(staged, backend)),
        (
            f"MPI as it reports itself ({native!r}), synchronized path on {backend}",
            lambda: check_replicated(native, backend),
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-mpi", action="store_true", help="skip the MPICommunicator checks")
    parser.add_argument("--dry-run", action="store_true", help="NumPy backend, no GPU: the script's logic")
    args = parser.parse_args(argv)
    if args.dry_run:
        local = LocalCommunicator()
        checks = [
            ("local, world of one on numpy", lambda: check_world_of_one(local, "numpy")),
            ("local, synchronized path (2 replicas) on numpy", lambda: check_replicated(local, "numpy")),
        ]
        backend = "numpy"
    else:
        checks = check_nccl()
        backend = "cupy"
    if not args.no_mpi:
        checks += check_mpi(backend)
    failed = 0
    for name, check in checks:
        try:
            check()
        except Exception:
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
        else:
            print(f"ok   {name}")
    print(f"{len(checks) - failed} of {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
