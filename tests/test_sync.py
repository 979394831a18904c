"""SyncBatchNorm, its communicators and convert_sync_batchnorm.

Three worlds:

* LocalCommunicator: a world of one process must be BatchNorm exactly, on every backend tier.
* ThreadWorld (below): several ranks as threads of this process, summing in rank order. It runs
  the synchronized path on every tier and makes deadlocks visible (a rank that does not join a
  collective times the others out instead of hanging the suite).
* MPI: tests/mpi/*.py under ``mpiexec -n 2`` and ``-n 3`` (skipped, with the reason, when
  mpiexec or mpi4py's MPI library is missing; ``XBN_REQUIRE_MPI=1`` turns the skip into a
  failure, as CI sets it).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import array_api_compat
import numpy as np
import pytest

import xbn
from xbn import distributed, sync
from xbn.distributed import Communicator, LocalCommunicator, MPICommunicator, NCCLCommunicator

import reference as ref
from reference import assert_close, snapshot, to_backend, to_numpy

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30  # seconds a rank waits in a collective before the world counts as deadlocked


# -- a world of threads ------------------------------------------------------------------------


class ThreadWorld:
    """``size`` ranks in one process: each all-reduce waits for every rank, then sums in rank
    order (so every rank gets the same bits back, as MPI and NCCL give)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=TIMEOUT)
        self.slots: list[Any] = [None] * size
        self.lengths: list[list[int]] = [[] for _ in range(size)]
        self.comms = [ThreadComm(self, r) for r in range(size)]

    def run(self, fn: Any) -> tuple[list[Any], list[BaseException | None]]:
        """``fn(rank, comm)`` on every rank; (results, exceptions), each by rank."""
        results: list[Any] = [None] * self.size
        errors: list[BaseException | None] = [None] * self.size

        def go(r: int) -> None:
            try:
                results[r] = fn(r, self.comms[r])
            except BaseException as e:  # reported per rank; the test decides
                errors[r] = e

        threads = [threading.Thread(target=go, args=(r,), daemon=True) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(2 * TIMEOUT)
        assert not any(t.is_alive() for t in threads), "a rank is still waiting: deadlock"
        hung = [e for e in errors if isinstance(e, threading.BrokenBarrierError)]
        assert not hung, f"a collective timed out (a rank did not join it): {errors}"
        return results, errors

    def run_ok(self, fn: Any) -> list[Any]:
        results, errors = self.run(fn)
        for e in errors:
            if e is not None:
                raise e
        return results


class ThreadComm(Communicator):
    def __init__(self, world: ThreadWorld, rank: int) -> None:
        self.world, self._rank = world, rank

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self.world.size

    def check_backend(self, backend: Any) -> None:
        return None

    def allreduce_sum(self, buf: Any) -> Any:
        xp = distributed.check_buffer(buf)
        w = self.world
        w.lengths[self._rank].append(int(buf.shape[0]))
        w.slots[self._rank] = to_numpy(buf)
        w.barrier.wait()
        total = w.slots[0].copy()
        for r in range(1, w.size):
            total = total + w.slots[r]
        w.barrier.wait()  # nobody overwrites a slot before every rank has summed
        return xp.asarray(total, device=array_api_compat.device(buf))


class NumpyOnly(LocalCommunicator):
    """A world of one that reduces NumPy arrays only (a communicator that does not fit others)."""

    def check_backend(self, backend: Any) -> None:
        if backend.name != "numpy":
            raise TypeError(f"NumpyOnly reduces NumPy arrays, not {backend.name!r} ones")


def _x(shape, seed=0, dtype=np.float64, loc=0.5, scale=2.0):
    return ref.rand(np.random.default_rng(seed), shape, dtype, loc=loc, scale=scale)


def _split(a: np.ndarray, sizes: list[int], batch_axis: int = 0) -> list[np.ndarray]:
    cuts = np.cumsum([0, *sizes])
    return [np.take(a, np.arange(cuts[i], cuts[i + 1]), axis=batch_axis) for i in range(len(sizes))]


def _set_params(layer, backend, w, b):
    layer.weight.data = backend.xp.asarray(w, dtype=layer.dtype, device=backend.device)
    layer.bias.data = backend.xp.asarray(b, dtype=layer.dtype, device=backend.device)


# -- a world of one is BatchNorm ---------------------------------------------------------------

LAYOUTS = [
    # (BatchNorm class for the reference, SyncBatchNorm kwargs, per-sample shape, channel axis)
    (xbn.BatchNorm1d, {}, (3,), 1),
    (xbn.BatchNorm2d, {}, (3, 4, 5), 1),
    (xbn.BatchNorm, {"axis": -1}, (4, 5, 3), -1),
    (xbn.BatchNorm3d, {}, (3, 2, 3, 2), 1),
]
LAYOUT_IDS = ["NC", "NCHW", "NHWC", "NCDHW"]


@pytest.mark.parametrize("cls,kw,sample,axis", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_world_of_one_is_batchnorm_exactly(backend, cls, kw, sample, axis, momentum):
    """Bit for bit: training steps (one with an empty batch), then eval, then a count-1 error."""
    c = sample[axis - 1] if axis > 0 else sample[-1]
    opts = dict(momentum=momentum, backend=backend.name)
    plain = cls(c, **kw, **opts)
    synced = xbn.SyncBatchNorm(c, comm=LocalCommunicator(), **kw, **opts)
    w, b = _x((c,), seed=5, loc=1.0, scale=0.3), _x((c,), seed=6)
    for layer in (plain, synced):
        _set_params(layer, backend, w, b)
    for step, n in enumerate([4, 0, 3, 6]):
        if step == 3:
            plain.eval()
            synced.eval()
        x = to_backend(backend, _x((n, *sample), seed=step, dtype=np.float32, loc=step))
        dy = to_backend(backend, _x((n, *sample), seed=10 + step, dtype=np.float32))
        outs = [(layer(x), layer.backward(dy)) for layer in (plain, synced)]
        for got, want in zip(outs[1], outs[0]):
            np.testing.assert_array_equal(to_numpy(got), to_numpy(want))
        sp, ss = snapshot(plain), snapshot(synced)
        assert ss == sp, f"state differs after step {step}"
    assert synced.num_batches_tracked == 2
    synced.train()
    plain.train()
    full = (1, *sample)
    single = tuple(c if i == axis % len(full) else 1 for i in range(len(full)))
    one = to_backend(backend, np.ones(single, np.float32))
    for layer in (plain, synced):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            layer(one)


def test_world_of_one_makes_no_collective_call(backend):
    world = ThreadWorld(1)
    bn = xbn.SyncBatchNorm(3, comm=world.comms[0], backend=backend.name)
    x = to_backend(backend, _x((4, 3), dtype=np.float32))
    bn(x)
    bn.backward(x)
    assert world.lengths == [[]]


def test_state_dict_is_batchnorms(backend):
    plain = xbn.BatchNorm2d(4, backend=backend.name)
    synced = xbn.SyncBatchNorm(4, comm=LocalCommunicator(), backend=backend.name)
    assert list(synced.state_dict()) == list(plain.state_dict())
    plain(to_backend(backend, _x((3, 4, 2, 2), dtype=np.float32)))
    synced.load_state_dict(plain.state_dict())
    assert snapshot(synced) == snapshot(plain)
    assert synced.parameters() == [synced.weight, synced.bias]


# -- construction, copies, moves ---------------------------------------------------------------


def test_constructor_checks():
    with pytest.raises(TypeError, match=r"comm must be an xbn.distributed.Communicator"):
        xbn.SyncBatchNorm(3, comm=None, backend="numpy")
    with pytest.raises(TypeError, match="comm must be"):
        xbn.SyncBatchNorm(3, comm="MPI.COMM_WORLD", backend="numpy")
    with pytest.raises(TypeError, match="comm"):
        xbn.SyncBatchNorm(3, backend="numpy")  # keyword-only and required
    with pytest.raises(ValueError, match="does not support virtual_batch_size"):
        xbn.SyncBatchNorm(3, comm=LocalCommunicator(), virtual_batch_size=4, backend="numpy")
    with pytest.raises(ValueError, match="num_features"):
        xbn.SyncBatchNorm(0, comm=LocalCommunicator(), backend="numpy")
    bn = xbn.SyncBatchNorm(3, comm=LocalCommunicator(), backend="numpy")
    assert bn.virtual_batch_size is None
    with pytest.raises(ValueError, match="does not support virtual_batch_size"):
        bn.virtual_batch_size = 2
    bn.virtual_batch_size = None
    assert bn.comm.size == 1


def test_communicator_must_fit_the_backend(backend):
    if backend.name == "numpy":
        pytest.skip("NumpyOnly fits numpy")
    with pytest.raises(TypeError, match="NumpyOnly reduces NumPy arrays"):
        xbn.SyncBatchNorm(3, comm=NumpyOnly(), backend=backend.name)


def test_to_refuses_a_backend_the_communicator_does_not_fit(backend):
    if backend.name == "numpy":
        pytest.skip("the move goes from numpy to another tier")
    model = xbn.nn.Sequential(
        xbn.BatchNorm1d(3, backend="numpy"), xbn.SyncBatchNorm(3, comm=NumpyOnly(), backend="numpy")
    )
    model(np.ones((4, 3), np.float32))  # a saved forward, which a successful move would drop
    before = [snapshot(m) for m in model.children()]
    with pytest.raises(TypeError, match=r"cannot move SyncBatchNorm.*NumpyOnly"):
        model.to(backend.name)
    assert [snapshot(m) for m in model.children()] == before
    assert all(m.backend == "numpy" for m in model.children())
    bn = xbn.SyncBatchNorm(3, comm=LocalCommunicator(), backend="numpy")
    assert bn.to(backend.name).backend == backend.name


def test_pickle_and_copies_are_refused():
    bn = xbn.SyncBatchNorm(3, comm=LocalCommunicator(), backend="numpy")
    model = xbn.nn.Sequential(bn)
    for attempt, obj in [
        (pickle.dumps, bn),
        (pickle.dumps, model),
        (copy.deepcopy, bn),
        (copy.deepcopy, model),
        (copy.copy, bn),
    ]:
        with pytest.raises(TypeError, match=r"cannot be pickled or copied.*state_dict"):
            attempt(obj)
    assert copy.copy(model)[0] is bn  # a shallow copy of a container shares the layer
    fresh = xbn.SyncBatchNorm(3, comm=LocalCommunicator(), backend="numpy")
    fresh.load_state_dict(bn.state_dict())  # the documented way across processes


def test_repr_names_the_communicator():
    bn = xbn.SyncBatchNorm(3, comm=LocalCommunicator(), axis=-1, backend="numpy")
    assert repr(bn) == (
        "SyncBatchNorm(3, axis=-1, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, "
        "backend='numpy', comm=LocalCommunicator(rank=0, size=1))"
    )


# -- the synchronized path: parity with one BatchNorm on the concatenated batch ----------------


def _world_steps(
    backend,
    world_sizes,
    sample,
    axis,
    *,
    steps=3,
    momentum=0.1,
    affine=True,
    track=True,
    dtype=np.float64,
    loc=0.5,
    scale=2.0,
    eps=1e-5,
    tol=1e-10,
    tol_running=None,
):
    """Train SyncBatchNorm over a thread world and BatchNorm on the concatenation; compare.

    Returns the per-rank layers.
    """
    c = sample[axis - 1] if axis > 0 else sample[-1]
    p = len(world_sizes[0])
    world = ThreadWorld(p)
    dt = np.dtype(dtype).name
    layers = [
        xbn.SyncBatchNorm(
            c,
            comm=world.comms[r],
            axis=axis,
            momentum=momentum,
            eps=eps,
            affine=affine,
            track_running_stats=track,
            backend=backend.name,
            dtype="float64",
        )
        for r in range(p)
    ]
    plain = xbn.BatchNorm(
        c,
        axis=axis,
        momentum=momentum,
        eps=eps,
        affine=affine,
        track_running_stats=track,
        backend="numpy",
        dtype="float64",
    )
    if affine:
        w, b = _x((c,), seed=5, loc=1.0, scale=0.3), _x((c,), seed=6)
        _set_params(plain, xbn.backends.resolve("numpy"), w, b)
        for layer in layers:
            _set_params(layer, backend, w, b)
    for step in range(steps):
        tol_step = tol[step] if isinstance(tol, (list, tuple)) else tol
        tol_run = tol_step if tol_running is None else tol_running[step]
        sizes = world_sizes[step % len(world_sizes)]
        n = sum(sizes)
        x = _x((n, *sample), seed=step, dtype=dtype, loc=loc + step, scale=scale)
        dy = _x((n, *sample), seed=20 + step, dtype=dtype)
        xs, dys = _split(x, sizes), _split(dy, sizes)

        def rank_step(r, comm, xs=xs, dys=dys):
            layer = layers[r]
            y = layer(to_backend(backend, xs[r]))
            dx = layer.backward(to_backend(backend, dys[r]))
            return to_numpy(y), to_numpy(dx)

        out = world.run_ok(rank_step)
        y_want = plain(x)
        dx_want = plain.backward(dy)
        y = np.concatenate([o[0] for o in out])
        dx = np.concatenate([o[1] for o in out])
        assert y.dtype == dx.dtype == np.dtype(dt)
        assert_close(y, y_want, tol_step, f"y, step {step}")
        assert_close(dx, dx_want, tol_step, f"dx, step {step}")
        if affine:
            dgamma = sum(to_numpy(layer.weight.grad) for layer in layers)
            dbeta = sum(to_numpy(layer.bias.grad) for layer in layers)
            assert_close(dgamma, plain.weight.grad, tol_step, f"summed dgamma, step {step}")
            assert_close(dbeta, plain.bias.grad, tol_step, f"summed dbeta, step {step}")
            for layer in (plain, *layers):
                layer.zero_grad()
        for r, layer in enumerate(layers):
            assert layer.num_batches_tracked == plain.num_batches_tracked, f"rank {r}"
            if track:
                assert_close(to_numpy(layer.running_mean), plain.running_mean, tol_run, f"running_mean {r}")
                assert_close(to_numpy(layer.running_var), plain.running_var, tol_run, f"running_var {r}")
    return layers, world


SIZES = {
    "equal": [[3, 3]],
    "unequal": [[5, 2, 1]],
    "one-empty": [[4, 0, 3], [0, 2, 2]],
    "changing": [[2, 2], [1, 6], [7, 0]],
}


@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize(
    "sample,axis", [((4, 3, 3), 1), ((3, 3, 4), -1), ((6,), 1)], ids=["NCHW", "NHWC", "NC"]
)
def test_world_matches_batchnorm_on_the_concatenated_batch(backend, sizes, sample, axis):
    _world_steps(backend, sizes, sample, axis)


@pytest.mark.parametrize(
    "options",
    [dict(momentum=None), dict(affine=False), dict(track=False), dict(loc=-300.0, scale=0.5)],
    ids=["momentum-None", "affine-False", "no-running-stats", "offset"],
)
def test_world_matches_batchnorm_with_options(backend, options):
    layers, _ = _world_steps(backend, [[3, 1, 4], [0, 5, 2]], (4, 2, 3), 1, steps=4, **options)
    if not options.get("affine", True):
        assert all(layer.weight is None for layer in layers)


def test_float64_error_with_a_large_offset_follows_the_documented_bound(backend):
    """|mean| / std = 4000 in float64: the first step's shift (the initial running mean, 0) is far
    from the data, and the combination's rounding is about P * eps * (mean - s)**2 / var of the
    variance (half that in y). From the second step on the shift is the running mean, here
    (momentum=None) the mean of the earlier batches, and the step's results hold to 1e-10
    again; the running variance, an average over the steps, keeps the first step's share."""
    p, ratio = 3, 4000.0
    first = 4 * p * np.finfo(np.float64).eps * ratio**2
    assert first > 1e-10  # the case the shift exists for
    _world_steps(
        backend,
        [[3, 1, 4], [0, 5, 2]],
        (4, 2, 3),
        1,
        steps=4,
        momentum=None,
        loc=-40.0,
        scale=0.01,
        tol=[first, 1e-10, 1e-10, 1e-10],
        tol_running=[first / (k + 1) + 1e-10 for k in range(4)],
    )


def test_replicas_stay_bitwise_identical(backend):
    layers, _ = _world_steps(
        backend, [[5, 2, 1], [0, 3, 3]], (3, 2, 2), 1, steps=4, dtype=np.float32, tol=1e-5
    )
    for layer in layers[1:]:
        assert snapshot(layer)["running_mean"] == snapshot(layers[0])["running_mean"]
        assert snapshot(layer)["running_var"] == snapshot(layers[0])["running_var"]


def test_one_collective_per_pass_on_a_small_buffer(backend):
    c, p = 5, 3
    layers, world = _world_steps(backend, [[2, 2, 2]], (c, 2), 1, steps=2)
    # forward: flags (1 slot), count, 3 per channel; backward: flags, 2 per channel
    assert world.lengths == [[1 + 1 + 3 * c, 1 + 2 * c] * 2] * p
    for layer in layers:  # eval and frozen use the running statistics: no communication
        layer.eval()
    world.run_ok(lambda r, comm: layers[r].backward(layers[r](to_backend(backend, _x((2, c, 2))))))
    for layer in layers:
        layer.train()
        layer.frozen = True
    world.run_ok(lambda r, comm: layers[r].backward(layers[r](to_backend(backend, _x((2, c, 2))))))
    assert world.lengths == [[1 + 1 + 3 * c, 1 + 2 * c] * 2] * p


def test_float32_with_a_large_offset(backend):
    """x = 1e4 + N(0, 1) in float32: within BatchNorm's own error plus the input's resolution.

    Each process's mean is rounded to float32 (by ulp(1e4) / 2 = 5e-4) before the means are
    combined. That moves the global mean by as much as BatchNorm's own rounding does, and the
    variance by up to ulp(mean) * max |local mean - global mean| / var (the between-process term
    is taken about rounded means): about the input's own resolution, ulp(x) / std = 1e-3 here,
    where BatchNorm's running variance gets 5e-8.
    """
    sizes, sample = [5, 4, 3], (4, 3, 3)
    world = ThreadWorld(len(sizes))
    layers = [xbn.SyncBatchNorm(4, comm=comm, backend=backend.name) for comm in world.comms]
    plain = xbn.BatchNorm2d(4, backend=backend.name)
    rm, rv, nbt = np.zeros(4), np.ones(4), 0
    ulp = float(np.spacing(np.float32(1e4)))
    for step in range(3):
        rng = np.random.default_rng(step)
        x = (1e4 + rng.normal(size=(sum(sizes), *sample))).astype(np.float32)
        dy = rng.normal(size=x.shape).astype(np.float32)
        xs, dys = _split(x, sizes), _split(dy, sizes)
        out = world.run_ok(
            lambda r, comm, xs=xs, dys=dys: (
                to_numpy(layers[r](to_backend(backend, xs[r]))),
                to_numpy(layers[r].backward(to_backend(backend, dys[r]))),
            )
        )
        y_bn = to_numpy(plain(to_backend(backend, x)))
        dx_bn = to_numpy(plain.backward(to_backend(backend, dy)))
        f, g = ref.forward(x, axis=1), ref.backward(dy, x, axis=1)
        rm, rv, nbt = ref.update_running(rm, rv, x, axis=1, num_batches_tracked=nbt)
        resolution = ulp / float(np.sqrt(f["var"].min()))
        spread = max(float(np.max(np.abs(ref.batch_mean_var(part, 1)[0] - f["mean"]))) for part in xs)
        y = np.concatenate([o[0] for o in out])
        dx = np.concatenate([o[1] for o in out])
        grads = [
            (
                sum(to_numpy(layer.weight.grad) for layer in layers),
                g["dgamma"],
                to_numpy(plain.weight.grad),
                "dgamma",
            )
        ]
        for got, want, bn_got, what in [(y, f["y"], y_bn, "y"), (dx, g["dx"], dx_bn, "dx"), *grads]:
            assert_close(got, want, ref.rel_err(bn_got, want) + resolution, what)
        for layer in (plain, *layers):
            layer.zero_grad()
        assert_close(to_numpy(layers[0].running_mean), rm, 1e-6, "running_mean")
        assert_close(to_numpy(layers[0].running_var), rv, ulp * spread / f["var"].min() + 1e-6, "running_var")


def test_a_constant_channel_normalizes_to_exactly_the_bias(backend):
    """As in BatchNorm: a channel with one value everywhere has variance exactly 0, also when its
    value is far from the shift (the running mean) and the batches differ in size."""
    x = _x((9, 3, 2, 2))
    x[:, 1] = 3.7
    world = ThreadWorld(3)
    layers = [xbn.SyncBatchNorm(3, comm=comm, backend=backend.name, dtype="float64") for comm in world.comms]
    for layer in layers:
        _set_params(layer, backend, [1.0, 2.0, 1.5], [0.0, 0.25, -1.0])
        layer.running_mean = to_backend(backend, np.array([0.1, -0.3123, 2.0]))
    xs = _split(x, [5, 3, 1])
    ys = world.run_ok(lambda r, comm: to_numpy(layers[r](to_backend(backend, xs[r]))))
    for y in ys:
        np.testing.assert_array_equal(y[:, 1], np.full(y[:, 1].shape, 0.25))
    rv = to_numpy(layers[0].running_var)
    assert rv[1] == (1 - 0.1) * 1.0 + 0.1 * 0.0  # the variance was exactly 0


def test_one_value_per_process_is_enough_when_the_world_has_more(backend):
    layers, _ = _world_steps(backend, [[1, 1, 1]], (3,), 1, steps=1)
    assert layers[0].num_batches_tracked == 1


def test_one_value_over_the_whole_world_raises_everywhere(backend):
    world = ThreadWorld(3)
    layers = [xbn.SyncBatchNorm(2, comm=comm, backend=backend.name) for comm in world.comms]
    before = [snapshot(layer) for layer in layers]
    shapes = [(0, 2), (1, 2), (0, 2)]
    _, errors = world.run(lambda r, comm: layers[r](to_backend(backend, np.ones(shapes[r], np.float32))))
    for r, e in enumerate(errors):
        assert isinstance(e, ValueError) and "1 value per channel over all 3 processes" in str(e), r
    assert [snapshot(layer) for layer in layers] == before


def test_every_batch_empty_changes_nothing(backend):
    world = ThreadWorld(2)
    layers = [xbn.SyncBatchNorm(2, comm=comm, backend=backend.name) for comm in world.comms]
    before = [snapshot(layer) for layer in layers]
    empty = to_backend(backend, np.zeros((0, 2), np.float32))
    out = world.run_ok(lambda r, comm: (layers[r](empty), layers[r].backward(empty)))
    for y, dx in out:
        assert tuple(y.shape) == tuple(dx.shape) == (0, 2)
    for layer, snap in zip(layers, before):
        assert layer.num_batches_tracked == 0
        assert snapshot(layer)["running_mean"] == snap["running_mean"]
        np.testing.assert_array_equal(to_numpy(layer.weight.grad), np.zeros(2, np.float32))


def test_an_empty_process_updates_its_running_statistics_too(backend):
    layers, _ = _world_steps(backend, [[0, 4]], (3,), 1, steps=2)
    assert layers[0].num_batches_tracked == layers[1].num_batches_tracked == 2
    assert snapshot(layers[0])["running_var"] == snapshot(layers[1])["running_var"]


# -- a bad input in one process is an error in every process -----------------------------------


BAD_INPUTS = {
    "channels": (lambda backend, x: x[:, :2, ...], ValueError, "expected 3 channels"),
    "rank": (lambda backend, x: x[0, :, 0], ValueError, "rank >= 2"),
    "dtype": (lambda backend, x: backend.xp.astype(x, backend.xp.int32), TypeError, "real floating"),
    "not-an-array": (lambda backend, x: [[1.0, 2.0, 3.0]], TypeError, "must be an array of"),
    "training-flag": ("training", TypeError, "training must be a bool"),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_a_bad_input_raises_in_every_process_and_changes_nothing(backend, bad):
    make_bad, error, message = BAD_INPUTS[bad]
    world = ThreadWorld(3)
    layers = [xbn.SyncBatchNorm(3, comm=comm, backend=backend.name) for comm in world.comms]
    good = to_backend(backend, _x((4, 3, 2), dtype=np.float32))
    # a previous step's forward, which a failed forward must leave for its backward
    world.run_ok(lambda r, comm: layers[r](good))
    before = [snapshot(layer) for layer in layers]

    def step(r, comm):
        if r != 1:
            return layers[r](good)
        if make_bad == "training":
            return layers[r].forward(good, training="yes")
        return layers[r](make_bad(backend, good))

    _, errors = world.run(step)
    assert isinstance(errors[1], error) and message in str(errors[1]), errors[1]
    for r in (0, 2):
        assert isinstance(errors[r], xbn.PeerInputError), errors[r]
        assert errors[r].ranks == (1,) and "process 1 (of 3)" in str(errors[r])
        assert isinstance(errors[r], ValueError) and isinstance(errors[r], RuntimeError)
    assert [snapshot(layer) for layer in layers] == before
    # the world is still in step: the earlier forward backs through, then training goes on
    dy = to_backend(backend, _x((4, 3, 2), seed=1, dtype=np.float32))
    world.run_ok(lambda r, comm: layers[r].backward(dy))
    world.run_ok(lambda r, comm: layers[r](good))
    assert all(layer.num_batches_tracked == 2 for layer in layers)


def test_several_bad_processes_are_all_named(backend):
    world = ThreadWorld(4)
    layers = [xbn.SyncBatchNorm(3, comm=comm, backend=backend.name) for comm in world.comms]
    good = to_backend(backend, _x((4, 3), dtype=np.float32))
    _, errors = world.run(lambda r, comm: layers[r](good if r in (0, 2) else good[:, :1]))
    assert [type(e) for e in errors] == [xbn.PeerInputError, ValueError, xbn.PeerInputError, ValueError]
    assert errors[0].ranks == errors[2].ranks == (1, 3)
    assert "processes 1, 3 (of 4)" in str(errors[0])


def test_a_bad_dy_raises_in_every_process_and_keeps_the_forward(backend):
    world = ThreadWorld(3)
    layers = [xbn.SyncBatchNorm(3, comm=comm, backend=backend.name, dtype="float64") for comm in world.comms]
    x, dy = _x((9, 3, 2)), _x((9, 3, 2), seed=1)
    xs, dys = _split(x, [4, 0, 5]), _split(dy, [4, 0, 5])
    world.run_ok(lambda r, comm: layers[r](to_backend(backend, xs[r])))
    before = [snapshot(layer) for layer in layers]
    _, errors = world.run(
        lambda r, comm: layers[r].backward(to_backend(backend, dys[r] if r != 2 else dys[r][:, :, :1]))
    )
    assert isinstance(errors[2], ValueError) and "dy must match the forward input" in str(errors[2])
    assert [type(e) for e in errors[:2]] == [xbn.PeerInputError] * 2
    assert "the dy of process 2" in str(errors[0])
    assert [snapshot(layer) for layer in layers] == before
    dxs = world.run_ok(lambda r, comm: to_numpy(layers[r].backward(to_backend(backend, dys[r]))))
    want = ref.backward(dy, x, axis=1)
    assert_close(np.concatenate(dxs), want["dx"], 1e-10, "dx after the corrected call")
    assert_close(sum(to_numpy(layer.weight.grad) for layer in layers), want["dgamma"], 1e-10)


def test_backward_before_forward_raises_locally():
    """Call order is the program's to keep: with no forward to back through there is no
    collective to join, so the error stays in the process that made it."""
    world = ThreadWorld(2)
    bn = xbn.SyncBatchNorm(3, comm=world.comms[0], backend="numpy")
    with pytest.raises(xbn.BackwardBeforeForwardError):
        bn.backward(np.ones((2, 3), np.float32))
    assert world.lengths == [[], []]


def test_flag_bits_name_ranks_beyond_one_slot():
    size = 2 * sync.FLAG_BITS + 5
    comm = SimpleNamespace(rank=0, size=size)
    total = np.zeros(3)
    for rank in (0, 51, 52, 107, size - 1):
        comm.rank = rank
        layer = SimpleNamespace(_comm=comm, xp=array_api_compat.numpy, device="cpu")
        total = total + sync.SyncBatchNorm._invalid_buffer(layer, 3)  # type: ignore[arg-type]
    assert sync._flag_ranks(total, size) == (0, 51, 52, 107, size - 1)
    assert sync._flag_slots(1) == 1 and sync._flag_slots(52) == 1 and sync._flag_slots(53) == 2


# -- convert_sync_batchnorm --------------------------------------------------------------------


class CustomBN(xbn.BatchNorm):
    """A variant: convert_sync_batchnorm leaves subclasses alone."""


def test_convert_replaces_plain_batchnorms_and_keeps_their_state():
    shared = xbn.BatchNorm1d(4, backend="numpy", momentum=None, eps=1e-3)
    bn2d = xbn.BatchNorm2d(3, backend="numpy", dtype="float64", affine=False)
    nhwc = xbn.BatchNorm(3, axis=-1, backend="numpy", track_running_stats=False)
    custom = CustomBN(4, backend="numpy")
    model = xbn.nn.Sequential(shared, xbn.nn.ReLU(), shared, bn2d, nhwc, custom)
    shared(np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32))
    bn2d.eval()
    weight, bias = shared.weight, shared.bias
    state = {k: to_numpy(v) for k, v in model.state_dict().items()}
    comm = LocalCommunicator()
    assert xbn.convert_sync_batchnorm(model, comm) is model
    new = list(model.children())
    assert [type(m).__name__ for m in new] == [
        "SyncBatchNorm",
        "ReLU",
        "SyncBatchNorm",
        "SyncBatchNorm",
        "SyncBatchNorm",
        "CustomBN",
    ]
    assert new[0] is new[2] and new[5] is custom
    assert new[0].weight is weight and new[0].bias is bias
    assert all(m.comm is comm for m in new[:5] if isinstance(m, xbn.SyncBatchNorm))
    assert (new[0].momentum, new[0].eps, new[0].num_batches_tracked) == (None, 1e-3, 1)
    assert new[3].training is False and new[3].affine is False and new[3].dtype == np.float64
    assert new[4].axis == -1 and new[4].running_mean is None
    assert {k: to_numpy(v).tolist() for k, v in model.state_dict().items()} == {
        k: v.tolist() for k, v in state.items()
    }
    with pytest.raises(ValueError, match="SyncBatchNorm expected 4-D input"):
        new[3](np.ones((2, 3, 4), np.float32))  # BatchNorm2d's ranks are kept
    new[4](np.ones((2, 5, 3), np.float32))


def test_convert_leaves_other_variants_alone():
    renorm = xbn.BatchRenorm1d(4, backend="numpy")
    lazy = xbn.LazyBatchNorm1d(backend="numpy")
    done = xbn.LazyBatchNorm1d(backend="numpy")
    done(np.ones((2, 3), np.float32))  # a lazy layer that has seen its input is a BatchNorm1d
    model = xbn.nn.Sequential(renorm, lazy, done)
    xbn.convert_sync_batchnorm(model, LocalCommunicator())
    assert model[0] is renorm and model[1] is lazy
    assert type(model[2]) is xbn.SyncBatchNorm and model[2].num_features == 3


def test_convert_a_root_batchnorm_returns_the_new_layer():
    bn = xbn.BatchNorm3d(2, backend="numpy")
    new = xbn.convert_sync_batchnorm(bn, LocalCommunicator())
    assert isinstance(new, xbn.SyncBatchNorm) and new.weight is bn.weight
    assert xbn.convert_sync_batchnorm(CustomBN(2, backend="numpy"), LocalCommunicator()).__class__ is CustomBN


def test_convert_checks_everything_before_changing_anything():
    ok = xbn.BatchNorm1d(3, backend="numpy")
    ghost = xbn.BatchNorm1d(3, backend="numpy", virtual_batch_size=2)
    model = xbn.nn.Sequential(ok, ghost)
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\).*virtual_batch_size=2"):
        xbn.convert_sync_batchnorm(model, LocalCommunicator())
    assert list(model.children()) == [ok, ghost]
    with pytest.raises(TypeError, match=r"must be an xbn.distributed.Communicator"):
        xbn.convert_sync_batchnorm(xbn.nn.Sequential(ok), "world")
    with pytest.raises(TypeError, match=r"must be an xbn.Module"):
        xbn.convert_sync_batchnorm([ok], LocalCommunicator())


def test_convert_checks_the_communicator_fits_every_layer(backend):
    if backend.name == "numpy":
        pytest.skip("NumpyOnly fits numpy")
    model = xbn.nn.Sequential(xbn.BatchNorm1d(3, backend="numpy"), xbn.BatchNorm1d(3, backend=backend.name))
    children = list(model.children())
    with pytest.raises(TypeError, match="cannot convert '1' \\(BatchNorm1d\\): NumpyOnly"):
        xbn.convert_sync_batchnorm(model, NumpyOnly())
    assert list(model.children()) == children


# -- communicators -----------------------------------------------------------------------------


def test_local_communicator(backend):
    comm = LocalCommunicator()
    buf = to_backend(backend, np.array([1.0, -2.0]))
    out = comm.allreduce_sum(buf)
    assert out is not buf and to_numpy(out).tolist() == [1.0, -2.0]
    assert repr(comm) == "LocalCommunicator(rank=0, size=1)"
    with pytest.raises(ValueError, match="must be 1-D, got shape \\(1, 2\\)"):
        comm.allreduce_sum(to_backend(backend, np.ones((1, 2))))
    with pytest.raises(TypeError, match="float32 or float64, got"):
        comm.allreduce_sum(to_backend(backend, np.ones(2, np.int64)))
    with pytest.raises(TypeError, match=r"must be an array, got builtins.list"):
        comm.allreduce_sum([1.0])


def test_communicator_is_abstract():
    with pytest.raises(TypeError):
        Communicator()  # type: ignore[abstract]


# NCCL through fakes: the wrapper's own logic (reading the communicator, refusing what does not
# fit, the unique id over MPI). The all-reduce itself needs a GPU: ci/gpu_sync_check.py.


class FakeNccl:
    available = True
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0
    created: ClassVar[list[tuple[int, Any, int]]] = []

    @staticmethod
    def get_unique_id():
        return b"unique-id"

    class NcclCommunicator:
        def __init__(self, ndev, uid, rank):
            FakeNccl.created.append((ndev, uid, rank))
            self._n, self._rank = ndev, rank

        def rank_id(self):
            return self._rank

        def size(self):
            return self._n

        def device_id(self):
            return 1

        def allReduce(self, *args):
            raise AssertionError("not reached on the CPU")


@pytest.fixture
def fake_nccl(monkeypatch):
    FakeNccl.created = []
    monkeypatch.setattr(distributed, "_import_nccl", lambda: (SimpleNamespace(), FakeNccl))
    return FakeNccl


def test_nccl_communicator_reads_its_world_and_refuses_other_backends(backend, fake_nccl):
    comm = NCCLCommunicator(FakeNccl.NcclCommunicator(4, b"id", 2))
    assert (comm.rank, comm.size, comm.device_id) == (2, 4, 1)
    assert repr(comm) == "NCCLCommunicator(rank=2, size=4, device=1)"
    with pytest.raises(
        TypeError,
        match="NCCLCommunicator reduces CuPy arrays on CUDA device 1, but "
        f"the layer lives on backend '{backend.name}'",
    ):
        xbn.SyncBatchNorm(3, comm=comm, backend=backend.name)
    with pytest.raises(TypeError, match="reduces CuPy arrays, got"):
        comm.allreduce_sum(to_backend(backend, np.ones(3)))
    cupy_on = SimpleNamespace(name="cupy", device=SimpleNamespace(id=1))
    comm.check_backend(cupy_on)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on device 1"):
        comm.check_backend(SimpleNamespace(name="cupy", device=SimpleNamespace(id=0)))  # type: ignore[arg-type]


def test_nccl_communicator_wants_an_nccl_communicator(fake_nccl):
    with pytest.raises(TypeError, match=r"nccl_comm must be a cupy.cuda.nccl.NcclCommunicator"):
        NCCLCommunicator(object())


def test_nccl_from_mpi_broadcasts_the_unique_id(monkeypatch, fake_nccl):
    class Intracomm:
        def __init__(self, rank, size):
            self.rank, self.size, self.sent = rank, size, []

        def Get_rank(self):
            return self.rank

        def Get_size(self):
            return self.size

        def bcast(self, obj, root):
            self.sent.append((obj, root))
            return b"unique-id"  # what rank 0 made

    fake_mpi = SimpleNamespace(Intracomm=Intracomm, COMM_WORLD=Intracomm(1, 3))
    monkeypatch.setattr(distributed, "_import_mpi", lambda: fake_mpi)
    comm = NCCLCommunicator.from_mpi()
    assert (comm.rank, comm.size) == (1, 3)
    assert fake_mpi.COMM_WORLD.sent == [(None, 0)]  # only rank 0 makes an id
    assert FakeNccl.created == [(3, b"unique-id", 1)]
    root = Intracomm(0, 2)
    NCCLCommunicator.from_mpi(root)
    assert root.sent == [(b"unique-id", 0)]
    with pytest.raises(TypeError, match=r"mpi_comm must be an mpi4py.MPI.Intracomm"):
        NCCLCommunicator.from_mpi("world")


def test_import_xbn_needs_neither_mpi4py_nor_cupy():
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in ('mpi4py', 'cupy'):\n"
        "        raise ImportError('blocked ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import numpy as np, xbn\n"
        "from xbn.distributed import LocalCommunicator\n"
        "bn = xbn.SyncBatchNorm(2, comm=LocalCommunicator(), backend='numpy')\n"
        "bn(np.ones((3, 2), np.float32))\n"
        "try:\n"
        "    xbn.distributed.MPICommunicator()\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "XBN_NUMPY_ENGINE": "numpy"},
    )
    assert out.returncode == 0, out.stderr
    assert "ImportError: MPI communication needs mpi4py and an MPI library" in out.stdout


def _gpu_sync_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "ci" / "gpu_sync_check.py"), "--dry-run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_gpu_sync_check_logic_on_the_cpu():
    """ci/gpu_sync_check.py's checks with NumPy arrays: what the GPU tier runs, minus the GPU."""
    res = _gpu_sync_check("--no-mpi")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 of 2 checks passed" in res.stdout


# -- MPI: in this process (a world of one), then under mpiexec ---------------------------------


def test_gpu_sync_check_logic_on_the_cpu_with_mpi(mpi_ready):
    res = _gpu_sync_check()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "5 of 5 checks passed" in res.stdout


def _mpi_problem() -> str | None:
    """Why MPI cannot run here, or None."""
    if _mpiexec() is None:
        return "no mpiexec (pip install mpich, or a system MPI)"
    probe = subprocess.run(
        [sys.executable, "-c", "from mpi4py import MPI; MPI.Get_library_version()"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        return "mpi4py or its MPI library is missing: " + probe.stderr.strip().splitlines()[-1]
    return None


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


@pytest.fixture(scope="module")
def mpi_ready() -> None:
    problem = _mpi_problem()
    if problem is None:
        return
    if os.environ.get("XBN_REQUIRE_MPI", "") not in ("", "0"):
        pytest.fail(f"XBN_REQUIRE_MPI is set but MPI cannot run: {problem}")
    pytest.skip(problem)


def test_mpi_communicator_in_a_world_of_one(mpi_ready, backend):
    comm = MPICommunicator()
    assert (comm.rank, comm.size) == (0, 1)
    buf = to_backend(backend, np.array([1.5, -2.0, 3.0], np.float32))
    out = comm.allreduce_sum(buf)
    assert backend.owns(out) and out.dtype == buf.dtype
    assert to_numpy(out).tolist() == [1.5, -2.0, 3.0]
    assert comm.cuda_aware is False or comm.cuda_aware is True
    assert repr(MPICommunicator(cuda_aware=False)) == "MPICommunicator(rank=0, size=1)"
    with pytest.raises(TypeError, match="cuda_aware must be a bool"):
        MPICommunicator(cuda_aware="yes")
    with pytest.raises(TypeError, match=r"comm must be an mpi4py.MPI.Intracomm"):
        MPICommunicator("COMM_WORLD")
    bn = xbn.SyncBatchNorm(3, comm=comm, backend=backend.name)
    assert tuple(bn(to_backend(backend, np.ones((2, 3), np.float32))).shape) == (2, 3)


def _run_mpi(script: str, n: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [_mpiexec(), "-n", str(n), sys.executable, str(ROOT / "tests" / "mpi" / script), *args]
    env = {
        **os.environ,
        "XBN_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and every rank it started
        out, _ = proc.communicate()
        pytest.fail(f"mpiexec -n {n} {script} did not finish in 240 s (deadlock?):\n{out}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.mark.parametrize("n", [2, 3])
def test_mpi_world_matches_batchnorm_on_the_concatenated_batch(mpi_ready, n):
    res = _run_mpi("sync_parity.py", n)
    assert res.returncode == 0, res.stdout
    for r in range(n):
        assert f"rank {r}/{n}: parity OK" in res.stdout, res.stdout


@pytest.mark.parametrize("n", [2, 3])
def test_mpi_bad_input_ends_every_process_with_the_error(mpi_ready, n):
    res = _run_mpi("sync_errors.py", n)
    assert res.returncode == 0, res.stdout
    for r in range(n):
        assert f"rank {r}/{n}: errors OK" in res.stdout, res.stdout


def test_mpi_unhandled_bad_input_exits_every_process_nonzero(mpi_ready):
    """The uncaught case: each process ends with its error (no rank left waiting), so mpiexec
    returns within the timeout with a failure status and every rank's message."""
    res = _run_mpi("sync_errors.py", 2, "--uncaught")
    assert res.returncode != 0
    assert "ValueError: expected 3 channels on axis 1, got 2" in res.stdout, res.stdout
    assert "PeerInputError: SyncBatchNorm: the input of process 1 (of 2)" in res.stdout, res.stdout


def test_sync_benchmark_runs(mpi_ready, tmp_path):
    """benchmarks/sync.py end to end on small shapes: tables and JSON with every column."""
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "sync.py"),
        "--quick",
        "--shapes",
        "4x3x4x4",
        "8x5",
        "--out",
        str(tmp_path),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads((tmp_path / "sync.json").read_text())
    assert [row["shape"] for row in data["rows"]] == [[4, 3, 4, 4], [8, 5]]
    assert [row["bytes_per_step"] for row in data["rows"]] == [8 * (5 * 3 + 3), 8 * (5 * 5 + 3)]
    for row in data["rows"]:
        for key in ("alone_ms", "local_ms", "sync_ms", "in_allreduce_ms", "allreduce_fwd_us"):
            assert row[key] > 0, key
    table = (tmp_path / "sync.md").read_text()
    assert "| 4x3x4x4 | 2x3x4x4 | 3 |" in table and "| 8x5 | 4x5 | 5 |" in table
