"""Run under ``mpiexec -n K``: a bad input in one process is an error in every process.

Checks, in order, with every process's state compared before and after:

1. rank 1's input has the wrong channel count: rank 1 raises its ValueError, every other rank a
   PeerInputError naming rank 1; nothing changes; the next, good step works everywhere.
2. the last rank's dy has the wrong shape: the same in backward, and the forward stays
   available for a corrected backward.
3. one value per channel over the whole world: every rank raises the count error.

Prints "rank R/K: errors OK" and exits 0, or prints the failure and aborts the world.

With ``--uncaught``, rank 1 sends a bad input and nobody catches anything: each process must
end with its own traceback (rank 1 its ValueError, the others PeerInputError) and mpiexec must
return a failure status, instead of the world hanging.
"""

from __future__ import annotations

import sys
import traceback

import numpy as np

import xbn
from xbn.distributed import MPICommunicator


def state(layer: xbn.SyncBatchNorm) -> list:
    out = [layer.num_batches_tracked, layer._saved is not None]
    for a in (
        layer.running_mean,
        layer.running_var,
        layer.weight.data,
        layer.bias.data,
        layer.weight.grad,
        layer.bias.grad,
    ):
        out.append(None if a is None else np.asarray(a).tobytes())
    return out


def expect(call, rank: int, own: tuple[type, str] | None, peers: tuple[int, ...]) -> None:
    """``call()`` must raise ``own`` here if given, else PeerInputError naming ``peers``."""
    try:
        call()
    except Exception as e:
        if own is not None:
            assert type(e) is own[0] and own[1] in str(e), f"rank {rank}: got {e!r}"
        else:
            assert isinstance(e, xbn.PeerInputError), f"rank {rank}: got {e!r}"
            assert e.ranks == peers, f"rank {rank}: {e.ranks} != {peers}"
        return
    raise AssertionError(f"rank {rank}: nothing was raised")


def main(uncaught: bool) -> int:
    comm = MPICommunicator()
    rank, size = comm.rank, comm.size
    layer = xbn.SyncBatchNorm(3, comm=comm, backend="numpy", dtype="float64")
    rng = np.random.default_rng(rank)
    good = rng.normal(size=(2 + rank, 3, 4))
    if uncaught:
        layer(good if rank != 1 else good[:, :2])
        return 0

    # 1. a bad input on rank 1
    before = state(layer)
    bad_x = good[:, :2] if rank == 1 else good
    own = (ValueError, "expected 3 channels on axis 1, got 2") if rank == 1 else None
    expect(lambda: layer(bad_x), rank, own, (1,))
    assert state(layer) == before, f"rank {rank}: the failed forward changed the layer"
    layer(good)
    assert layer.num_batches_tracked == 1

    # 2. a bad dy on the last rank; the forward stays for the corrected call
    last = size - 1
    before = state(layer)
    bad_dy = good[:, :, :1] if rank == last else good
    own = (ValueError, "dy must match the forward input") if rank == last else None
    expect(lambda: layer.backward(bad_dy), rank, own, (last,))
    assert state(layer) == before, f"rank {rank}: the failed backward changed the layer"
    layer.backward(good)
    assert layer.weight.grad is not None

    # 3. one value per channel over the world
    before = state(layer)
    single = np.ones((1, 3)) if rank == 0 else np.ones((0, 3))
    expect(lambda: layer(single), rank, (ValueError, f"1 value per channel over all {size} processes"), ())
    assert state(layer) == before

    # the world is still in step
    layer(good)
    layer.backward(good)
    assert layer.num_batches_tracked == 2
    print(f"rank {rank}/{size}: errors OK", flush=True)
    return 0


if __name__ == "__main__":
    if "--uncaught" in sys.argv:
        sys.exit(main(uncaught=True))
    try:
        sys.exit(main(uncaught=False))
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        from mpi4py import MPI  # imported here: pytest imports this file (doctests) without MPI

        MPI.COMM_WORLD.Abort(1)
