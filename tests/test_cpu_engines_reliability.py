"""Reliability of the NumPy backend's two CPU engines (xbn/kernels/numpy.py): the NumPy passes
and the compiled loops (numba), next to the generic path they replace.

* several threads at once, on every numba threading layer there is (a crash must fail a test,
  not the run: these run in a subprocess) and on the NumPy passes' own pool;
* memory: beyond what a call returns, O(C) plus a bounded workspace, on wide and tall inputs;
* a constant channel gives exactly beta, and a zero variance, on every path and shape;
* inf and NaN in a training input give torch's results on every path, without warnings;
* a constant channel with eps = 1e-30 gives a finite dx.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
import warnings

import numpy as np
import pytest

import xbn
from xbn import backends
from xbn import functional as F
from xbn.kernels import numpy as kn

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None
ENGINES = [
    "numpy",
    pytest.param("numba", marks=pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")),
]
PATHS = ["generic", *ENGINES]
GENERIC = backends.resolve("numpy", generic=True)


@pytest.fixture
def path(request):
    """A layer factory on one path: the generic functions, or the fast paths on one engine."""
    if request.param != "generic" and backends.generic_forced():
        pytest.skip("XBN_FORCE_GENERIC is set: layers do not use the fast paths")
    before = kn._engine
    if request.param != "generic":
        kn.set_engine(request.param)
    backend = GENERIC if request.param == "generic" else "numpy"
    yield lambda cls, c, **kw: cls(c, backend=backend, **kw)
    kn._engine = before


def _engine(name):
    before = kn._engine
    kn.set_engine(name)
    return before


# -- several threads ------------------------------------------------------------------------

_THREADS_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading
    import numpy as np
    import xbn

    # jobs of >= 1 MiB (the size from which the engines run in parallel): NCHW and
    # channels-last, row and column walks, different block and task counts
    SHAPES = [(8, 16, 48, 48), (16, 8, 40, 40), (4, 32, 56, 56), (64, 4, 32, 32)]
    ROUNDS = 12

    def job(k, out):
        rng = np.random.default_rng(k)
        shape = SHAPES[k % len(SHAPES)]
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        if k % 2:  # channels-last memory, as torch's channels_last
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
            dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        bn = xbn.BatchNorm2d(shape[1], backend="numpy")
        for _ in range(ROUNDS):
            y = bn(x)
            dx = bn.backward(dy)
            state = (y, dx, bn.running_mean, bn.running_var, bn.weight.grad, bn.bias.grad)
            out.append([a.copy() for a in state])

    jobs = int(sys.argv[1])
    alone = []
    for k in range(jobs):
        res = []
        job(k, res)
        alone.append(res)
    together = [[] for _ in range(jobs)]
    threads = [threading.Thread(target=job, args=(k, together[k])) for k in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    same = all(np.array_equal(a, b)
               for k in range(jobs) for r, s in zip(alone[k], together[k]) for a, b in zip(r, s))
    complete = all(len(together[k]) == ROUNDS for k in range(jobs))
    from xbn.kernels import numpy as kn
    layer = None
    if kn.get_engine() == "numba":
        import numba
        layer = numba.threading_layer()
    print(json.dumps({"same": same, "complete": complete, "engine": kn.get_engine(), "layer": layer}))
    """
)


def _threading_layers():
    layers = ["workqueue", "omp"]
    if importlib.util.find_spec("tbb") is not None:
        layers.append("tbb")
    return layers


def _run_threads(engine, extra_env, jobs=4):
    env = dict(os.environ)
    env.update({"XBN_NUMPY_ENGINE": engine, "XBN_NUM_THREADS": "2", "NUMBA_NUM_THREADS": "2"})
    env.update(extra_env)
    env.pop("XBN_FORCE_GENERIC", None)
    proc = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT, str(jobs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0 and "No threading layer could be loaded" in proc.stderr:
        pytest.skip(f"numba cannot load the {extra_env.get('NUMBA_THREADING_LAYER')!r} threading layer here")
    assert proc.returncode == 0, (
        f"exit status {proc.returncode} (negative: killed by that signal)\n{proc.stderr[-3000:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("layer", _threading_layers())
def test_threads_on_every_numba_threading_layer(layer):
    """Four threads, each with its own layer on >= 1 MiB inputs, forward + backward twelve
    times: the process survives (numba's work-queue layer aborts it when two threads enter a
    parallel region at once) and every result equals the same job run alone."""
    out = _run_threads("numba", {"NUMBA_THREADING_LAYER": layer})
    if out["layer"] != layer:
        pytest.skip(f"numba could not load its {layer!r} threading layer here (it used {out['layer']!r})")
    assert out["engine"] == "numba"
    assert out["complete"] and out["same"]


@pytest.mark.parametrize("threads", ["2", "3"])
def test_threads_on_the_numpy_passes_pool(threads):
    """The NumPy passes' pool shared by four callers whose inputs need different numbers of
    workers (so the pool is grown while others submit to it): every result as when alone."""
    out = _run_threads("numpy", {"XBN_NUM_THREADS": threads})
    assert out["engine"] == "numpy"
    assert out["complete"] and out["same"]


def test_pool_survives_set_num_threads_from_another_thread():
    """set_num_threads replaces the pool while other threads run on it: their calls complete
    (a submit to a pool already shut down would raise), with the results of a lone call."""
    import threading

    before = _engine("numpy")
    n_before = kn.get_num_threads()
    try:
        kn.set_num_threads(2)
        rng = np.random.default_rng(3)
        x = rng.standard_normal((4, 16, 64, 64)).astype(np.float32)  # 1 MiB: the pool runs
        want = kn.batch_stats(x, axis=1)
        errors, results = [], []
        stop = threading.Event()

        def call():
            try:
                while not stop.is_set():
                    results.append(kn.batch_stats(x, axis=1))
            except BaseException as e:  # reported below
                errors.append(e)

        workers = [threading.Thread(target=call) for _ in range(3)]
        switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads often: between any two bytecodes
        for w in workers:
            w.start()
        try:
            i, end = 0, time.monotonic() + 1.5
            while time.monotonic() < end and not errors:
                kn.set_num_threads(2 + i % 3)
                i += 1
        finally:
            stop.set()
            for w in workers:
                w.join()
            sys.setswitchinterval(switch)
        assert not errors, errors
        assert results
        for got in results:
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)
    finally:
        kn.set_num_threads(n_before)
        kn._engine = before


# -- memory ---------------------------------------------------------------------------------

# (shape, channel axis): wide C (N x 200000), a tall (N, C), and channels-last images
MEMORY_CASES = [((16, 200000), 1), ((2, 200000), 1), ((262144, 16), 1), ((64, 14, 14, 256), -1)]


def _workspace_bound(x, c):
    """What a call may allocate beyond its outputs: O(C) (ten float64 vectors of C, covering the
    per-channel work of xbn.functional around the kernels) plus a bounded workspace."""
    return 10 * 8 * c + max(kn.get_num_threads() * (1 << 20), x.nbytes // 20)


def _peak(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", MEMORY_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-ax{c[1]}")
def test_memory_beyond_outputs_is_bounded(case, engine):
    """Peak memory of a training forward beyond y, and of a backward beyond dx, is O(C) plus a
    bounded workspace (tracemalloc sees NumPy's allocations; the compiled loops' few per-task
    arrays are outside it, and bounded by the task size). The saved input is x itself."""
    if backends.generic_forced():
        pytest.skip("XBN_FORCE_GENERIC is set: layers do not use the fast paths")
    shape, axis = case
    before = _engine(engine)
    try:
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape, dtype=np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        c = shape[axis]
        bn = xbn.BatchNorm(c, axis=axis, backend="numpy")
        bn(x)
        bn.backward(dy)  # warm: compiled, pool started, plans cached
        y, peak_fwd = _peak(lambda: bn(x))
        dx, peak_bwd = _peak(lambda: bn.backward(dy))
        bound = _workspace_bound(x, c)
        assert peak_fwd - y.nbytes <= bound, f"forward: {(peak_fwd - y.nbytes) / 2**20:.1f} MiB beyond y"
        assert peak_bwd - dx.nbytes <= bound, f"backward: {(peak_bwd - dx.nbytes) / 2**20:.1f} MiB beyond dx"
    finally:
        kn._engine = before


@pytest.mark.parametrize("engine", ENGINES)
def test_statistics_memory_on_wide_input(engine):
    """The statistics alone, on a wide input: partials O(C), never (tasks x C) or (rows x C)."""
    before = _engine(engine)
    try:
        x = np.random.default_rng(1).standard_normal((64, 100000), dtype=np.float32)
        kn.batch_stats(x, axis=1)
        _, peak = _peak(lambda: kn.batch_stats(x, axis=1))
        assert peak <= 6 * 8 * 100000 + max(kn.get_num_threads() << 20, x.nbytes // 20), peak
        kn.backward_reduce(x, x, np.zeros(100000, np.float32), axis=1)
        _, peak = _peak(lambda: kn.backward_reduce(x, x, np.zeros(100000, np.float32), axis=1))
        assert peak <= 6 * 8 * 100000 + max(kn.get_num_threads() << 20, x.nbytes // 20), peak
    finally:
        kn._engine = before


# -- constant channels ----------------------------------------------------------------------

CONSTANTS = [12345.678, 1e8, -3.5]


def _with_constant(n, layout, value, dtype):
    """An input with channel 1 constant at ``value``; (shape, channel axis, BatchNorm class)."""
    rng = np.random.default_rng(n)
    if layout == "NC":
        x, axis = rng.standard_normal((n, 3)), 1
    elif layout == "NCHW":
        x, axis = rng.standard_normal((n, 3, 2, 3)), 1
    else:  # NHWC
        x, axis = rng.standard_normal((n, 2, 3, 3)), 3
    x = (x * 5 + 2).astype(dtype)
    index = [slice(None)] * x.ndim
    index[axis] = 1
    x[tuple(index)] = dtype(value)
    return x, axis, tuple(index)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", ["NC", "NCHW", "NHWC"])
def test_constant_channel_is_exactly_beta(path, layout, dtype):
    """A channel constant at 12345.678, 1e8 or -3.5: batch mean exactly that value, variance
    exactly 0, y exactly beta, and the running variance exactly (1 - momentum) * 1, for N from
    2 to 100000 (tall inputs are where the partials of many rows meet)."""
    for n in (2, 100, 4096, 100000):
        for value in CONSTANTS:
            x, axis, index = _with_constant(n, layout, value, dtype)
            bn = path(xbn.BatchNorm, 3, axis=axis, dtype=np.dtype(dtype).name)
            bn.bias.data[:] = 0.5
            y = bn(x)
            what = f"N={n} {layout} {value} {np.dtype(dtype).name}"
            assert np.all(y[index] == dtype(0.5)), f"{what}: y = {np.unique(y[index])[:4]}"
            assert bn.running_var[1] == dtype(0.9) * dtype(1.0), f"{what}: running_var {bn.running_var[1]}"
            rm = bn.running_mean[1]
            assert rm == dtype(0.1) * dtype(value), f"{what}: running_mean {rm}"
            mean, var = bn._backend.ops.batch_stats(x, axis=axis)
            assert var[1] == 0 and mean[1] == dtype(value), f"{what}: mean {mean[1]!r}, var {var[1]!r}"


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize(
    "case",
    [((64, 3), 1), ((8, 3, 30, 30), 1), ((8, 20, 20, 3), -1), ((300000, 3), 1)],
    ids=lambda c: "x".join(map(str, c[0])),
)
def test_constant_channel_tiny_eps_backward_is_finite(path, case):
    """eps = 1e-30: invstd of a constant channel is 1e15, and sum(dy * (x - mean)) is exactly 0;
    every engine keeps dx finite (the coefficients come from the inside out)."""
    shape, axis = case
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(np.float32)
    index = [slice(None)] * x.ndim
    index[axis] = 0
    x[tuple(index)] = 7.25
    dy = rng.standard_normal(shape).astype(np.float32)
    bn = path(xbn.BatchNorm, 3, axis=axis, eps=1e-30)
    bn(x)
    dx = bn.backward(dy)
    assert np.all(np.isfinite(dx)), "non-finite dx"
    assert np.all(np.isfinite(bn.weight.grad)) and np.all(np.isfinite(bn.bias.grad))


# -- inf and NaN, against torch ---------------------------------------------------------------

NONFINITE = {
    "inf": [[1.0, 2.0], [np.inf, 3.0], [0.0, 4.0]],
    "inf-first": [[np.inf, 2.0], [1.0, 3.0], [0.0, 4.0]],
    "-inf": [[1.0, 2.0], [-np.inf, 3.0], [0.0, 4.0]],
    "-inf-first": [[-np.inf, 2.0], [1.0, 3.0], [0.0, 4.0]],
    "both-infs": [[np.inf, 2.0], [-np.inf, 3.0], [0.0, 4.0]],
    "nan": [[1.0, 2.0], [np.nan, 3.0], [0.0, 4.0]],
    "nan-first": [[np.nan, 2.0], [1.0, 3.0], [0.0, 4.0]],
}


def _torch_step(x, dy, channels_last):
    import torch

    bn = torch.nn.BatchNorm1d(x.shape[1]) if x.ndim == 2 else torch.nn.BatchNorm2d(x.shape[1])
    tx = torch.tensor(x)
    if channels_last:
        tx = tx.contiguous(memory_format=torch.channels_last)
    tx.requires_grad_(True)
    y = bn(tx)
    y.backward(torch.tensor(dy))
    out = (y, tx.grad, bn.running_mean, bn.running_var, bn.weight.grad, bn.bias.grad)
    return [t.detach().numpy() for t in out]


def _cases():
    for name in NONFINITE:
        for size in ("small", "big", "nchw"):
            yield pytest.param(name, size, id=f"{name}-{size}")


def _input(name, size):
    x = np.array(NONFINITE[name], np.float32)
    if size == "big":  # >= 1 MiB: threads, many partials
        x = np.concatenate([x, np.random.default_rng(4).standard_normal((200000, 2)).astype(np.float32)])
    elif size == "nchw":  # the bad value inside an image, channels-last memory
        base = np.random.default_rng(5).standard_normal((4, 2, 40, 40)).astype(np.float32)
        base[:3, :, 0, 0] = x
        x = base
    dy = np.random.default_rng(6).standard_normal(x.shape).astype(np.float32)
    return x, dy


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed: it is the reference here")
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("name, size", list(_cases()))
def test_nonfinite_input_matches_torch(path, name, size, request):
    """y, dx, running mean and variance, dgamma, dbeta of a training step on an input holding
    +-inf or NaN: torch 2.x CPU's, NaN for NaN and +-inf for +-inf, on every path. The fast
    paths do it without a RuntimeWarning (pytest turns those into errors here)."""
    is_generic = request.node.callspec.params["path"] == "generic"
    x, dy = _input(name, size)
    channels_last = size == "nchw"
    xin, dyin = x, dy
    if channels_last:
        xin = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        dyin = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    cls = xbn.BatchNorm1d if x.ndim == 2 else xbn.BatchNorm2d
    bn = path(cls, x.shape[1])
    with warnings.catch_warnings():
        # the generic path's elementwise NumPy expressions warn on inf - inf (see functional.py)
        warnings.simplefilter("ignore" if is_generic else "error", RuntimeWarning)
        y = bn(xin)
        dx = bn.backward(dyin)
    got = [y, dx, bn.running_mean, bn.running_var, bn.weight.grad, bn.bias.grad]
    want = _torch_step(x, dy, channels_last)
    for what, g, w in zip(["y", "dx", "running_mean", "running_var", "dgamma", "dbeta"], got, want):
        g = np.asarray(g, np.float64)
        w = np.asarray(w, np.float64)
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=f"{what}: NaN pattern")
        np.testing.assert_array_equal(np.isposinf(g), np.isposinf(w), err_msg=f"{what}: +inf pattern")
        np.testing.assert_array_equal(np.isneginf(g), np.isneginf(w), err_msg=f"{what}: -inf pattern")
        finite = np.isfinite(w)
        np.testing.assert_allclose(g[finite], w[finite], rtol=1e-4, atol=1e-4, err_msg=what)


@pytest.mark.parametrize("engine", ENGINES)
def test_nonfinite_statistics_agree_across_engines(engine):
    """The two engines and the plain formula give the same mean and variance for channels
    holding inf or NaN (in any position), and leave the finite channels alone."""
    before = _engine(engine)
    try:
        rng = np.random.default_rng(8)
        x = rng.standard_normal((4096, 6)).astype(np.float32)
        x[0, 0] = np.inf
        x[100, 1] = -np.inf
        x[4095, 2] = np.nan
        x[7, 3] = np.inf
        x[8, 3] = -np.inf
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            mean, var = kn.batch_stats(x, axis=1)
        np.testing.assert_array_equal(mean[:4], np.array([np.inf, -np.inf, np.nan, np.nan], np.float32))
        assert np.isnan(var[:4]).all()
        x64 = x[:, 4:].astype(np.float64)
        np.testing.assert_allclose(mean[4:], x64.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(var[4:], x64.var(axis=0), rtol=1e-5)
    finally:
        kn._engine = before


@pytest.mark.parametrize("engine", ENGINES)
def test_overflowing_shifted_sums_fall_back_to_float64(engine):
    """Finite float32 values near the top of the range: the shifted sums overflow, the channel
    is recomputed from float64 sums and keeps a finite mean."""
    before = _engine(engine)
    try:
        x = np.tile(np.array([[3e38], [-3e38], [3e38], [-3e38]], np.float32), (1024, 1))
        mean, var = kn.batch_stats(x, axis=1)
        assert mean[0] == 0.0
        assert np.isinf(var[0])  # 9e76 is beyond float32, as in torch
    finally:
        kn._engine = before


def test_generic_statistics_of_an_infinite_first_value():
    """The generic path, which the fast paths fall back to, agrees with them on a channel
    whose first value is infinite."""
    for name, want in (("inf-first", np.inf), ("-inf-first", -np.inf)):
        x = np.array(NONFINITE[name], np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's, from x - mean
            mean, var = F.batch_stats(x, axis=1)
        assert mean[0] == want and np.isnan(var[0])
