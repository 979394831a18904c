"""CPU benchmark: xbn's NumPy backend against PyTorch's CPU batch norm and a naive NumPy one.

For each shape and thread count, three implementations run interleaved (A B C A B C ...), so
that the load of a shared machine falls on all of them alike; medians and ratios are reported:

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
read + write bytes, split over the threads, run inside the same interleaved loop so that it
sees the same machine load): training forward 3S, backward 5S, eval forward 2S, S = bytes of x. Writes ``cpu.md``, ``cpu.json`` and ``cpu.png`` under ``--out``.

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
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import REFERENCE_SHAPES

EPS = 1e-5
MOMENTUM = 0.1
COPY_BYTES = 256 << 20


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
    return shape, ax, {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}.get(len(shape), "custom") if ax == 1 else "custom"


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


def _make_cases(shape: tuple[int, ...], axis: int, with_torch: bool, with_passes: bool = False) -> dict[str, dict[str, Callable[[], Any]]]:
    """For each implementation: callables 'fwd', 'bwd' (after its own fwd) and 'eval'."""
    import xbn

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    c = shape[axis]
    cases: dict[str, dict[str, Callable[[], Any]]] = {}

    bn = xbn.BatchNorm(c, axis=axis, backend="numpy")
    cases["xbn"] = {
        "fwd": lambda: bn.forward(x, training=True),
        "bwd": lambda: bn.backward(dy),
        "eval": lambda: bn.forward(x, training=False),
    }
    if with_passes:
        bnp = xbn.BatchNorm(c, axis=axis, backend="numpy")
        cases["xbn_passes"] = {
            "fwd": _on_passes(lambda: bnp.forward(x, training=True)),
            "bwd": _on_passes(lambda: bnp.backward(dy)),
            "eval": _on_passes(lambda: bnp.forward(x, training=False)),
        }

    naive = Naive(c, axis, len(shape))
    cases["naive"] = {"fwd": lambda: naive.forward(x), "bwd": lambda: naive.backward(dy), "eval": lambda: naive.eval(x)}

    if with_torch:
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
    cases: dict[str, dict[str, Callable[[], Any]]], repeats: int, copy: Copy, cold: bool = True, warmup: int = 2
) -> dict[str, dict[str, list[float]]]:
    """Interleaved timings in seconds: per implementation, 'fwd', 'bwd', 'train' (= fwd + bwd
    of one step) and 'eval'; and the copy's bandwidth. Each repeat runs every implementation
    once, in turn.

    ``cold``: the copy (which flushes the caches) runs before every timed call, so that each
    implementation meets x and dy in DRAM; otherwise the second in line would find them in the
    L3 cache, warmed by the first, since all of them read the same buffers. Not ``cold``: the
    copy runs every 20th repeat only, and the data stays in cache, as a small input does between
    the layers of a network.
    """
    names = list(cases)
    out: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "bwd": [], "train": [], "eval": []} for n in names}
    out["copy"] = {"bandwidth": []}
    clock = time.perf_counter

    def flush(r: int, first: bool) -> None:
        if cold or (first and r % 20 == 0):
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


# -- machine ------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "logical_cpus": os.cpu_count(),
    }
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
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
            {k: v for k, v in lib.items() if k in ("internal_api", "version", "architecture", "threading_layer", "num_threads", "prefix")}
            for lib in threadpoolctl.threadpool_info()
        ]
    except ImportError:
        cfg = np.show_config(mode="dicts") if np.lib.NumpyVersion(np.__version__) >= "1.25.0" else {}
        info["blas"] = cfg.get("Build Dependencies", {}).get("blas", "unknown")
    try:
        info["cache"] = {
            p.name: (p / "size").read_text().strip() + " L" + (p / "level").read_text().strip() + " " + (p / "type").read_text().strip()
            for p in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))
        }
    except OSError:
        pass
    return info


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
        f"Machine: {meta['machine'].get('cpu', '?')}, {meta['machine'].get('usable_cpus', '?')} usable cores; "
        f"NumPy {meta['machine']['numpy']}, torch {meta['machine'].get('torch')}, Python {meta['machine']['python']}. "
        f"Copy bandwidth (np.copyto, read + write): "
        + ", ".join(f"{t} thread{'s' if t > 1 else ''} {bw / 1e9:.1f} GB/s" for t, bw in sorted(meta["bandwidth"].items()))
        + "."
        + (f" Load average (1 min) before / after the run: {meta['loadavg_before'][0]:.2f} / {meta['loadavg_after'][0]:.2f}"
           f" on {meta['machine'].get('usable_cpus', '?')} cores (above 0 means other processes shared the machine)."
           if meta.get("loadavg_before") and meta.get("loadavg_after") else ""),
        "",
        f"xbn engine: {meta['engine']} ("
        + ("compiled single-pass loops, numba; the NumPy passes, used where numba is not installed, "
           "are timed alongside as 'xbn NumPy passes'" if meta["engine"] == "numba"
           else "cache-blocked NumPy passes; numba not installed or not in use")
        + "). "
        f"float32; median of {meta['repeats']} interleaved repeats (xbn, torch, naive in turn), "
        "times in ms. torch = aten native_batch_norm + native_batch_norm_backward (same work as the "
        "layer, no autograd); floor = bytes / copy bandwidth (median of copies interleaved with that "
        "row's timings, same thread count; train 8S, eval 2S). The copy flushes the caches: inputs "
        "of 4 MiB and more are timed cold, a copy before every timed call of every implementation "
        "(they all read the same x and dy, so the second in line would otherwise find them in L3); "
        "smaller ones, which a real network hands from layer to layer in cache, are timed warm "
        "(a copy every 20th round).",
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
            + (f" {_ms(m['xbn_passes']['train'])} | {_ratio(m['xbn_passes']['train'], t)} | {_ratio(m['xbn_passes']['train'], fl)} |"
               if passes else "")
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
            f"| {r['shape_name']} | {r['layout']} | {r['threads']} | {_ms(m['xbn']['eval'])} | {_ms(m.get('torch', {}).get('eval'))} | "
            f"{_ms(m['naive']['eval'])} | {_ratio(m['xbn']['eval'], m.get('torch', {}).get('eval'))} | "
            f"{_ratio(m['xbn']['eval'], r['floor_s']['eval'])} |"
        )
    lines += [
        "",
        "## Forward and backward separately (training)",
        "",
        "| shape | threads | xbn fwd | torch fwd | xbn bwd | torch bwd | fwd xbn/floor (3S) | bwd xbn/floor (5S) | torch autograd step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r["median_s"]
        t = m.get("torch", {})
        lines.append(
            f"| {r['shape_name']} | {r['threads']} | {_ms(m['xbn']['fwd'])} | {_ms(t.get('fwd'))} | {_ms(m['xbn']['bwd'])} | "
            f"{_ms(t.get('bwd'))} | {_ratio(m['xbn']['fwd'], r['floor_s']['fwd'])} | {_ratio(m['xbn']['bwd'], r['floor_s']['bwd'])} | "
            f"{_ms(m.get('torch_autograd', {}).get('train'))} |"
        )
    lines += ["", f"Command: `{meta['command']}`", ""]
    path.write_text("\n".join(lines))


def write_plot(path: Path, results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thread_counts = sorted({r["threads"] for r in results})
    fig, axes = plt.subplots(1, len(thread_counts), figsize=(6.5 * len(thread_counts), 4.8), squeeze=False, sharey=True)
    impls = [("xbn", "#1f77b4"), ("torch", "#ff7f0e"), ("naive", "#7f7f7f")]
    if all("xbn_passes" in r["median_s"] for r in results):
        impls.insert(1, ("xbn_passes", "#9ecae1"))
    for ax, t in zip(axes[0], thread_counts):
        rows = [r for r in results if r["threads"] == t]
        xs = np.arange(len(rows))
        width = 0.8 / len(impls)
        for k, (name, color) in enumerate(impls):
            vals = [r["median_s"].get(name, {}).get("train", float("nan")) / r["floor_s"]["train"] for r in rows]
            label = {"xbn": "xbn", "xbn_passes": "xbn, NumPy passes"}.get(name, name)
            ax.bar(xs + (k - (len(impls) - 1) / 2) * width, vals, width, label=label, color=color)
        ax.axhline(1.0, color="k", lw=1, ls="--", label="floor (8S / copy BW)")
        ax.set_yscale("log")
        ax.set_xticks(xs, [r["shape_name"].replace(":-1", "\nNHWC") for r in rows], rotation=30, ha="right", fontsize=8)
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
    p.add_argument("--threads", type=_positive_int, nargs="+", default=[1, 2],
                   help="thread counts (default: 1 2)")
    p.add_argument("--shapes", type=_shape_arg, nargs="+", default=None,
                   help="shapes like 32x64x56x56 (channel axis 1) or 32x56x56x64:-1 (default: the reference set)")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed repeats per case, at least 1 (default 15; inputs under 4 MiB at least 200)")
    p.add_argument("--out", default="benchmarks/results", help="output folder (default: benchmarks/results)")
    p.add_argument("--quick", action="store_true",
                   help="3 repeats and a 64 MiB copy: a smoke run (not with --repeats)")
    p.add_argument("--engine", choices=["auto", "numpy", "numba"], default="auto",
                   help="xbn's NumPy fast paths: compiled loops when numba is installed (auto), or NumPy passes")
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
    shapes = args.shapes or REFERENCE_SHAPES
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
                parser.error(f"--shapes {_shape_name(shape, axis)}: the torch comparison needs channel "
                             "axis 1 or NHWC (4-D, axis -1); add --no-torch to time it without torch")
    memory = _memory_bytes()
    for shape, axis, _ in shapes:
        # x and dy, each implementation's outputs and saved tensors, the naive one's temporaries
        need = 16 * math.prod(shape) * 4
        if memory and need > memory:
            parser.error(f"--shapes {_shape_name(shape, axis)}: needs about {need / 2**30:.1f} GiB, "
                         f"more than this machine's {memory / 2**30:.1f} GiB")
    # numba's default OpenMP layer shares libgomp with torch and disturbs it (torch's OpenMP
    # thread count reset, its 2-thread small-shape step 100x slower); this process launches
    # numba loops from one thread only, which the plain work queue layer supports
    os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
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

    bandwidth: dict[int, list[float]] = {}
    results: list[dict[str, Any]] = []
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    for threads in args.threads:
        _set_threads(threads, with_torch)
        copy = Copy(threads, copy_bytes)
        with _blas_limit(threads):
            for shape, axis, layout in shapes:
                nbytes = math.prod(shape) * 4
                small = nbytes < (4 << 20)
                repeats = 3 if args.quick else (args.repeats or 15)
                if small and not args.quick:
                    repeats = max(repeats, 200)  # sub-millisecond steps need many samples
                cases = _make_cases(shape, axis, with_torch, with_passes=engine == "numba")
                # a small input lives in cache between the layers of a real network: timed warm
                raw = measure(cases, repeats, copy, cold=not small)
                del cases
                bw_samples = raw.pop("copy")["bandwidth"]
                bandwidth.setdefault(threads, []).extend(bw_samples)
                med = {n: {k: (statistics.median(v) if v else None) for k, v in d.items()} for n, d in raw.items()}
                bwt = statistics.median(bw_samples)
                floor = {"fwd": 3 * nbytes / bwt, "bwd": 5 * nbytes / bwt, "train": 8 * nbytes / bwt, "eval": 2 * nbytes / bwt}
                r = {
                    "shape": list(shape), "axis": axis, "layout": layout, "shape_name": _shape_name(shape, axis),
                    "threads": threads, "bytes": nbytes, "repeats": repeats, "copy_bandwidth_Bps": bwt,
                    "median_s": med, "floor_s": floor, "times_s": raw,
                }
                results.append(r)
                t = med.get("torch", {}).get("train")
                print(
                    f"{r['shape_name']:>20} threads={threads}  train: xbn {_ms(med['xbn']['train'])} ms, "
                    f"torch {_ms(t)} ms, naive {_ms(med['naive']['train'])} ms, xbn/torch {_ratio(med['xbn']['train'], t)}, "
                    f"xbn/floor {_ratio(med['xbn']['train'], floor['train'])}; eval xbn/torch "
                    f"{_ratio(med['xbn']['eval'], med.get('torch', {}).get('eval'))}",
                    flush=True,
                )

        copy.close()

    command = "xbn bench --cpu -- " + " ".join(argv if argv is not None else sys.argv[1:])
    default_repeats = "3" if args.quick else f"{args.repeats or 15} (at least 200 for inputs under 4 MiB)"
    if engine == "numba":
        import numba

        try:
            layer = numba.threading_layer()
        except ValueError:  # no parallel loop ran: one thread takes the serial builds
            layer = "none (serial builds only)"
        machine_numba = {"numba": numba.__version__, "threading_layer": layer}
    else:
        machine_numba = {}
    meta = {"machine": {**machine_info(), **machine_numba}, "bandwidth": {t: statistics.median(v) for t, v in bandwidth.items()},
            "engine": engine, "repeats": default_repeats,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "quick": args.quick, "command": command.strip(), "copy_bytes": copy_bytes,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
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
