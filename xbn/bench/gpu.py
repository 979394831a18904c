"""GPU benchmark: xbn's CUDA kernels against PyTorch CUDA and the generic CuPy path.

What is timed, on each configuration of :data:`REFERENCE` (docs/gpu.md), for three
implementations: ``xbn`` (the CuPy backend with its kernels), ``generic`` (the same calls on
``xbn.backends.resolve("cupy", generic=True)``, what ``XBN_FORCE_GENERIC=1`` selects: CuPy
reductions and elementwise expressions) and ``torch``:

* the four single passes, through the registry (``resolve("cupy").ops``): ``stats``
  (batch_stats), ``scale_shift``, ``backward_reduce``, ``backward_apply``; torch's matching
  ops are ``torch.batch_norm_stats``, ``batch_norm_elemt``, ``batch_norm_backward_reduce`` and
  ``batch_norm_backward_elemt`` (the passes of torch's SyncBatchNorm);
* the two whole-step ops ``forward`` (batch_norm_forward: the fused statistics, then
  scale_shift) and ``backward`` (batch_norm_backward: the fused reduction, then backward_apply),
  against ``aten.native_batch_norm`` and ``aten.native_batch_norm_backward``;
* the layer: ``train_step`` (``xbn.BatchNorm`` training forward, then backward, gradients reset
  to None first) against ``F.batch_norm`` forward + autograd backward, and ``eval_forward``
  against ``F.batch_norm(training=False)``; channels-last inputs are torch's channels_last
  memory format on the same buffer, (N, C) inputs plain 2-D tensors.

Timing measures the GPU: one measurement is K back-to-back calls between one pair of CUDA
events, K chosen from a probe so that the window spans at least 1 ms (:func:`choose_k`); the
calls cycle through enough copies of the inputs that none finds its input in L2
(:func:`rotation`). Host work per call (Python, launches) counts only where the GPU would
otherwise wait for it: on the large shapes the GPU time is measured, on the launch-bound shape
the rate at which the host issues the work. Each op's implementations are measured in turn,
round after round; reported is the median of R rounds, R planned from the time left
(:func:`plan_repeats`, ``--budget-s``), so the benchmark fits the time it is given.

Reported per (configuration, op), in the rows of :func:`bench_row`: ``us`` (xbn),
``fraction_of_copy`` = the bytes the op must move (:data:`OP_BYTES` x the bytes of x) / its time
/ the device-to-device copy bandwidth measured in the same run (cudaMemcpy, bytes read +
written per second); ``vs_torch`` = xbn time / torch time (lower is better); ``vs_generic`` =
generic time / xbn time (higher is better).

Writes ``NAME.json`` (meta, rows, every sample), ``NAME.md`` (tables) and ``NAME.png`` under
``--out`` (default ``benchmarks/results``, NAME ``gpu``), rewritten after each configuration;
``--summary FILE`` also merges the rows and the copy bandwidth into ci/gpu_tier.sh's
summary.json. Run: ``xbn bench --gpu [-- OPTIONS]`` or ``python benchmarks/gpu.py [OPTIONS]``;
``--plan`` prints the configurations, bytes, buffer rotation and memory without a GPU.

The second half of this module is the GPU tier's bookkeeping (ci/gpu_tier.sh): summary.json,
pytest's summary line, compute-sanitizer's verdict. It is plain Python on NumPy alone, so the
tier loads it even where xbn's own dependencies are missing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EPS = 1e-5
MOMENTUM = 0.1


# -- configurations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One input of the benchmark: shape, channel axis, layout name, dtype, and what it is for."""

    shape: tuple[int, ...]
    axis: int
    layout: str
    dtype: str
    label: str

    @property
    def nbytes(self) -> int:
        """S, the bytes of x."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def channels(self) -> int:
        return self.shape[self.axis]

    @property
    def name(self) -> str:
        """``256x64x56x56 NCHW float32``"""
        return f"{'x'.join(map(str, self.shape))} {self.layout} {self.dtype}"


#: The GPU reference configurations, in order of value (a run short of time drops the last).
#: Large: 205 MB (NCHW, NHWC) and 268 MB ((N, C)) of x, over three times the L2 of an H100/H200
#: (50-60 MB), and rotated besides, so DRAM is measured; the float16 versions double N to keep
#: the same bytes. Odd spatial: 7x7 planes (no vector loads, 51 MB). Launch-bound: 256 KB,
#: where the per-call host work and launch latency are what is measured. docs/gpu.md lists
#: the same.
REFERENCE: list[Config] = [
    Config((256, 64, 56, 56), 1, "NCHW", "float32", "large"),
    Config((256, 56, 56, 64), -1, "NHWC", "float32", "large"),
    Config((65536, 1024), 1, "NC", "float32", "large"),
    Config((512, 64, 56, 56), 1, "NCHW", "float16", "large"),
    Config((512, 56, 56, 64), -1, "NHWC", "float16", "large"),
    Config((131072, 1024), 1, "NC", "float16", "large"),
    Config((128, 2048, 7, 7), 1, "NCHW", "float32", "odd spatial"),
    Config((64, 16, 8, 8), 1, "NCHW", "float32", "launch-bound"),
]
#: --quick: one large, the odd-spatial and the launch-bound configuration.
QUICK = [0, 6, 7]

#: The ops, in the order they are measured (the most telling first).
OPS = (
    "train_step",
    "stats",
    "scale_shift",
    "backward_reduce",
    "backward_apply",
    "forward",
    "backward",
    "eval_forward",
)
#: Bytes each op must move, in units of S (the bytes of x): stats reads x; scale_shift reads x
#: and writes y; backward_reduce reads x and dy; backward_apply reads x and dy and writes dx; a
#: training forward is stats + scale_shift, a backward backward_reduce + backward_apply, a
#: training step both; an eval forward reads x and writes y. Per-channel vectors are left out
#: (at most C x a few floats, under 0.1 % on every reference configuration).
OP_BYTES = {
    "stats": 1,
    "scale_shift": 2,
    "backward_reduce": 2,
    "backward_apply": 3,
    "forward": 3,
    "backward": 5,
    "train_step": 8,
    "eval_forward": 2,
}
#: What xbn is compared with on torch.
TORCH_OPS = {
    "stats": "torch.batch_norm_stats",
    "scale_shift": "torch.batch_norm_elemt",
    "backward_reduce": "torch.batch_norm_backward_reduce",
    "backward_apply": "torch.batch_norm_backward_elemt",
    "forward": "aten.native_batch_norm",
    "backward": "aten.native_batch_norm_backward",
    "train_step": "F.batch_norm + autograd backward",
    "eval_forward": "F.batch_norm(training=False)",
}
IMPLS = ("xbn", "torch", "generic")

#: A measurement window spans at least MIN_WINDOW_S; K aims at WINDOW_S.
MIN_WINDOW_S = 1e-3
WINDOW_S = 2e-3
K_MAX = 2000
R_MIN, R_MAX = 3, 15
#: Calls of one probe (one event pair), after two warm-up calls.
PROBE_CALLS = 3
#: Without --budget-s: seconds of measurement per op (all its implementations).
DEFAULT_OP_BUDGET_S = 1.0
#: Share of the time left that the remaining ops' measurements may plan on (the rest covers
#: warm-up, probes, input set-up and first-call compilation).
PLAN_SHARE = 0.5
#: A configuration starts only with this much of the budget left.
MIN_CONFIG_S = 3.0
COPY_BYTES = 1 << 30
#: Device memory a configuration needs besides its rotated inputs, in units of S: outputs of
#: the three implementations, the generic path's float32 temporaries (16-bit inputs), slack.
EXTRA_BUFFERS = 12
L2_DEFAULT = 50 << 20


def parse_shape(text: str, dtype: str = "float32") -> Config:
    """``32x64x56x56`` (channel axis 1) or ``32x56x56x64:-1``.

    >>> parse_shape("32x56x56x64:-1")
    Config(shape=(32, 56, 56, 64), axis=-1, layout='NHWC', dtype='float32', label='custom')
    """
    dims, _, axis = text.partition(":")
    shape = tuple(int(d) for d in dims.lower().split("x"))
    ax = int(axis) if axis else 1
    return Config(shape, ax, layout_name(shape, ax), dtype, "custom")


def layout_name(shape: tuple[int, ...], axis: int) -> str:
    """NCHW, NHWC, NC (2-D), or "axis A of an N-D array" for anything else torch has no name for.

    >>> layout_name((8, 3, 5, 5), 1), layout_name((8, 5, 5, 3), -1), layout_name((8, 3), 1)
    ('NCHW', 'NHWC', 'NC')
    """
    nd = len(shape)
    ax = axis % nd
    if nd == 2 and ax == 1:
        return "NC"
    if nd == 4 and ax == 1:
        return "NCHW"
    if nd == 4 and ax == 3:
        return "NHWC"
    return f"axis {axis} of {nd}-D"


def rotation(nbytes: int, l2_bytes: int, *, cap: int = 16) -> int:
    """How many copies of the inputs to cycle through so that the buffer a call reads was last
    touched at least 2 x L2 bytes of other reads ago (every op reads at least x): at least 2,
    at most ``cap`` (launch-bound shapes sit in L2 whatever is done, and it does not matter).

    >>> rotation(205 << 20, 50 << 20), rotation(51 << 20, 50 << 20), rotation(1 << 18, 50 << 20)
    (2, 3, 16)
    """
    return int(min(cap, max(2, math.ceil(2 * l2_bytes / max(1, nbytes)) + 1)))


def memory_needed(cfg: Config, copies: int) -> int:
    """Device bytes a configuration needs: x and dy in ``copies`` copies, plus EXTRA_BUFFERS S."""
    return (2 * copies + EXTRA_BUFFERS) * cfg.nbytes


# -- planning (plain Python, unit-tested on the CPU) -------------------------------------------


def choose_k(per_call_s: float, *, window_s: float = WINDOW_S, k_max: int | None = None) -> int:
    """Calls per measurement: enough back-to-back calls that one pair of events spans window_s.

    >>> choose_k(0.5e-3), choose_k(5e-3), choose_k(4e-6), choose_k(0.0)
    (4, 1, 500, 2000)
    """
    k_max = K_MAX if k_max is None else k_max
    if not per_call_s > 0 or not math.isfinite(per_call_s):
        return k_max
    return int(max(1, min(k_max, math.ceil(round(window_s / per_call_s, 6)))))


def plan_repeats(
    round_s: float, budget_s: float, *, r_min: int | None = None, r_max: int | None = None
) -> int:
    """Measurement rounds that fit ``budget_s`` when one round (every implementation's K calls)
    takes ``round_s``: at least r_min (a median needs a few), at most r_max.

    >>> plan_repeats(2e-3, 1.0), plan_repeats(0.1, 1.0), plan_repeats(1.0, 1.0)
    (15, 10, 3)
    """
    r_min = R_MIN if r_min is None else r_min
    r_max = R_MAX if r_max is None else r_max
    if not round_s > 0:
        return r_max
    return int(max(r_min, min(r_max, math.floor(round(budget_s / round_s, 6)))))


def op_budget(time_left_s: float | None, ops_left: int) -> float:
    """Seconds of measurement one op may plan on: a share of the time left over the ops left.

    >>> op_budget(None, 10), op_budget(40.0, 40), op_budget(-1.0, 3)
    (1.0, 0.5, 0.0)
    """
    if time_left_s is None:
        return DEFAULT_OP_BUDGET_S
    return max(0.0, PLAN_SHARE * time_left_s / max(1, ops_left))


def _round(v: float | None, digits: int = 4) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


def bench_row(
    cfg: Config, op: str, times: dict[str, float | None], copy_bandwidth: float | None, **extra: Any
) -> dict[str, Any]:
    """One row of summary.json's "bench": xbn's time and how it compares.

    ``times``: median seconds per call of "xbn", "torch", "generic" (None where not measured).
    fraction_of_copy = OP_BYTES[op] * S / xbn time / copy bandwidth; vs_torch = xbn / torch
    (lower is better); vs_generic = generic / xbn (higher is better).

    >>> cfg = Config((256, 64, 56, 56), 1, "NCHW", "float32", "large")
    >>> r = bench_row(cfg, "stats", {"xbn": 1e-4, "torch": 2e-4, "generic": 4e-4}, 4.1e12)
    >>> r["us"], r["fraction_of_copy"], r["vs_torch"], r["vs_generic"]
    (100.0, 0.5013, 0.5, 4.0)
    """
    t, tt, tg = (times.get(k) or None for k in IMPLS)  # 0 and None alike: not measured
    nbytes = OP_BYTES[op] * cfg.nbytes
    row: dict[str, Any] = {
        "name": op,
        "shape": list(cfg.shape),
        "layout": cfg.layout,
        "dtype": cfg.dtype,
        "us": _round(t * 1e6) if t else None,
        "fraction_of_copy": _round(nbytes / t / copy_bandwidth) if t and copy_bandwidth else None,
        "vs_torch": _round(t / tt) if t and tt else None,
        "vs_generic": _round(tg / t) if t and tg else None,
        "torch_us": _round(tt * 1e6) if tt else None,
        "generic_us": _round(tg * 1e6) if tg else None,
        "bytes": nbytes,
        "torch_op": TORCH_OPS.get(op),
        "label": cfg.label,
    }
    row.update(extra)
    return row


def plan_text(
    configs: list[Config],
    *,
    l2_bytes: int = L2_DEFAULT,
    budget_s: float | None = None,
    memory_bytes: int | None = None,
) -> str:
    """The benchmark's plan, without a GPU: per configuration its bytes, rotation and memory."""
    lines = []
    for cfg in configs:
        copies = rotation(cfg.nbytes, l2_bytes)
        need = memory_needed(cfg, copies)
        fits = "" if memory_bytes is None or need <= memory_bytes else "  (does not fit: skipped)"
        lines.append(
            f"  {cfg.name:32s} {cfg.label:12s} S={cfg.nbytes / 1e6:7.1f} MB  "
            f"{copies:2d} copies  needs {need / 1e9:5.2f} GB{fits}"
        )
    lines.append(
        f"  {len(configs)} configurations x {len(OPS)} ops x {len(IMPLS)} implementations; "
        f"windows >= {MIN_WINDOW_S * 1e3:.0f} ms, {R_MIN}-{R_MAX} rounds; "
        + (f"planned within {budget_s:.0f} s" if budget_s else "no time budget")
    )
    return "\n".join(lines)


# -- timing ------------------------------------------------------------------------------------


class Timer:
    """A pair of events: start() before the calls, stop() after them returns the seconds."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> float:
        raise NotImplementedError


class HostTimer(Timer):
    """perf_counter: for the unit tests, and a GPU-less smoke run of the planning."""

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        return time.perf_counter() - self._t0


class CupyTimer(Timer):
    def __init__(self) -> None:
        import cupy

        self._cupy = cupy
        self._a, self._b = cupy.cuda.Event(), cupy.cuda.Event()

    def start(self) -> None:
        self._a.record()

    def stop(self) -> float:
        self._b.record()
        self._b.synchronize()
        return float(self._cupy.cuda.get_elapsed_time(self._a, self._b)) * 1e-3


class TorchTimer(Timer):
    def __init__(self) -> None:
        import torch

        self._a = torch.cuda.Event(enable_timing=True)
        self._b = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        self._a.record()

    def stop(self) -> float:
        self._b.record()
        self._b.synchronize()
        return float(self._a.elapsed_time(self._b)) * 1e-3


Call = Callable[[int], Any]


class Case:
    """One implementation of one op: ``call(i)`` works on input set ``i % copies``."""

    def __init__(self, call: Call, timer: Timer, copies: int) -> None:
        self.call, self.timer, self.copies = call, timer, copies
        self.next = 0
        self.k = 1
        self.last = 0.0
        self.samples: list[float] = []

    def batch(self, k: int) -> float:
        """K back-to-back calls between one pair of events: seconds per call."""
        self.timer.start()
        for _ in range(k):
            self.call(self.next % self.copies)
            self.next += 1
        self.last = self.timer.stop() / k
        return self.last


def measure(cases: dict[str, Case], budget_s: float) -> dict[str, dict[str, Any]]:
    """Warm up, probe, choose each case's K (window >= MIN_WINDOW_S), plan the rounds within
    ``budget_s``, then measure round after round, every case once per round.

    Returns per case: median_s, k, rounds, samples (seconds per call); or error.
    """
    out: dict[str, dict[str, Any]] = {}
    live: dict[str, Case] = {}
    for name, case in cases.items():
        try:
            case.batch(2)  # warm-up: first-call compilation, allocator growth
            case.k = choose_k(case.batch(PROBE_CALLS))
            for _ in range(3):  # the probe can be off (a queue filling, clocks): check the window
                if case.batch(case.k) * case.k >= MIN_WINDOW_S or case.k >= choose_k(0.0):
                    break
                case.k = choose_k(case.last)
            live[name] = case
        except Exception as e:  # one implementation failing must not lose the others
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    rounds = plan_repeats(sum(c.k * c.last for c in live.values()), budget_s)
    for _ in range(rounds):
        for name, case in list(live.items()):
            try:
                case.samples.append(case.batch(case.k))
            except Exception as e:
                out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                del live[name]
    for name, case in live.items():
        out[name] = {
            "median_s": statistics.median(case.samples),
            "k": case.k,
            "rounds": len(case.samples),
            "samples": case.samples,
        }
    return out


# -- the GPU work ------------------------------------------------------------------------------


def _inputs(cfg: Config, copies: int, seed: int = 0) -> tuple[list[Any], list[Any]]:
    import cupy

    rng = cupy.random.RandomState(seed)
    xs = [rng.standard_normal(cfg.shape, dtype=cupy.float32).astype(cfg.dtype) for _ in range(copies)]
    dys = [rng.standard_normal(cfg.shape, dtype=cupy.float32).astype(cfg.dtype) for _ in range(copies)]
    return xs, dys


def _xbn_calls(cfg: Config, backend: Any, xs: list[Any], dys: list[Any]) -> dict[str, Call]:
    """op -> call(i) on one xbn backend (kernels or generic), through the registry and the layer."""
    import cupy

    import xbn

    ops, axis, c = backend.ops, cfg.axis, cfg.channels
    acc = cupy.float64 if cfg.dtype == "float64" else cupy.float32
    mean, var = ops.batch_stats(xs[0], axis=axis)
    inv = 1.0 / cupy.sqrt(var + EPS)
    half = cupy.full(c, 0.5, dtype=acc)
    # the layer's parameters and buffers: float32, with running statistics
    w, b = cupy.ones(c, dtype=cupy.float32), cupy.zeros(c, dtype=cupy.float32)
    rm, rv = cupy.zeros(c, dtype=cupy.float32), cupy.ones(c, dtype=cupy.float32)
    train = xbn.BatchNorm(c, axis=axis, backend=backend)
    evaluate = xbn.BatchNorm(c, axis=axis, backend=backend)
    evaluate.eval()

    def train_step(i: int) -> None:
        train.zero_grad()  # as torch's step: no gradient accumulation in the timed step
        train.forward(xs[i], training=True)
        train.backward(dys[i])

    return {
        "train_step": train_step,
        "stats": lambda i: ops.batch_stats(xs[i], axis=axis),
        "scale_shift": lambda i: ops.scale_shift(xs[i], inv, mean, axis=axis),
        "backward_reduce": lambda i: ops.backward_reduce(dys[i], xs[i], mean, axis=axis),
        "backward_apply": lambda i: ops.backward_apply(dys[i], xs[i], mean, inv, half, mean, axis=axis),
        "forward": lambda i: ops.batch_norm_forward(
            xs[i], w, b, rm, rv, axis=axis, eps=EPS, momentum=MOMENTUM
        ),
        "backward": lambda i: ops.batch_norm_backward(dys[i], xs[i], mean, inv, w, axis=axis),
        "eval_forward": lambda i: evaluate.forward(xs[i], training=False),
    }


def _torch_calls(cfg: Config, xs: list[Any], dys: list[Any]) -> dict[str, Call]:
    """op -> call(i) on torch, on the same buffers (DLPack); {} where torch has no such layout."""
    import torch
    import torch.nn.functional as F

    nd = len(cfg.shape)
    nhwc = cfg.layout == "NHWC"
    if cfg.axis % nd != 1 and not nhwc:
        return {}

    def as_torch(a: Any) -> Any:
        t = torch.from_dlpack(a)
        return t.permute(0, 3, 1, 2) if nhwc else t  # an NHWC buffer is NCHW in channels_last

    txs, tdys = [as_torch(a) for a in xs], [as_torch(a) for a in dys]
    c = cfg.channels
    pdt = torch.float64 if cfg.dtype == "float64" else torch.float32
    dev = txs[0].device  # the GPU (the tests run this on the CPU)
    w = torch.ones(c, device=dev, dtype=pdt)
    b = torch.zeros(c, device=dev, dtype=pdt)
    rm = torch.zeros(c, device=dev, dtype=pdt)
    rv = torch.ones(c, device=dev, dtype=pdt)
    # The per-channel inputs of the single passes, from plain reductions (so that one op torch
    # lacks for a layout fails alone, when it is measured).
    dims = [d for d in range(nd) if d != 1]  # channel dimension 1 in torch's (N, C, ...) view
    x0, dy0 = txs[0].to(pdt), tdys[0].to(pdt)
    mean = x0.mean(dims)
    invstd = torch.rsqrt(x0.var(dims, unbiased=False) + EPS)
    shape = [c if d == 1 else 1 for d in range(nd)]
    sum_dy = dy0.sum(dims)
    sum_dy_xmu = (dy0 * (x0 - mean.reshape(shape))).sum(dims)
    del x0, dy0
    count = torch.full((1,), txs[0].numel() // c, dtype=torch.int32, device=dev)
    leaves = [t.detach().requires_grad_(True) for t in txs]
    wl, bl = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    aten = torch.ops.aten

    def train_step(i: int) -> None:
        leaves[i].grad = wl.grad = bl.grad = None
        y = F.batch_norm(leaves[i], rm, rv, wl, bl, True, MOMENTUM, EPS)
        y.backward(tdys[i])

    return {
        "train_step": train_step,
        "stats": lambda i: torch.batch_norm_stats(txs[i], EPS),
        "scale_shift": lambda i: torch.batch_norm_elemt(txs[i], w, b, mean, invstd, EPS),
        "backward_reduce": lambda i: torch.batch_norm_backward_reduce(
            tdys[i], txs[i], mean, invstd, w, True, True, True
        ),
        "backward_apply": lambda i: torch.batch_norm_backward_elemt(
            tdys[i], txs[i], mean, invstd, w, sum_dy, sum_dy_xmu, count
        ),
        "forward": lambda i: aten.native_batch_norm(txs[i], w, b, rm, rv, True, MOMENTUM, EPS),
        "backward": lambda i: aten.native_batch_norm_backward(
            tdys[i], txs[i], w, rm, rv, mean, invstd, True, EPS, [True, True, True]
        ),
        "eval_forward": lambda i: F.batch_norm(txs[i], rm, rv, w, b, False, MOMENTUM, EPS),
    }


def copy_bandwidth(nbytes: int = COPY_BYTES) -> float:
    """Device-to-device cudaMemcpy bandwidth in bytes/s, counting bytes read + written (two
    buffers of ``nbytes``, far larger than L2), timed as the kernels are."""
    import cupy

    def copy_time() -> float:
        src = cupy.ones(nbytes // 4, dtype=cupy.float32)
        dst = cupy.empty_like(src)

        def copy(i: int) -> None:
            dst.data.copy_from_device_async(src.data, src.nbytes)

        result = measure({"copy": Case(copy, CupyTimer(), 1)}, budget_s=0.5)["copy"]
        if "error" in result:
            raise RuntimeError(f"timing the copy failed: {result['error']}")
        return float(result["median_s"])

    seconds = copy_time()
    cupy.get_default_memory_pool().free_all_blocks()
    return 2 * (nbytes // 4) * 4 / seconds


def gpu_info() -> dict[str, Any]:
    import cupy

    rt = cupy.cuda.runtime
    dev = cupy.cuda.Device()
    props = rt.getDeviceProperties(dev.id)
    name = props.get("name", b"?")
    info: dict[str, Any] = {
        "gpu": name.decode() if isinstance(name, bytes) else str(name),
        "compute_capability": dev.compute_capability,
        "sm_count": props.get("multiProcessorCount"),
        "l2_bytes": props.get("l2CacheSize"),
        "memory_bytes": props.get("totalGlobalMem"),
        "cuda_runtime": rt.runtimeGetVersion(),
        "cuda_driver_api": rt.driverGetVersion(),
        "cupy": cupy.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "driver": _nvidia_smi_query("driver_version"),
    }
    try:
        import torch

        info.update(
            torch=torch.__version__, torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version()
        )
    except ImportError:
        info["torch"] = None
    return info


def _nvidia_smi_query(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return lines[0] if lines else None


def run_config(
    cfg: Config,
    *,
    l2_bytes: int,
    with_torch: bool,
    with_generic: bool,
    deadline: float | None,
    ops_left: int,
    bandwidth: float,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Measure every op of one configuration; its rows and raw results."""
    import cupy

    from xbn import backends

    copies = rotation(cfg.nbytes, l2_bytes)
    free, _ = cupy.cuda.runtime.memGetInfo()
    free += cupy.get_default_memory_pool().free_bytes()
    need = memory_needed(cfg, copies)
    if need > free:
        msg = f"skipped: needs {need / 1e9:.1f} GB of device memory, {free / 1e9:.1f} GB free"
        return [bench_row(cfg, op, {}, bandwidth, error=msg) for op in OPS], {"error": msg}
    try:
        from xbn.kernels import cupy as kc

        route = kc.route(cfg.shape, cfg.dtype, axis=cfg.axis)
    except Exception:  # a name the kernels module no longer has: the route is only informative
        route = None
    xs, dys = _inputs(cfg, copies)
    fast = backends.resolve("cupy", generic=False)
    missing = set(backends.OP_NAMES) - set(fast.ops.fast)
    if missing:
        raise RuntimeError(f"the CuPy kernels are not registered for {sorted(missing)}")
    calls: dict[str, dict[str, Call]] = {"xbn": _xbn_calls(cfg, fast, xs, dys)}
    errors: dict[str, str] = {}
    if with_torch:
        try:
            calls["torch"] = _torch_calls(cfg, xs, dys)
        except Exception as e:
            errors["torch"] = f"{type(e).__name__}: {e}"[:300]
    if with_generic:
        calls["generic"] = _xbn_calls(cfg, backends.resolve("cupy", generic=True), xs, dys)
    timers: dict[str, Timer] = {"xbn": CupyTimer(), "generic": CupyTimer()}
    if "torch" in calls:
        timers["torch"] = TorchTimer()
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    raw: dict[str, Any] = {"copies": copies, "route": route, "ops": results}
    for op in OPS:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            rows.append(bench_row(cfg, op, {}, bandwidth, error="skipped: time budget spent"))
            ops_left -= 1
            continue
        cases = {impl: Case(c[op], timers[impl], copies) for impl, c in calls.items() if op in c}
        result = measure(cases, op_budget(left, ops_left))
        ops_left -= 1
        results[op] = result
        times = {impl: r.get("median_s") for impl, r in result.items()}
        op_errors = {impl: r["error"] for impl, r in result.items() if "error" in r} | errors
        rows.append(
            bench_row(
                cfg,
                op,
                times,
                bandwidth,
                route=route,
                copies=copies,
                k={impl: r.get("k") for impl, r in result.items() if "k" in r},
                rounds=result.get("xbn", {}).get("rounds"),
                error=op_errors.get("xbn"),
                errors=op_errors or None,
            )
        )
    del calls, xs, dys
    return rows, raw


# -- report ------------------------------------------------------------------------------------


def _num(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    g = meta.get("gpu") or {}
    bw = meta.get("copy_bandwidth_GBps")
    cc = "".join(map(str, g.get("compute_capability") or ""))
    lines = [
        "# xbn GPU benchmark: CUDA kernels vs PyTorch and the generic CuPy path",
        "",
        f"GPU: {g.get('gpu')} (sm_{cc}, {g.get('sm_count')} SMs, L2 "
        f"{(g.get('l2_bytes') or 0) >> 20} MiB), driver {g.get('driver')}, CUDA runtime "
        f"{g.get('cuda_runtime')}, CuPy {g.get('cupy')}, torch {g.get('torch')} (CUDA "
        f"{g.get('torch_cuda')}). Copy bandwidth (cudaMemcpy device to device, read + write): "
        f"{_num(bw, '.0f')} GB/s.",
        "",
        "Times in µs per call: K back-to-back calls per pair of CUDA events (windows >= 1 ms), "
        "inputs rotated past L2, median of the rounds. of copy = bytes the op must move / time / "
        "copy bandwidth; vs torch = xbn / torch (lower is better); vs generic = generic / xbn "
        "(higher is better). torch ops: " + "; ".join(f"{k}: {v}" for k, v in TORCH_OPS.items()) + ".",
        "",
        "| shape | layout | dtype | op | xbn µs | torch µs | generic µs | of copy | vs torch "
        "| vs generic | K | rounds |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        k = r.get("k") or {}
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['dtype']} | {r['name']} | "
            f"{_num(r['us'], '.1f')} | {_num(r.get('torch_us'), '.1f')} | "
            f"{_num(r.get('generic_us'), '.1f')} | {_num(r['fraction_of_copy'], '.2f')} | "
            f"{_num(r['vs_torch'], '.2f')} | {_num(r['vs_generic'], '.1f')} | {k.get('xbn', '—')} | "
            f"{r.get('rounds') or '—'} |"
        )
    problems = [(r, impl, e) for r in rows for impl, e in (r.get("errors") or {}).items()]
    problems += [(r, "xbn", r["error"]) for r in rows if r.get("error") and not r.get("errors")]
    if problems:
        lines += ["", "## Errors and skips", ""]
        lines += [
            f"- {'x'.join(map(str, r['shape']))} {r['layout']} {r['dtype']} {r['name']} ({impl}): {e}"
            for r, impl, e in problems
        ]
    for s in meta.get("skipped") or []:
        lines.append(f"- skipped {s}")
    lines += ["", f"Command: `{meta.get('command')}`", ""]
    return "\n".join(lines)


def write_plot(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys((tuple(r["shape"]), r["layout"], r["dtype"]) for r in rows))
    by = {(tuple(r["shape"]), r["layout"], r["dtype"], r["name"]): r for r in rows}
    labels = [f"{'x'.join(map(str, s))}\n{lay} {dt}" for s, lay, dt in configs]
    xs = np.arange(len(configs))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5))
    panels = [
        (
            ax1,
            ("stats", "scale_shift", "backward_reduce", "backward_apply", "train_step"),
            "fraction_of_copy",
            "achieved / copy bandwidth",
            1.0,
        ),
        (
            ax2,
            ("train_step", "forward", "backward", "eval_forward"),
            "vs_torch",
            "xbn time / torch time (lower is better)",
            1.0,
        ),
    ]
    for ax, ops, key, ylabel, ref in panels:
        width = 0.8 / len(ops)
        for j, op in enumerate(ops):
            vals = [by.get((*c, op), {}).get(key) for c in configs]
            ax.bar(
                xs + (j - (len(ops) - 1) / 2) * width,
                [np.nan if v is None else v for v in vals],
                width,
                label=op,
            )
        ax.axhline(ref, color="k", lw=1, ls="--")
        ax.set_ylabel(ylabel)
        ax.set_xticks(xs, labels, fontsize=7)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_outputs(
    args: argparse.Namespace, rows: list[dict[str, Any]], raw: dict[str, Any], meta: dict[str, Any]
) -> None:
    outputs = set(args.outputs.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / args.name
    if "json" in outputs:
        tmp = base.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": rows, "raw": raw}, indent=1))
        os.replace(tmp, base.with_suffix(".json"))
    if "md" in outputs:
        base.with_suffix(".md").write_text(markdown(rows, meta))
    if args.summary:
        update_summary(args.summary, copy_bandwidth_GBps=meta.get("copy_bandwidth_GBps"), bench=rows)


# -- main --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xbn bench --gpu", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="shapes like 32x64x56x56 (axis 1) or 32x56x56x64:-1, in --dtype "
        "(default: the reference configurations)",
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "float64"], help="dtype of --shapes"
    )
    p.add_argument("--quick", action="store_true", help="three reference configurations")
    p.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="plan the whole run within this many seconds (0: no limit, "
        f"{DEFAULT_OP_BUDGET_S:g} s of measurement per op)",
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--no-generic", action="store_true", help="skip the generic CuPy path")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    p.add_argument("--name", default="gpu", help="output file name stem (default gpu)")
    p.add_argument("--outputs", default="json,md,png", help="which of json, md, png to write")
    p.add_argument(
        "--summary",
        type=Path,
        default=None,
        help="also merge copy_bandwidth_GBps and the rows into this summary.json",
    )
    p.add_argument(
        "--plan",
        "--list",
        dest="plan",
        action="store_true",
        help="print the configurations, bytes, rotation and memory; no GPU needed",
    )
    return p


def _nothing() -> None:
    return None


OUTPUTS = ("json", "md", "png")


def checked_configs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Config]:
    """The configurations, after the options that need no GPU are checked (parser.error on a
    bad one, before anything runs). Without --plan, --out and --summary must be writable:
    their folders are created, and a probe file is written and removed."""
    configs = []
    for text in args.shapes or ():
        try:
            cfg = parse_shape(text, args.dtype)
        except ValueError:
            parser.error(f"argument --shapes: {text!r} is not DIMxDIMx... with an optional :AXIS")
        if len(cfg.shape) < 2 or min(cfg.shape) < 1:
            parser.error(f"argument --shapes: {text!r} needs at least two dimensions, each >= 1")
        if not -len(cfg.shape) <= cfg.axis < len(cfg.shape):
            parser.error(f"argument --shapes: {text!r}: axis {cfg.axis} is out of range")
        configs.append(cfg)
    if not (args.budget_s >= 0 and math.isfinite(args.budget_s)):
        parser.error(f"argument --budget-s: {args.budget_s} is not a number of seconds >= 0")
    unknown = [o for o in args.outputs.split(",") if o not in OUTPUTS]
    if unknown:
        parser.error(f"argument --outputs: {', '.join(unknown)} is not one of {', '.join(OUTPUTS)}")
    if not args.plan:
        for option, folder in (("--out", args.out), ("--summary", args.summary and args.summary.parent)):
            if folder is None:
                continue
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".xbn-bench-probe-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                parser.error(f"argument {option}: cannot write to {folder}: {e.strerror or e}")
    return configs or ([REFERENCE[i] for i in QUICK] if args.quick else list(REFERENCE))


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    parser = build_parser()
    args = parser.parse_args(argv)
    configs = checked_configs(parser, args)
    if args.plan:
        print(plan_text(configs, budget_s=args.budget_s or None))
        return 0
    try:
        import cupy
    except ImportError:
        print("xbn bench --gpu: CuPy is not installed", file=sys.stderr)
        return 2
    from xbn import backends

    try:
        backends.resolve("cupy")
    except backends.BackendUnavailableError as e:
        print(f"xbn bench --gpu: {e}", file=sys.stderr)
        return 2
    with_torch = not args.no_torch
    release_torch: Callable[[], Any] = _nothing
    if with_torch:
        try:
            import torch

            with_torch = torch.cuda.is_available()
            release_torch = torch.cuda.empty_cache
        except ImportError:
            with_torch = False
        if not with_torch:
            print("torch with CUDA not available: no torch comparison", file=sys.stderr)

    deadline = t0 + args.budget_s if args.budget_s > 0 else None
    info = gpu_info()
    bandwidth = copy_bandwidth()
    l2 = int(info.get("l2_bytes") or L2_DEFAULT)
    meta: dict[str, Any] = {
        "gpu": info,
        "copy_bandwidth_GBps": _round(bandwidth / 1e9),
        "budget_s": args.budget_s or None,
        "window_s": [MIN_WINDOW_S, WINDOW_S],
        "rounds": [R_MIN, R_MAX],
        "skipped": [],
        "command": "xbn bench --gpu " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(f"{info['gpu']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s, L2 {l2 >> 20} MiB", flush=True)
    print(
        plan_text(
            configs, l2_bytes=l2, budget_s=args.budget_s or None, memory_bytes=info.get("memory_bytes")
        ),
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    _write_outputs(args, rows, raw, meta)
    for index, cfg in enumerate(configs):
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left < MIN_CONFIG_S:
            meta["skipped"].append(f"{cfg.name}: time budget spent")
            print(f"{cfg.name:32s} skipped: time budget spent", flush=True)
            continue
        t1 = time.monotonic()
        try:
            cfg_rows, cfg_raw = run_config(
                cfg,
                l2_bytes=l2,
                with_torch=with_torch,
                with_generic=not args.no_generic,
                deadline=deadline,
                ops_left=(len(configs) - index) * len(OPS),
                bandwidth=bandwidth,
            )
        except Exception as e:  # record and go on: one configuration's failure loses nothing else
            msg = f"{type(e).__name__}: {e}"[:300]
            cfg_rows, cfg_raw = [bench_row(cfg, op, {}, bandwidth, error=msg) for op in OPS], {"error": msg}
        cupy.get_default_memory_pool().free_all_blocks()
        release_torch()
        rows += cfg_rows
        raw[cfg.name] = cfg_raw
        step = next((r for r in cfg_rows if r["name"] == "train_step"), {})
        print(
            f"{cfg.name:32s} train_step {_num(step.get('us'), '.1f')} µs  vs torch "
            f"{_num(step.get('vs_torch'), '.2f')}  vs generic {_num(step.get('vs_generic'), '.1f')}  "
            f"of copy {_num(step.get('fraction_of_copy'), '.2f')}  ({time.monotonic() - t1:.1f} s)"
            + (f"  ERROR {step['error']}" if step.get("error") else ""),
            flush=True,
        )
        _write_outputs(args, rows, raw, meta)
    if "png" in args.outputs.split(","):
        try:
            write_plot(args.out / f"{args.name}.png", rows)
        except ImportError:
            print("matplotlib not installed: no plot", file=sys.stderr)
    print()
    print(markdown(rows, meta))
    print(f"bench: {len(rows)} rows in {time.monotonic() - t0:.1f} s")
    failed = [r for r in rows if r.get("error") and not str(r["error"]).startswith("skipped")]
    return 1 if failed else 0


# -- the GPU tier's bookkeeping (ci/gpu_tier.sh) -----------------------------------------------
# Plain Python on the standard library: ci/gpu_tier.sh loads this module without running
# xbn/__init__.py, so summary.json is written even where xbn's dependencies are missing.

#: What a sanitizer script prints last when it ran to the end (ci/sanitize_kernels.py).
SANITIZE_DONE = "sanitize_kernels: done"
#: Exit status of coreutils timeout for a command it stopped (124), or killed after a grace (137).
TIMEOUT_RCS = (124, 137)

_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)\b")
_ERROR_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+) errors?")
_RACE_SUMMARY = re.compile(r"RACECHECK SUMMARY:\s*\d+ hazards? displayed \((\d+) errors?")
#: A sanitizer's report of a real finding (memcheck, racecheck, initcheck, synccheck).
_REPORT = re.compile(
    r"^=+ +(Invalid __\w+__|Misaligned|Out-of-range|Uninitialized __global__"
    r"|Barrier error|Error: Race reported|Program hit cuda)",
    re.M,
)
#: The sanitizer itself failing, or the device refused to the program: not a finding.
_REFUSAL = re.compile(r"^=+ +((?:Internal Sanitizer Error|Error): (?!Race reported).*)$", re.M)
_DEVICE_REFUSED = re.compile(
    r"(cudaErrorNoDevice|cudaErrorDevicesUnavailable|cudaErrorNotPermitted"
    r"|cudaErrorNotSupported|cudaErrorInsufficientDriver"
    r"|CUDA_ERROR_NOT_SUPPORTED|ERR_NVGPUCTRPERM)[^\n]*"
)


def parse_pytest_summary(text: str) -> dict[str, int] | None:
    """pytest's final counts ("3 failed, 120 passed, 5 skipped in 9.1s", also after an
    interruption); None if the output has no summary line.

    >>> parse_pytest_summary("...\\n2 failed, 40 passed, 3 skipped, 1 error in 12.34s\\n")
    {'passed': 40, 'failed': 2, 'skipped': 3, 'errors': 1}
    """
    for line in reversed(text.splitlines()):
        if re.search(r"\bin [\d.]+s\b", line) and _PYTEST_COUNT.search(line):
            counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
            for n, word in _PYTEST_COUNT.findall(line):
                key = {"error": "errors", "warning": "warnings"}.get(word, word)
                counts[key] = counts.get(key, 0) + int(n)
            return counts
    return None


def kernel_tests_skipped(text: str) -> str | None:
    """The reason tests/test_kernels_cupy.py was skipped as a whole (no usable GPU), if it was."""
    m = re.search(r"SKIPPED \[\d+\] tests/test_kernels_cupy\.py:\d+: (the CUDA kernels need.*)", text)
    return m.group(1).strip() if m else None


def classify_sanitizer(
    text: str, rc: int | None, *, budget_s: float | None = None, done_marker: str = SANITIZE_DONE
) -> str:
    """One tool's verdict: "clean", "errors: N", "skipped: <the tool's message>" (the tool
    absent or refusing the device: not a finding), or "failed: <why>" (no verdict: timed out,
    the script failed its own checks, or never got to its end).

    >>> classify_sanitizer("ok\\nsanitize_kernels: done: ...\\n========= ERROR SUMMARY: 0 errors", 0)
    'clean'
    >>> classify_sanitizer("========= Invalid __global__ read of size 4 bytes\\n"
    ...                    "========= ERROR SUMMARY: 3 errors", 1)
    'errors: 3'
    >>> classify_sanitizer("========= Error: Device not supported\\n", 1)
    'skipped: Error: Device not supported'
    """
    n = None
    m = _ERROR_SUMMARY.findall(text) or _RACE_SUMMARY.findall(text)
    if m:
        n = int(m[-1])
    reports = len(_REPORT.findall(text))
    refusal = _REFUSAL.search(text) or _DEVICE_REFUSED.search(text)
    if refusal and not reports:
        return "skipped: " + refusal.group(1 if refusal.re is _REFUSAL else 0).strip()[:300]
    if n or reports:
        return f"errors: {n or reports}"
    if rc in TIMEOUT_RCS:
        return f"failed: no verdict within {budget_s:g} s" if budget_s else "failed: timed out"
    if done_marker not in text:
        last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "no output")
        return f"failed: exit {rc} before the script's end: {last[:200]}"
    if n is None:
        return "failed: no sanitizer summary in the output"
    if rc:
        return f"failed: exit {rc}, 0 sanitizer errors: the script's own checks failed (see the log)"
    return "clean"


def read_summary(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError):
        return {}


def update_summary(path: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the JSON at ``path`` (dict values one level deep: "steps",
    "timing_s"), rewritten atomically, so a run stopped at any moment leaves valid JSON."""
    path = Path(path)
    data = read_summary(path)
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            merged = dict(data[key])
            for k, v in value.items():
                merged[k] = (
                    {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
                )
            data[key] = merged
        else:
            data[key] = value
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return data


def verdict(summary: dict[str, Any]) -> list[str]:
    """What keeps a tier run from passing ([] when it passes): a step with a non-zero exit
    status, failed or erroring tests, kernel tests skipped, a sanitizer verdict other than
    "clean" or "skipped: ...", bench rows with errors.

    >>> verdict({"steps": {"pytest": {"rc": 0, "failed": 0, "errors": 0},
    ...                    "sanitizer": {"memcheck": "clean", "racecheck": "skipped: no device"}}})
    []
    """
    problems = []
    for name, step in (summary.get("steps") or {}).items():
        if name == "sanitizer":
            problems += [
                f"sanitizer {tool}: {v}"
                for tool, v in step.items()
                if not (v == "clean" or str(v).startswith("skipped"))
            ]
            continue
        if not isinstance(step, dict) or step.get("not_run"):
            continue
        if step.get("rc") != 0:
            why = " (timed out)" if step.get("timed_out") else ""
            problems.append(f"{name}: exit status {step.get('rc')}{why}")
        if step.get("failed") or step.get("errors"):
            problems.append(f"{name}: {step.get('failed')} failed, {step.get('errors')} errors")
        if step.get("kernel_tests_skipped"):
            problems.append(f"{name}: the CUDA kernel tests were skipped: {step['kernel_tests_skipped']}")
    bad = [
        r for r in summary.get("bench") or [] if r.get("error") and not str(r["error"]).startswith("skipped")
    ]
    if bad:
        problems.append(f"bench: {len(bad)} rows with errors")
    return problems


def commit_of(root: Path) -> str | None:
    """XBN_COMMIT if set (a working-tree copy has no .git), else git's HEAD (+ "-dirty")."""
    if os.environ.get("XBN_COMMIT"):
        return os.environ["XBN_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
        if sha.returncode:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """summary.json's header: GPU, driver, CUDA, CuPy, torch (None for what is absent)."""
    env: dict[str, Any] = {
        "gpu": _nvidia_smi_query("name"),
        "driver": _nvidia_smi_query("driver_version"),
        "cuda": None,
        "cupy": None,
        "torch": None,
        "python": platform.python_version(),
    }
    try:
        import cupy

        env["cupy"] = cupy.__version__
        v = cupy.cuda.runtime.runtimeGetVersion()
        env["cuda"] = f"{v // 1000}.{v % 1000 // 10}"
        d = cupy.cuda.runtime.driverGetVersion()
        env["cuda_driver_api"] = f"{d // 1000}.{d % 1000 // 10}"
        if env["gpu"] is None and cupy.cuda.runtime.getDeviceCount():
            name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
            env["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
    except Exception as e:  # CuPy absent, or no driver or device: recorded, not fatal
        env["cupy_error"] = f"{type(e).__name__}: {e}"[:300]
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["torch_cuda_available"] = bool(torch.cuda.is_available())
    except Exception as e:
        env["torch_error"] = f"{type(e).__name__}: {e}"[:300]
    return env


def tier_main(argv: list[str] | None = None) -> int:
    """ci/gpu_tier.sh's bookkeeping: ``init``, ``env``, ``record``, ``verdict`` (see --help)."""
    p = argparse.ArgumentParser(prog="gpu_tier bookkeeping")
    sub = p.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init", help="start OUT/summary.json")
    init.add_argument("--planned-s", type=int, required=True)
    init.add_argument("--plan", default="", help="step=budget,... in order")
    sub.add_parser("env", help="print the environment, merge it into summary.json")
    rec = sub.add_parser("record", help="record one step's result from its log")
    rec.add_argument("--step", required=True)
    rec.add_argument("--kind", choices=["plain", "pytest", "sanitizer"], default="plain")
    rec.add_argument("--rc", type=int, default=None)
    rec.add_argument("--seconds", type=float, default=None)
    rec.add_argument("--budget", type=float, default=None)
    rec.add_argument("--log", type=Path, default=None)
    rec.add_argument("--skipped", default=None, help="the step did not run: why")
    rec.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra string fields of the step"
    )
    ver = sub.add_parser("verdict", help="print what failed; exit 1 if anything did")
    ver.add_argument("--elapsed", type=float, default=None, help="seconds the whole run took")
    for q in (init, rec, ver, sub.choices["env"]):
        q.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    path = args.out / "summary.json"

    if args.cmd == "init":
        plan = dict(kv.split("=", 1) for kv in args.plan.split(",") if "=" in kv)
        if path.exists():
            path.unlink()
        update_summary(
            path,
            gpu=None,
            driver=None,
            cuda=None,
            cupy=None,
            torch=None,
            commit=commit_of(Path.cwd()),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            planned_s=args.planned_s,
            plan_s={k: float(v) for k, v in plan.items()},
            copy_bandwidth_GBps=None,
            steps={},
            timing_s={},
            bench=[],
        )
        return 0
    if args.cmd == "env":
        env = environment()
        for k, v in env.items():
            print(f"{k}: {v}")
        update_summary(path, **env)
        return 0 if env.get("gpu") else 1
    if args.cmd == "verdict":
        summary = read_summary(path)
        problems = verdict(summary)
        extra = {} if args.elapsed is None else {"elapsed_s": args.elapsed}
        update_summary(path, ok=not problems, problems=problems, **extra)
        for line in problems:
            print(f"  FAILED  {line}")
        return 1 if problems else 0

    text = args.log.read_text(errors="replace") if args.log and args.log.exists() else ""
    fields: dict[str, Any] = {}
    if args.seconds is not None:
        fields["timing_s"] = {args.step: round(args.seconds, 1)}
    if args.kind == "sanitizer":
        value = (
            f"skipped: {args.skipped}"
            if args.skipped is not None
            else classify_sanitizer(text, args.rc, budget_s=args.budget)
        )
        fields["steps"] = {"sanitizer": {args.step: value}}
        print(f"   {args.step}: {value}")
    else:
        step: dict[str, Any] = {"rc": args.rc}
        if args.skipped is not None:
            step = {"rc": None, "not_run": args.skipped}
        if args.rc in TIMEOUT_RCS:
            step["timed_out"] = True
        if args.kind == "pytest" and args.skipped is None:
            step.update(parse_pytest_summary(text) or {"passed": 0, "failed": 0, "skipped": 0, "errors": 0})
            reason = kernel_tests_skipped(text)
            if reason:
                step["kernel_tests_skipped"] = reason
        for kv in args.set:
            k, _, v = kv.partition("=")
            step[k] = v
        fields["steps"] = {args.step: step}
    update_summary(path, **fields)
    return 0


if __name__ == "__main__":
    sys.exit(main())
