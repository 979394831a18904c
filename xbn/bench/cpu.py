"""CPU benchmark: xbn's NumPy backend against PyTorch's CPU batch norm and a naive NumPy one.

For each shape and thread count, each implementation is timed in fresh processes of its own,
one per round, the processes alternating (A B C A B C ..., the order rotated each round) so
that the load of a shared machine falls on all of them alike; medians and ratios are reported.
One process for all of them would not do: torch's kernels have been seen running 5-10x slower
in a process where numba's thread pool had run. Every process times its implementation warm (calls back to
back) and cold (a cache-flushing copy before every timed call); both are kept:

* ``xbn``: ``xbn.BatchNorm(..., backend="numpy")`` forward then ``backward`` (the fast paths of
  :mod:`xbn.kernels.numpy`, their pool sized to the thread count);
* ``torch``: ``aten.native_batch_norm`` then ``aten.native_batch_norm_backward`` (the same work
  as the layer: y, saved statistics, running stats, dx, dgamma, dbeta; no autograd bookkeeping),
  with ``torch.set_num_threads``; channels-last shapes use torch's channels_last memory format
  on the same buffer. The autograd route (``F.batch_norm`` + ``.backward``) is timed as well and
  kept in the JSON;
* ``naive``: a textbook NumPy batch norm (``mean``/``var`` over axes, a materialized x_hat);
* ``xbn_passes`` (when numba is in use): the same layer forced onto the NumPy passes, which is
  what runs where numba is not installed.

The floor is the byte count over a measured copy bandwidth (``np.copyto`` of a 256 MiB array,
read + write bytes, split over the threads: the cold timings' flushing copies, made in the same
processes, so that it sees the same machine load): training forward 3S, backward 5S, eval
forward 2S, S = bytes of x. Writes ``cpu.md``, ``cpu.json`` and ``cpu.png`` under ``--out``.

Run: ``xbn bench --cpu`` or ``python benchmarks/cpu.py`` (options: ``--help``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

import numpy as np

from . import REFERENCE_SHAPES

EPS = 1e-5
MOMENTUM = 0.1
COPY_BYTES = 256 << 20
#: The default set: the reference shapes, a wide C (64, 200000) whose per-channel state is a
#: few MB, and a tall (N, 16) with many rows of few channels. The last two stay out of
#: REFERENCE_SHAPES, which the GPU launch tests also walk.
SHAPES: list[tuple[tuple[int, ...], int, str]] = [
    *REFERENCE_SHAPES,
    ((64, 200000), 1, "NC wide"),
    ((1048576, 16), 1, "NC tall"),
]


def _parse_shape(text: str) -> tuple[tuple[int, ...], int, str]:
    """``32x64x56x56`` (channel axis 1) or ``32x56x56x64:-1``; ValueError names what is wrong."""
    dims, _, axis = text.partition(":")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
        ax = int(axis) if axis else 1
    except ValueError:
        raise ValueError(f"{text!r} is not like 32x64x56x56 or 32x56x56x64:-1") from None
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"{text!r}: a shape needs at least 2 dimensions, each at least 1")
    if not -len(shape) <= ax < len(shape):
        raise ValueError(f"{text!r}: channel axis {ax} is out of range for {len(shape)} dimensions")
    if math.prod(shape) // shape[ax] < 2:
        raise ValueError(f"{text!r}: training needs at least 2 values per channel")
    if ax % len(shape) == len(shape) - 1 and len(shape) > 2:
        return shape, ax, "NHWC" if len(shape) == 4 else "channels-last"
    return (
        shape,
        ax,
        {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}.get(len(shape), "custom") if ax == 1 else "custom",
    )


def _shape_arg(text: str) -> tuple[tuple[int, ...], int, str]:
    try:
        return _parse_shape(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n


def _torch_can_compare(shape: tuple[int, ...], axis: int) -> bool:
    """What _make_cases can hand to torch: channel axis 1, or NHWC as channels_last."""
    nd = len(shape)
    return axis % nd == 1 or (nd == 4 and axis % nd == 3)


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_writable(path: Path) -> str | None:
    """Why ``path`` cannot be written, or None; opening it creates nothing that stays."""
    existed = os.path.lexists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    if not existed:
        path.unlink()
    return None


def _shape_name(shape: tuple[int, ...], axis: int) -> str:
    return "x".join(map(str, shape)) + ("" if axis == 1 else f":{axis}")


# -- implementations ----------------------------------------------------------------------


class Naive:
    """Textbook NumPy batch norm: reductions over axes, x_hat materialized and cached."""

    def __init__(self, c: int, axis: int, ndim: int):
        self.axes = tuple(a for a in range(ndim) if a != axis % ndim)
        shape = [1] * ndim
        shape[axis] = c
        self.shape = tuple(shape)
        self.gamma = np.ones(self.shape, np.float32)
        self.beta = np.zeros(self.shape, np.float32)
        self.running_mean = np.zeros(self.shape, np.float32)
        self.running_var = np.ones(self.shape, np.float32)

    def forward(self, x: np.ndarray) -> np.ndarray:
        mean = x.mean(axis=self.axes, keepdims=True)
        var = x.var(axis=self.axes, keepdims=True)
        m = x.size // mean.size
        self.running_mean = (1 - MOMENTUM) * self.running_mean + MOMENTUM * mean
        self.running_var = (1 - MOMENTUM) * self.running_var + MOMENTUM * var * (m / (m - 1))
        self.invstd = 1.0 / np.sqrt(var + EPS)
        self.xhat = (x - mean) * self.invstd
        return self.gamma * self.xhat + self.beta

    def backward(self, dy: np.ndarray) -> np.ndarray:
        m = dy.size // self.invstd.size
        dbeta = dy.sum(axis=self.axes, keepdims=True)
        dgamma = (dy * self.xhat).sum(axis=self.axes, keepdims=True)
        self.grads = (dgamma, dbeta)
        return (self.gamma * self.invstd / m) * (m * dy - dbeta - self.xhat * dgamma)

    def eval(self, x: np.ndarray) -> np.ndarray:
        inv = 1.0 / np.sqrt(self.running_var + EPS)
        return (x - self.running_mean) * (inv * self.gamma) + self.beta


def _on_passes(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with xbn's NumPy fast paths forced onto the NumPy passes (no numba)."""
    from xbn.kernels import numpy as kn

    def run() -> Any:
        before = kn._engine
        kn._engine = "numpy"
        try:
            return fn()
        finally:
            kn._engine = before

    return run


def _make_cases(
    shape: tuple[int, ...],
    axis: int,
    with_torch: bool,
    with_passes: bool = False,
    only: frozenset[str] | None = None,
) -> dict[str, dict[str, Callable[[], Any]]]:
    """For each implementation: callables 'fwd', 'bwd' (after its own fwd) and 'eval'.

    ``only``: the names to build ('xbn', 'xbn_passes', 'naive', 'torch' with 'torch_autograd');
    a worker process builds its one implementation and nothing that could disturb it.
    """
    import xbn

    def want(name: str) -> bool:
        return only is None or name in only

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    c = shape[axis]
    cases: dict[str, dict[str, Callable[[], Any]]] = {}

    if want("xbn"):
        bn = xbn.BatchNorm(c, axis=axis, backend="numpy")
        cases["xbn"] = {
            "fwd": lambda: bn.forward(x, training=True),
            "bwd": lambda: bn.backward(dy),
            "eval": lambda: bn.forward(x, training=False),
        }
    if with_passes and want("xbn_passes"):
        bnp = xbn.BatchNorm(c, axis=axis, backend="numpy")
        cases["xbn_passes"] = {
            "fwd": _on_passes(lambda: bnp.forward(x, training=True)),
            "bwd": _on_passes(lambda: bnp.backward(dy)),
            "eval": _on_passes(lambda: bnp.forward(x, training=False)),
        }

    if want("naive"):
        naive = Naive(c, axis, len(shape))
        cases["naive"] = {
            "fwd": lambda: naive.forward(x),
            "bwd": lambda: naive.backward(dy),
            "eval": lambda: naive.eval(x),
        }

    if with_torch and want("torch"):
        import torch

        tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
        if axis % len(shape) == len(shape) - 1 and len(shape) == 4:
            # NHWC buffer seen as NCHW with channels_last strides: torch's own channels-last path
            tx, tdy = tx.permute(0, 3, 1, 2), tdy.permute(0, 3, 1, 2)
            assert tx.is_contiguous(memory_format=torch.channels_last)
        elif axis % len(shape) != 1:
            raise ValueError(f"torch comparison needs channel axis 1 or NHWC, got axis {axis} for {shape}")
        w, b = torch.ones(c), torch.zeros(c)
        rm, rv = torch.zeros(c), torch.ones(c)
        aten = torch.ops.aten
        saved: dict[str, Any] = {}
        threads = torch.get_num_threads()

        def pin() -> None:
            # numba's OpenMP threading layer can reset the OpenMP thread count that torch
            # reads (seen: 1 -> 2 after the first numba parallel loop); keep torch on its own
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

        def t_fwd() -> Any:
            pin()
            out, mean, invstd = aten.native_batch_norm(tx, w, b, rm, rv, True, MOMENTUM, EPS)
            saved.update(mean=mean, invstd=invstd)
            return out

        def t_bwd() -> Any:
            return aten.native_batch_norm_backward(
                tdy, tx, w, rm, rv, saved["mean"], saved["invstd"], True, EPS, [True, True, True]
            )

        def t_eval() -> Any:
            pin()
            return aten.native_batch_norm(tx, w, b, rm, rv, False, MOMENTUM, EPS)[0]

        cases["torch"] = {"fwd": t_fwd, "bwd": t_bwd, "eval": t_eval}

        ax_ = tx.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        wa, ba = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
        autograd: dict[str, Any] = {}

        def a_fwd() -> Any:
            pin()
            autograd["y"] = torch.nn.functional.batch_norm(ax_, rm, rv, wa, ba, True, MOMENTUM, EPS)
            return autograd["y"]

        def a_bwd() -> Any:
            ax_.grad = wa.grad = ba.grad = None
            autograd.pop("y").backward(tdy)

        cases["torch_autograd"] = {"fwd": a_fwd, "bwd": a_bwd}
    return cases


# -- measurement --------------------------------------------------------------------------


class Copy:
    """np.copyto of a large array, split over ``threads``: the bandwidth the floor is taken from.

    It runs inside the interleaved loop, once per round, so that the floor follows the same
    machine load as the timings it is compared with.
    """

    def __init__(self, threads: int, nbytes: int):
        n = nbytes // 4
        self.src = np.ones(n, np.float32)
        self.dst = np.empty_like(self.src)
        self.parts = [slice(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self.bytes = 2 * self.src.nbytes  # read + write

    def __call__(self) -> None:
        if self.pool is None:
            np.copyto(self.dst, self.src)
        else:
            list(self.pool.map(lambda s: np.copyto(self.dst[s], self.src[s]), self.parts))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _blas_limit(threads: int) -> Any:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def measure(
    cases: dict[str, dict[str, Callable[[], Any]]],
    repeats: int,
    copy: Copy,
    cold: bool = True,
    warmup: int = 2,
    flush_every: int = 20,
) -> dict[str, dict[str, list[float]]]:
    """Interleaved timings in seconds: per implementation, 'fwd', 'bwd', 'train' (= fwd + bwd
    of one step) and 'eval'; and the copy's bandwidth. Each repeat runs every implementation
    once, in turn.

    ``cold``: the copy (which flushes the caches) runs before every timed call, so that each
    implementation meets x and dy in DRAM; otherwise the second in line would find them in the
    L3 cache, warmed by the first, since all of them read the same buffers. Not ``cold``: the
    copy runs every 20th repeat only, and the data stays in cache, as a small input does between
    the layers of a network. ``flush_every=0``: never (every sample warm).
    """
    names = list(cases)
    out: dict[str, dict[str, list[float]]] = {
        n: {"fwd": [], "bwd": [], "train": [], "eval": []} for n in names
    }
    out["copy"] = {"bandwidth": []}
    clock = time.perf_counter

    def flush(r: int, first: bool) -> None:
        if cold or (flush_every and first and r % flush_every == 0):
            t0 = clock()
            copy()
            out["copy"]["bandwidth"].append(copy.bytes / (clock() - t0))

    for _ in range(warmup):
        copy()
        for n in names:
            cases[n]["fwd"](), cases[n]["bwd"]()
            if "eval" in cases[n]:
                cases[n]["eval"]()
    for r in range(repeats):
        for i, n in enumerate(names):
            c = cases[n]
            flush(r, i == 0)
            t0 = clock()
            c["fwd"]()
            t1 = clock()
            c["bwd"]()
            t2 = clock()
            out[n]["fwd"].append(t1 - t0)
            out[n]["bwd"].append(t2 - t1)
            out[n]["train"].append(t2 - t0)
        for n in names:
            if "eval" in cases[n]:
                flush(r, False)
                t0 = clock()
                cases[n]["eval"]()
                out[n]["eval"].append(clock() - t0)
    return out


def _set_threads(threads: int, with_torch: bool) -> None:
    from xbn.kernels import numpy as kn

    kn.set_num_threads(threads)
    if with_torch:
        import torch

        torch.set_num_threads(threads)


# -- one process per implementation ---------------------------------------------------------
# torch's kernels have been seen running 5-10x slower in a process where numba's thread pool
# had run (and numba's OpenMP layer resets torch's thread count); two libraries' pools on 2
# cores also compete for them while spinning idle. No process is shared, so neither can
# disturb the other. Each implementation is therefore timed in a fresh process of its own, the processes
# alternating A B C A B C ... so that a change in machine load falls on all of them alike.

#: worker process: which implementations it times together (torch's two routes share one)
_GROUPS = {
    "xbn": ("xbn",),
    "xbn_passes": ("xbn_passes",),
    "torch": ("torch", "torch_autograd"),
    "naive": ("naive",),
}


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one implementation (group) on one shape and thread count, warm and cold, in this
    process; returns the samples (seconds) and the copy bandwidths seen (bytes/s)."""
    impl, threads = spec["impl"], spec["threads"]
    shape, axis = tuple(spec["shape"]), spec["axis"]
    with_torch = impl == "torch"
    if impl in ("xbn", "xbn_passes"):
        from xbn.kernels import numpy as kn

        # the passes are what a plain install runs: the whole process on that engine
        kn.set_engine("numpy" if impl == "xbn_passes" else spec["engine"])
    _set_threads(threads, with_torch)
    copy = Copy(threads, spec["copy_bytes"])
    out: dict[str, Any] = {
        "pid": os.getpid(),
        "load_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    with _blas_limit(threads):
        cases = _make_cases(
            shape, axis, with_torch, with_passes=impl == "xbn_passes", only=frozenset(_GROUPS[impl])
        )
        for mode in ("warm", "cold"):
            raw = measure(
                cases,
                spec["repeats"],
                copy,
                cold=mode == "cold",
                warmup=spec["warmup"] if mode == "warm" else 1,
                flush_every=0,
            )
            out.setdefault("bandwidth", []).extend(raw.pop("copy")["bandwidth"])
            out[mode] = raw
    copy.close()
    out["load_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if impl in ("xbn", "xbn_passes"):
        from xbn.kernels import numpy as kn

        out["engine"] = kn.get_engine()
        if out["engine"] == "numba":
            import numba

            try:
                out["threading_layer"] = numba.threading_layer()
            except ValueError:  # no parallel loop ran: one thread takes the serial builds
                out["threading_layer"] = "none (serial builds only)"
    return out


def _worker_main() -> None:
    spec = json.loads(sys.argv[1])
    print(json.dumps(_worker(spec)))


def _run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """``_worker(spec)`` in a fresh Python process; its last line of output is the result."""
    import subprocess

    import xbn

    env = dict(os.environ)
    # the child imports this xbn, wherever the parent found it
    root = str(Path(xbn.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["XBN_NUM_THREADS"] = str(spec["threads"])
    code = "from xbn.bench.cpu import _worker_main; _worker_main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(
            f"benchmark worker {spec['impl']} {spec['shape']} threads={spec['threads']} failed "
            f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- machine ------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "logical_cpus": os.cpu_count(),
    }
    with suppress(AttributeError):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_parallel"] = torch.__config__.parallel_info().splitlines()[:6]
    except ImportError:
        info["torch"] = None
    try:
        import threadpoolctl

        info["blas"] = [
            {
                k: v
                for k, v in lib.items()
                if k
                in ("internal_api", "version", "architecture", "threading_layer", "num_threads", "prefix")
            }
            for lib in threadpoolctl.threadpool_info()
        ]
    except ImportError:
        cfg: dict[str, Any] = {}
        if np.lib.NumpyVersion(np.__version__) >= "1.25.0":
            cfg = dict(np.show_config(mode="dicts") or {})
        info["blas"] = cfg.get("Build Dependencies", {}).get("blas", "unknown")
    with suppress(OSError):
        info["cache"] = {
            p.name: (p / "size").read_text().strip()
            + " L"
            + (p / "level").read_text().strip()
            + " "
            + (p / "type").read_text().strip()
            for p in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))
        }
    return info


def _commit() -> str | None:
    """The measured checkout's commit, with '+dirty' when xbn's own files differ from it (the
    workers import the working tree, so a change made during a run is measured too)."""
    import subprocess

    import xbn

    root = Path(xbn.__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _span(before: str | None, after: str | None) -> str | None:
    """One commit, or 'A at the start, B at the end' when the checkout changed during the run."""
    return before if before == after else f"{before} at the start, {after} at the end"


# -- report -------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else (f"{v * 1e3:.2f}" if v >= 1e-3 else f"{v * 1e3:.3f}")


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def write_markdown(path: Path, results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    passes = all("xbn_passes" in r["median_s"] for r in results)
    lines = [
        "# xbn CPU benchmark: NumPy backend vs PyTorch CPU vs naive NumPy",
        "",
        f"Machine: {meta['machine'].get('cpu', '?')}, {meta['machine'].get('usable_cpus', '?')} usable "
        "cores; "
        f"NumPy {meta['machine']['numpy']}, torch {meta['machine'].get('torch')}, Python "
        f"{meta['machine']['python']}. "
        f"Copy bandwidth (np.copyto, read + write): "
        + ", ".join(
            f"{t} thread{'s' if t > 1 else ''} {bw / 1e9:.1f} GB/s"
            for t, bw in sorted(meta["bandwidth"].items())
        )
        + "."
        + (
            f" Load average (1 min) before / after the run: {meta['loadavg_before'][0]:.2f} / "
            f"{meta['loadavg_after'][0]:.2f}"
            f" on {meta['machine'].get('usable_cpus', '?')} cores (above 0 means other processes shared "
            "the machine)."
            if meta.get("loadavg_before") and meta.get("loadavg_after")
            else ""
        ),
        "",
        f"xbn engine: {meta['engine']} ("
        + (
            "compiled single-pass loops, numba; the NumPy passes, used where numba is not installed, "
            "are timed alongside as 'xbn NumPy passes'"
            if meta["engine"] == "numba"
            else "cache-blocked NumPy passes; numba not installed or not in use"
        )
        + "). "
        f"float32; median of {meta['repeats']}, times in ms. Each implementation runs in "
        "a fresh process of its own, one per round, the processes alternating (xbn, torch, naive, ... "
        "in turn, the order rotated each round): numba's thread pool slows torch in a process where it "
        "has run, so one shared process would not time either fairly. torch = aten native_batch_norm + "
        "native_batch_norm_backward (same work as the layer, no autograd); floor = bytes / copy "
        "bandwidth (median of the copies made in that row's processes, same thread count; train 8S, "
        "eval 2S). Every process times its implementation warm (calls back to back, x and dy left in "
        "cache by the previous call) and cold (a copy that flushes the caches before every timed call). "
        "The tables below the first are cold for inputs of 4 MiB and more and warm for smaller ones, "
        "which a real network hands from layer to layer in cache; the first table has both.",
        "",
        "## Training step, warm and cold",
        "",
        "| shape | layout | threads | load (1 min) | xbn/torch warm | xbn/torch cold | xbn/floor cold | "
        "torch/floor cold |"
        + (" passes/torch warm | passes/torch cold | passes/floor cold |" if passes else ""),
        "|---|---|---:|---|---:|---:|---:|---:|" + ("---:|---:|---:|" if passes else ""),
    ]
    for r in results:
        w, c, fl = r["median_warm_s"], r["median_cold_s"], r["floor_s"]["train"]
        tw, tc = w.get("torch", {}).get("train"), c.get("torch", {}).get("train")
        ld = r.get("loadavg_1min")
        lines.append(
            f"| {r['shape_name']} | {r['layout']} | {r['threads']} | "
            f"{f'{ld[0]:.2f}-{ld[1]:.2f}' if ld else '—'} | "
            f"{_ratio(w['xbn']['train'], tw)} | {_ratio(c['xbn']['train'], tc)} | "
            f"{_ratio(c['xbn']['train'], fl)} | {_ratio(tc, fl)} |"
            + (
                f" {_ratio(w['xbn_passes']['train'], tw)} | {_ratio(c['xbn_passes']['train'], tc)} | "
                f"{_ratio(c['xbn_passes']['train'], fl)} |"
                if passes
                else ""
            )
        )
    lines += [
        "",
        "## Training step (forward + backward)",
        "",
        "| shape | layout | threads | xbn ms | torch ms | naive ms | xbn/torch | xbn/floor | torch/floor |"
        + (" xbn NumPy passes ms | passes/torch | passes/floor |" if passes else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if passes else ""),
    ]
    for r in results:
        m = r["median_s"]
        t, fl = m.get("torch", {}).get("train"), r["floor_s"]["train"]
        lines.append(
            f"| {r['shape_name']} | {r['layout']} | {r['threads']} | {_ms(m['xbn']['train'])} | {_ms(t)} | "
            f"{_ms(m['naive']['train'])} | {_ratio(m['xbn']['train'], t)} | "
            f"{_ratio(m['xbn']['train'], fl)} | {_ratio(t, fl)} |"
            + (
                f" {_ms(m['xbn_passes']['train'])} | {_ratio(m['xbn_passes']['train'], t)} | "
                f"{_ratio(m['xbn_passes']['train'], fl)} |"
                if passes
                else ""
            )
        )
    lines += [
        "",
        "## Eval forward",
        "",
        "| shape | layout | threads | xbn ms | torch ms | naive ms | xbn/torch | xbn/floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r["median_s"]
        lines.append(
            f"| {r['shape_name']} | {r['layout']} | {r['threads']} | {_ms(m['xbn']['eval'])} | "
            f"{_ms(m.get('torch', {}).get('eval'))} | "
            f"{_ms(m['naive']['eval'])} | {_ratio(m['xbn']['eval'], m.get('torch', {}).get('eval'))} | "
            f"{_ratio(m['xbn']['eval'], r['floor_s']['eval'])} |"
        )
    lines += [
        "",
        "## Forward and backward separately (training)",
        "",
        "| shape | threads | xbn fwd | torch fwd | xbn bwd | torch bwd | fwd xbn/floor (3S) | bwd "
        "xbn/floor (5S) | torch autograd step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r["median_s"]
        t = m.get("torch", {})
        lines.append(
            f"| {r['shape_name']} | {r['threads']} | {_ms(m['xbn']['fwd'])} | {_ms(t.get('fwd'))} | "
            f"{_ms(m['xbn']['bwd'])} | "
            f"{_ms(t.get('bwd'))} | {_ratio(m['xbn']['fwd'], r['floor_s']['fwd'])} | "
            f"{_ratio(m['xbn']['bwd'], r['floor_s']['bwd'])} | "
            f"{_ms(m.get('torch_autograd', {}).get('train'))} |"
        )
    lines += [
        "",
        f"Command: `{meta['command']}`" + (f", commit {meta['commit']}" if meta.get("commit") else ""),
        "",
    ]
    path.write_text("\n".join(lines))


def write_plot(path: Path, results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thread_counts = sorted({r["threads"] for r in results})
    fig, axes = plt.subplots(
        1, len(thread_counts), figsize=(6.5 * len(thread_counts), 4.8), squeeze=False, sharey=True
    )
    impls = [("xbn", "#1f77b4"), ("torch", "#ff7f0e"), ("naive", "#7f7f7f")]
    if all("xbn_passes" in r["median_s"] for r in results):
        impls.insert(1, ("xbn_passes", "#9ecae1"))
    for ax, t in zip(axes[0], thread_counts):
        rows = [r for r in results if r["threads"] == t]
        xs = np.arange(len(rows))
        width = 0.8 / len(impls)
        for k, (name, color) in enumerate(impls):
            vals = [
                r["median_s"].get(name, {}).get("train", float("nan")) / r["floor_s"]["train"] for r in rows
            ]
            label = {"xbn": "xbn", "xbn_passes": "xbn, NumPy passes"}.get(name, name)
            ax.bar(xs + (k - (len(impls) - 1) / 2) * width, vals, width, label=label, color=color)
        ax.axhline(1.0, color="k", lw=1, ls="--", label="floor (8S / copy BW)")
        ax.set_yscale("log")
        ax.set_xticks(
            xs, [r["shape_name"].replace(":-1", "\nNHWC") for r in rows], rotation=30, ha="right", fontsize=8
        )
        ax.set_title(f"training forward + backward, {t} thread{'s' if t > 1 else ''}")
        ax.set_ylabel("time / memory-bandwidth floor (log)")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xbn bench --cpu", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--threads", type=_positive_int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)"
    )
    p.add_argument(
        "--shapes",
        type=_shape_arg,
        nargs="+",
        default=None,
        help="shapes like 32x64x56x56 (channel axis 1) or 32x56x56x64:-1 (default: the reference set)",
    )
    p.add_argument(
        "--repeats",
        type=_positive_int,
        default=None,
        help="timed repeats per case, at least 1 (default 15; inputs under 4 MiB at least 200)",
    )
    p.add_argument(
        "--rounds",
        type=_positive_int,
        default=None,
        help="fresh processes per implementation, alternated, the repeats split among them "
        "(default 3; --quick 1)",
    )
    p.add_argument("--out", default="benchmarks/results", help="output folder (default: benchmarks/results)")
    p.add_argument(
        "--quick", action="store_true", help="3 repeats and a 64 MiB copy: a smoke run (not with --repeats)"
    )
    p.add_argument(
        "--engine",
        choices=["auto", "numpy", "numba"],
        default="auto",
        help="xbn's NumPy fast paths: compiled loops when numba is installed (auto), or NumPy passes",
    )
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if it is installed")
    p.add_argument("--no-plot", action="store_true", help="skip cpu.png")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Every check below runs before any measurement, so that a bad option fails in a second and
    # not after minutes of benchmarking.
    most = 8 * (os.cpu_count() or 1)
    for t in args.threads:
        if t > most:
            # a thread pool of that size measures the scheduler, and a huge one fails to start
            parser.error(f"--threads {t}: more than 8 per logical CPU ({most} here)")
    if args.quick and args.repeats is not None:
        parser.error("--quick runs 3 repeats; give --quick or --repeats, not both")
    shapes = args.shapes or SHAPES
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch is not installed: comparing with the naive NumPy reference only", file=sys.stderr)
            with_torch = False
    if with_torch:
        for shape, axis, _ in shapes:
            if not _torch_can_compare(shape, axis):
                parser.error(
                    f"--shapes {_shape_name(shape, axis)}: the torch comparison needs channel "
                    "axis 1 or NHWC (4-D, axis -1); add --no-torch to time it without torch"
                )
    memory = _memory_bytes()
    for shape, axis, _ in shapes:
        # x and dy, each implementation's outputs and saved tensors, the naive one's temporaries
        need = 16 * math.prod(shape) * 4
        if memory and need > memory:
            parser.error(
                f"--shapes {_shape_name(shape, axis)}: needs about {need / 2**30:.1f} GiB, "
                f"more than this machine's {memory / 2**30:.1f} GiB"
            )
    from xbn.kernels import numpy as kn

    try:
        kn.set_engine(args.engine)
    except ImportError as e:
        parser.error(f"--engine {args.engine}: {e}")
    engine = kn.get_engine()
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        parser.error(f"--out {out}: not a folder")
    except OSError as e:
        parser.error(f"--out {out}: cannot create the folder ({e.strerror or e})")
    for name in ["cpu.json", "cpu.md"] + ([] if args.no_plot else ["cpu.png"]):
        why = _check_writable(out / name)
        if why:
            parser.error(f"--out {out}: cannot write {name} there ({why})")
    print(f"xbn NumPy fast paths on the {engine} engine", flush=True)
    copy_bytes = (64 << 20) if args.quick else COPY_BYTES

    rounds = args.rounds or (1 if args.quick else 3)
    impls = (
        ["xbn"]
        + (["xbn_passes"] if engine == "numba" else [])
        + (["torch"] if with_torch else [])
        + ["naive"]
    )
    bandwidth: dict[int, list[float]] = {}
    results: list[dict[str, Any]] = []
    layers: set[str] = set()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    commit_before = _commit()
    for threads in args.threads:
        for shape, axis, layout in shapes:
            nbytes = math.prod(shape) * 4
            small = nbytes < (4 << 20)
            repeats = 3 if args.quick else (args.repeats or 15)
            if small and not args.quick:
                repeats = max(repeats, 200)  # sub-millisecond steps need many samples
            per_round = -(-repeats // rounds)
            raw: dict[str, dict[str, dict[str, list[float]]]] = {}
            bw_samples: list[float] = []
            loads: list[float] = []
            procs: list[dict[str, Any]] = []
            for rnd in range(rounds):
                # rotated each round, so that no implementation always follows the same one
                order = impls[rnd % len(impls) :] + impls[: rnd % len(impls)]
                for impl in order:
                    res = _run_worker(
                        {
                            "impl": impl,
                            "shape": list(shape),
                            "axis": axis,
                            "threads": threads,
                            "repeats": per_round,
                            "warmup": 2,
                            "copy_bytes": copy_bytes,
                            "engine": args.engine,
                        }
                    )
                    procs.append({"impl": impl, "round": rnd, "pid": res.get("pid")})
                    bw_samples += res["bandwidth"]
                    loads += [ld[0] for ld in (res["load_before"], res["load_after"]) if ld]
                    if res.get("threading_layer"):
                        layers.add(res["threading_layer"])
                    for mode in ("warm", "cold"):
                        for name, d in res[mode].items():
                            for k, v in d.items():
                                raw.setdefault(name, {}).setdefault(mode, {}).setdefault(k, []).extend(v)
            bandwidth.setdefault(threads, []).extend(bw_samples)
            med = {
                mode: {
                    n: {k: (statistics.median(v[mode][k]) if v[mode][k] else None) for k in v[mode]}
                    for n, v in raw.items()
                }
                for mode in ("warm", "cold")
            }
            bwt = statistics.median(bw_samples)
            floor = {
                "fwd": 3 * nbytes / bwt,
                "bwd": 5 * nbytes / bwt,
                "train": 8 * nbytes / bwt,
                "eval": 2 * nbytes / bwt,
            }
            r = {
                "shape": list(shape),
                "axis": axis,
                "layout": layout,
                "shape_name": _shape_name(shape, axis),
                "threads": threads,
                "bytes": nbytes,
                "repeats": per_round * rounds,
                "rounds": rounds,
                "copy_bandwidth_Bps": bwt,
                # a small input lives in cache between the layers of a network: judged warm
                "primary": "warm" if small else "cold",
                "median_s": med["warm" if small else "cold"],
                "median_warm_s": med["warm"],
                "median_cold_s": med["cold"],
                "floor_s": floor,
                "loadavg_1min": [min(loads), max(loads)] if loads else None,
                "processes": procs,
                "times_s": raw,
            }
            results.append(r)
            m = r["median_s"]
            t = m.get("torch", {}).get("train")
            print(
                f"{r['shape_name']:>20} threads={threads} ({r['primary']})  train: xbn "
                f"{_ms(m['xbn']['train'])} ms, "
                f"torch {_ms(t)} ms, naive {_ms(m['naive']['train'])} ms, xbn/torch "
                f"{_ratio(m['xbn']['train'], t)}, "
                f"xbn/floor {_ratio(m['xbn']['train'], floor['train'])}; warm xbn/torch "
                f"{_ratio(med['warm']['xbn']['train'], med['warm'].get('torch', {}).get('train'))}; eval "
                "xbn/torch "
                f"{_ratio(m['xbn']['eval'], m.get('torch', {}).get('eval'))}"
                + (f"; passes/torch {_ratio(m['xbn_passes']['train'], t)}" if "xbn_passes" in m else ""),
                flush=True,
            )

    command = "xbn bench --cpu -- " + " ".join(argv if argv is not None else sys.argv[1:])
    default_repeats = "3" if args.quick else f"{args.repeats or 15} (at least 200 for inputs under 4 MiB)"
    default_repeats += f" repeats in {rounds} round{'s' if rounds > 1 else ''} of fresh processes"
    if engine == "numba":
        import numba

        machine_numba = {
            "numba": numba.__version__,
            "threading_layer": ", ".join(sorted(layers)) or "none (serial builds only)",
        }
    else:
        machine_numba = {}
    meta = {
        "machine": {**machine_info(), **machine_numba},
        "commit": _span(commit_before, _commit()),
        "bandwidth": {t: statistics.median(v) for t, v in bandwidth.items()},
        "engine": engine,
        "repeats": default_repeats,
        "rounds": rounds,
        "processes": "one per implementation and round",
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "quick": args.quick,
        "command": command.strip(),
        "copy_bytes": copy_bytes,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / "cpu.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    write_markdown(out / "cpu.md", results, meta)
    if not args.no_plot:
        try:
            write_plot(out / "cpu.png", results)
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)
    print(f"wrote {out / 'cpu.md'}, {out / 'cpu.json'}" + ("" if args.no_plot else f", {out / 'cpu.png'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
