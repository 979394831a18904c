"""GPU benchmark: xbn's CUDA kernels vs PyTorch's batch norm and the generic CuPy path.

For each shape, these run interleaved (A B C A B C ...), each call on the next of several input
buffers (rotated so that a tensor never sits in L2 from one repeat to the next), timed with
CUDA events after a warm-up; medians are reported:

* ``xbn``: ``xbn.BatchNorm`` on the CuPy backend with the kernels, training forward then
  ``backward`` (y, batch statistics, running statistics, dx, dgamma, dbeta), gradients reset to
  None before each step as the torch case does (no accumulation launches);
* ``generic``: the same layer on the generic CuPy path (``resolve("cupy", generic=True)``,
  what ``XBN_FORCE_GENERIC=1`` selects): CuPy reductions and elementwise expressions;
* ``torch``: ``torch.nn.functional.batch_norm`` forward + ``.backward`` (autograd) on the same
  GPU, channels-last shapes in torch's channels_last memory format on the same layout; and
  ``aten``: ``native_batch_norm`` + ``native_batch_norm_backward`` (the same work without
  autograd), kept in the JSON.

The kernels are also timed alone and reported as achieved bandwidth and as a fraction of the
device-to-device copy bandwidth measured in the same run (``cudaMemcpy``, read + write bytes):
``backward_reduce`` reads x and dy (2S, S = bytes of x), ``batch_stats`` reads x (S),
``scale_shift`` reads x and writes y (2S), ``backward_apply`` reads x, dy and writes dx (3S);
``stats_fused`` and ``backward_reduce_fused`` are the two reductions with the per-channel
epilogue of a whole step in their last block (same bytes as their plain twins, so the pair
shows what the epilogue costs). The floor of a training step is 8S / copy bandwidth (forward
3S, backward 5S). A training step on the kernels is four launches (stats_fused, scale_shift,
backward_reduce_fused, backward_apply); the sum of those four kernels' times is reported beside
the layer's step, and the difference is what the step costs besides them: Python, output
allocations, launch latency not hidden behind GPU work.

Writes ``gpu.md`` (tables), ``gpu.json`` (raw medians and all samples; GPU name, driver, CUDA,
CuPy and torch versions) and ``gpu.png`` under ``--out`` (default ``benchmarks/results``).

Run: ``xbn bench --gpu [-- OPTIONS]`` or ``python benchmarks/gpu.py [OPTIONS]``; ``--list``
prints the shapes, byte counts and launch plans without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import REFERENCE_SHAPES

#: (shape, channel axis, label). REFERENCE.md C's shapes, then small C, tiny spatial and (N, C).
SHAPES: list[tuple[tuple[int, ...], int, str]] = [
    *REFERENCE_SHAPES,
    ((32, 3, 224, 224), 1, "small C"),
    ((256, 1, 128, 128), 1, "C=1"),
    ((128, 2048, 7, 7), 1, "tiny spatial"),
    ((256, 2048, 1, 1), 1, "H*W=1"),
    ((65536, 64), 1, "NC tall"),
    ((256, 8192), 1, "NC wide"),
]
QUICK = [0, 3, 4, 6, 8]
EPS = 1e-5
MOMENTUM = 0.1
COPY_BYTES = 1 << 30
#: Bytes each kernel moves, in units of S (the bytes of x).
KERNEL_BYTES = {"batch_stats": 1, "scale_shift": 2, "backward_reduce": 2, "backward_apply": 3,
                "stats_fused": 1, "backward_reduce_fused": 2}
#: The launches of one training step on the kernels (forward, then backward).
STEP_KERNELS = ("stats_fused", "scale_shift", "backward_reduce_fused", "backward_apply")


def parse_shape(text: str) -> tuple[tuple[int, ...], int, str]:
    """``32x64x56x56`` (channel axis 1) or ``32x56x56x64:-1``.

    >>> parse_shape("32x56x56x64:-1")
    ((32, 56, 56, 64), -1, 'custom')
    """
    dims, _, axis = text.partition(":")
    return tuple(int(d) for d in dims.lower().split("x")), int(axis) if axis else 1, "custom"


def shape_name(shape: tuple[int, ...], axis: int) -> str:
    """The name of a shape in tables: dims joined by x, the channel axis if not 1.

    >>> shape_name((32, 56, 56, 64), -1)
    '32x56x56x64:-1'
    """
    return "x".join(map(str, shape)) + ("" if axis == 1 else f":{axis}")


def rotation(nbytes: int, l2_bytes: int, *, tensors: int = 2, cap: int = 16) -> int:
    """How many copies of the inputs to cycle through so that the ones a call reads were last
    touched at least 2 x L2 bytes of traffic ago (at least 2 copies, at most ``cap``).

    >>> rotation(400 << 20, 50 << 20), rotation(1 << 20, 50 << 20)
    (2, 16)
    """
    per_set = max(1, nbytes * tensors)
    return int(min(cap, max(2, math.ceil(2 * l2_bytes / per_set) + 1)))


# -- timing ------------------------------------------------------------------------------------


class _CupyTimer:
    def __init__(self) -> None:
        import cupy

        self.cupy = cupy
        self.start, self.end = cupy.cuda.Event(), cupy.cuda.Event()

    def __call__(self, fn: Callable[[], Any]) -> float:
        stream = self.cupy.cuda.get_current_stream()
        self.start.record(stream)
        fn()
        self.end.record(stream)
        self.end.synchronize()
        return self.cupy.cuda.get_elapsed_time(self.start, self.end) * 1e-3


class _TorchTimer:
    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], Any]) -> float:
        self.start.record()
        fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) * 1e-3


def copy_bandwidth(nbytes: int = COPY_BYTES, repeats: int = 20) -> float:
    """Device-to-device cudaMemcpy bandwidth in bytes/s, counting read + write."""
    import cupy

    src = cupy.ones(nbytes // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    timer = _CupyTimer()
    stream = cupy.cuda.get_current_stream()

    def copy() -> None:
        dst.data.copy_from_device_async(src.data, src.nbytes, stream)

    for _ in range(3):
        timer(copy)
    t = statistics.median(timer(copy) for _ in range(repeats))
    return 2 * src.nbytes / t


# -- implementations ---------------------------------------------------------------------------


def _rotated_inputs(shape, axis, dtype, copies, seed=0):
    import cupy

    rng = cupy.random.RandomState(seed)
    xs = [rng.standard_normal(shape, dtype=cupy.float32).astype(dtype) for _ in range(copies)]
    dys = [rng.standard_normal(shape, dtype=cupy.float32).astype(dtype) for _ in range(copies)]
    return xs, dys


def make_cases(shape, axis, dtype, copies, *, with_torch, with_generic):
    """name -> (timer, step(i)) for the training step (forward + backward) on input set i."""
    import xbn
    from xbn import backends

    c = shape[axis]
    xs, dys = _rotated_inputs(shape, axis, dtype, copies)
    cases: dict[str, tuple[Callable[[Callable[[], Any]], float], Callable[[int], Any]]] = {}
    cupy_timer = _CupyTimer()

    fast = xbn.BatchNorm(c, axis=axis, backend=backends.resolve("cupy", generic=False))
    missing = set(backends.OP_NAMES) - set(fast._backend.ops.fast)
    if missing:
        raise RuntimeError(f"the CuPy kernels are not registered for {sorted(missing)}")

    def xbn_step(i: int, bn=fast) -> None:
        bn.zero_grad()  # as torch_step: no gradient accumulation in the timed step
        bn.forward(xs[i], training=True)
        bn.backward(dys[i])

    cases["xbn"] = (cupy_timer, xbn_step)
    if with_generic:
        slow = xbn.BatchNorm(c, axis=axis, backend=backends.resolve("cupy", generic=True))

        def generic_step(i: int, bn=slow) -> None:
            bn.zero_grad()
            bn.forward(xs[i], training=True)
            bn.backward(dys[i])

        cases["generic"] = (cupy_timer, generic_step)

    if with_torch:
        import torch

        tdt = getattr(torch, np.dtype(dtype).name)
        ndim = len(shape)
        nhwc = axis % ndim == ndim - 1 and ndim == 4
        if axis % ndim != 1 and not nhwc:
            raise ValueError(f"torch comparison needs channel axis 1 or NHWC, got {axis} for {shape}")

        def as_torch(a):
            t = torch.from_dlpack(a)
            return t.permute(0, 3, 1, 2) if nhwc else t  # NHWC buffer = NCHW in channels_last

        txs, tdys = [as_torch(a) for a in xs], [as_torch(a) for a in dys]
        # Parameters in float32 (as xbn's), float64 for float64 input (torch wants them equal).
        pdt = torch.float64 if tdt == torch.float64 else torch.float32
        w = torch.ones(c, device="cuda", dtype=pdt, requires_grad=True)
        b = torch.zeros(c, device="cuda", dtype=pdt, requires_grad=True)
        rm = torch.zeros(c, device="cuda", dtype=pdt)
        rv = torch.ones(c, device="cuda", dtype=pdt)
        leaves = [t.detach().requires_grad_(True) for t in txs]
        torch_timer = _TorchTimer()

        def torch_step(i: int) -> None:
            leaves[i].grad = w.grad = b.grad = None
            y = torch.nn.functional.batch_norm(leaves[i], rm, rv, w, b, True, MOMENTUM, EPS)
            y.backward(tdys[i])

        wd, bd = w.detach(), b.detach()

        def aten_step(i: int) -> None:
            out, mean, invstd = torch.ops.aten.native_batch_norm(
                txs[i], wd, bd, rm, rv, True, MOMENTUM, EPS)
            torch.ops.aten.native_batch_norm_backward(
                tdys[i], txs[i], wd, rm, rv, mean, invstd, True, EPS, [True, True, True])

        cases["torch"] = (torch_timer, torch_step)
        cases["aten"] = (torch_timer, aten_step)
    return cases, xs, dys


def kernel_cases(shape, axis, xs, dys):
    """name -> step(i) for each kernel alone (the fast paths the layer calls)."""
    import cupy

    from xbn.kernels import cupy as kc

    c = shape[axis]
    acc = cupy.float64 if xs[0].dtype == cupy.float64 else cupy.float32
    mean = cupy.zeros(c, dtype=acc)
    ones = cupy.ones(c, dtype=acc)
    # the layer's parameters and buffers: float32, with running statistics
    w, b = cupy.ones(c, dtype=cupy.float32), cupy.zeros(c, dtype=cupy.float32)
    rm, rv = cupy.zeros(c, dtype=cupy.float32), cupy.ones(c, dtype=cupy.float32)
    probe = kc.launch_batch_stats(xs[0], axis=axis)
    if probe is None:
        return {}
    return {
        "batch_stats": lambda i: kc.launch_batch_stats(xs[i], axis=axis),
        "scale_shift": lambda i: kc.launch_scale_shift(xs[i], ones, mean, axis=axis),
        "backward_reduce": lambda i: kc.launch_backward_reduce(dys[i], xs[i], mean, axis=axis),
        "backward_apply": lambda i: kc.launch_backward_apply(
            dys[i], xs[i], mean, ones, ones, mean, axis=axis),
        "stats_fused": lambda i: kc.launch_forward_stats(
            xs[i], w, b, rm, rv, axis=axis, eps=EPS, momentum=MOMENTUM),
        "backward_reduce_fused": lambda i: kc.launch_backward_coefficients(
            dys[i], xs[i], mean, ones, w, axis=axis),
    }


def measure(cases, copies: int, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Interleaved samples in seconds: every repeat runs every case once, on input set i."""
    names = list(cases)
    for w in range(warmup):
        for n in names:
            timer, step = cases[n]
            timer(lambda: step(w % copies))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        i = r % copies
        for n in names:
            timer, step = cases[n]
            samples[n].append(timer(lambda: step(i)))
    return samples


# -- machine -----------------------------------------------------------------------------------


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
        "cuda_driver_api": rt.driverGetVersion(),
        "cuda_runtime": rt.runtimeGetVersion(),
        "cupy": cupy.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={dev.id}"],
            capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    try:
        from cupy.cuda import nvrtc

        info["nvrtc"] = ".".join(map(str, nvrtc.getVersion()))
    except Exception:
        info["nvrtc"] = None
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    except ImportError:
        info["torch"] = None
    return info


# -- report ------------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v * 1e3:.3f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or not b else f"{a / b:.2f}"


def write_markdown(path: Path, results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    g = meta["gpu"]
    bw = meta["copy_bandwidth"]
    lines = [
        "# xbn GPU benchmark: CUDA kernels vs PyTorch and the generic CuPy path",
        "",
        f"GPU: {g.get('gpu')} (sm_{''.join(map(str, g.get('compute_capability', '')))}, "
        f"{g.get('sm_count')} SMs, L2 {((g.get('l2_bytes') or 0) >> 20)} MiB), driver "
        f"{g.get('driver')}, CUDA runtime {g.get('cuda_runtime')}, NVRTC {g.get('nvrtc')}, "
        f"CuPy {g.get('cupy')}, torch {g.get('torch')} (CUDA {g.get('torch_cuda')}, cuDNN "
        f"{g.get('cudnn')}). Copy bandwidth (cudaMemcpy D2D, read + write): {bw / 1e9:.0f} GB/s.",
        "",
        f"{meta['dtype']}; median of {meta['repeats']} interleaved repeats after "
        f"{meta['warmup']} warm-up, CUDA events, inputs rotated over enough copies to defeat L2. "
        "Times in ms. step = training forward + backward; floor = 8S / copy bandwidth; "
        "kernels Σ = the step's four launches (" + ", ".join(STEP_KERNELS) + ") timed alone, "
        "glue = step - kernels Σ (Python, allocations, launch latency).",
        "",
        "## Training step (forward + backward)",
        "",
        "| shape | label | xbn ms | torch ms | aten ms | generic ms | xbn/torch | generic/xbn "
        "| xbn/floor | kernels Σ ms | glue ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r["median_s"]
        ksum = r.get("kernel_sum_s")
        glue = None if ksum is None or m.get("xbn") is None else m["xbn"] - ksum
        lines.append(
            f"| {r['shape_name']} | {r['label']} | {_ms(m.get('xbn'))} | {_ms(m.get('torch'))} | "
            f"{_ms(m.get('aten'))} | {_ms(m.get('generic'))} | {_ratio(m.get('xbn'), m.get('torch'))} "
            f"| {_ratio(m.get('generic'), m.get('xbn'))} | {_ratio(m.get('xbn'), r['floor_s'])} "
            f"| {_ms(ksum)} | {_ms(glue)} |"
        )
    lines += [
        "",
        "## Kernels alone: achieved bandwidth (fraction of copy bandwidth)",
        "",
        "| shape | route | " + " | ".join(f"{k} ({n}S)".replace("(1S)", "(S)")
                                         for k, n in KERNEL_BYTES.items()) + " |",
        "|---|---|" + "---:|" * len(KERNEL_BYTES),
    ]
    for r in results:
        cells = []
        for k in KERNEL_BYTES:
            gbs = r["kernel_gbs"].get(k)
            cells.append("—" if gbs is None else f"{gbs:.0f} GB/s ({gbs * 1e9 / bw:.2f})")
        lines.append(f"| {r['shape_name']} | {r['route']} | " + " | ".join(cells) + " |")
    errors = [(r["shape_name"], e) for r in results for e in r.get("errors", [])]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {s}: {e}" for s, e in errors]
    lines += [
        "",
        "Targets (design, to be confirmed here): backward_reduce >= 0.85 of copy bandwidth on "
        "large shapes; xbn/torch <= 0.9; generic/xbn >= 3.",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    path.write_text("\n".join(lines))


def write_plot(path: Path, results: list[dict[str, Any]], bandwidth: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    xs = np.arange(len(results))
    impls = [("xbn", "#1f77b4"), ("torch", "#ff7f0e"), ("generic", "#7f7f7f")]
    width = 0.27
    for k, (name, color) in enumerate(impls):
        vals = [r["median_s"].get(name, float("nan")) / r["floor_s"] for r in results]
        ax1.bar(xs + (k - 1) * width, vals, width, label=name, color=color)
    ax1.axhline(1.0, color="k", lw=1, ls="--", label="floor (8S / copy BW)")
    ax1.set_yscale("log")
    ax1.set_ylabel("training step time / bandwidth floor (log)")
    ax1.set_title("forward + backward")
    labels = [r["shape_name"].replace(":-1", "\nNHWC") for r in results]
    ax1.set_xticks(xs, labels, rotation=35, ha="right", fontsize=7)
    ax1.legend(fontsize=8)
    ax1.grid(axis="y", which="both", alpha=0.3)
    width = 0.2
    for k, name in enumerate(STEP_KERNELS):  # the launches of a training step
        vals = [(r["kernel_gbs"].get(name) or float("nan")) * 1e9 / bandwidth for r in results]
        ax2.bar(xs + (k - 1.5) * width, vals, width, label=name)
    ax2.axhline(0.85, color="k", lw=1, ls="--", label="0.85 target (backward_reduce)")
    ax2.set_ylabel("achieved / copy bandwidth")
    ax2.set_title("a training step's kernels alone")
    ax2.set_xticks(xs, labels, rotation=35, ha="right", fontsize=7)
    ax2.legend(fontsize=7)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xbn bench --gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=None,
                   help="shapes like 32x64x56x56 (axis 1) or 32x56x56x64:-1 (default: built-in set)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "float64"])
    p.add_argument("--repeats", type=int, default=50, help="timed repeats per case (default 50)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="five shapes, 15 repeats")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--no-generic", action="store_true", help="skip the generic CuPy path")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                   help="directory for gpu.md, gpu.json, gpu.png")
    p.add_argument("--list", action="store_true",
                   help="print shapes, bytes and launch plans (132-SM device), no GPU needed")
    return p


def _shapes(args: argparse.Namespace) -> list[tuple[tuple[int, ...], int, str]]:
    if args.shapes:
        return [parse_shape(s) for s in args.shapes]
    return [SHAPES[i] for i in QUICK] if args.quick else list(SHAPES)


def list_plans(shapes, dtype: str, sm_count: int = 132) -> str:
    """Shapes, bytes and the kernels' launch plans, computed without a GPU."""
    from xbn.kernels import _launch

    itemsize = np.dtype(dtype).itemsize
    rows = []
    for shape, axis, label in shapes:
        layout = _launch.plan_layout(shape, axis, c_contiguous=True)
        nbytes = int(np.prod(shape)) * itemsize
        if isinstance(layout, _launch.Fallback):
            rows.append(f"{shape_name(shape, axis):>20} {label:>12} {nbytes / 1e6:9.1f} MB  generic: "
                        f"{layout.reason}")
            continue
        vec = _launch.vector_width(layout, itemsize)
        parts = []
        for op in _launch.OPS:
            p = _launch.plan(op, layout, vec, sm_count=sm_count, threads_per_sm=1024)
            parts.append(f"{op} grid={p.grid[:2]} block={p.block[:2]}")
        rows.append(f"{shape_name(shape, axis):>20} {label:>12} {nbytes / 1e6:9.1f} MB  "
                    f"{layout.kind} W={vec}: " + "; ".join(parts))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shapes = _shapes(args)
    if args.list:
        print(list_plans(shapes, args.dtype))
        return 0
    repeats = 15 if args.quick and args.repeats == 50 else args.repeats
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
    if with_torch:
        try:
            import torch

            with_torch = torch.cuda.is_available()
        except ImportError:
            with_torch = False
        if not with_torch:
            print("torch with CUDA not available: no torch comparison", file=sys.stderr)

    from xbn.kernels import cupy as kc

    info = gpu_info()
    bandwidth = copy_bandwidth()
    print(f"{info['gpu']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    l2 = int(info.get("l2_bytes") or 50 << 20)
    dtype = np.dtype(args.dtype)
    results = []
    for shape, axis, label in shapes:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        copies = rotation(nbytes, l2)
        entry: dict[str, Any] = {
            "shape": list(shape), "axis": axis, "label": label, "shape_name": shape_name(shape, axis),
            "bytes": nbytes, "copies": copies, "floor_s": 8 * nbytes / bandwidth,
            "route": kc.route(shape, dtype.name, axis=axis), "median_s": {}, "samples_s": {},
            "kernel_gbs": {}, "kernel_median_s": {}, "errors": [],
        }
        t0 = time.perf_counter()
        try:
            cases, xs, dys = make_cases(shape, axis, dtype, copies, with_torch=with_torch,
                                        with_generic=not args.no_generic)
            samples = measure(cases, copies, repeats, args.warmup)
            entry["samples_s"] = samples
            entry["median_s"] = {k: statistics.median(v) for k, v in samples.items()}
            timer = _CupyTimer()
            kcases = {k: (timer, f) for k, f in kernel_cases(shape, axis, xs, dys).items()}
            ksamples = measure(kcases, copies, repeats, args.warmup)
            for k, v in ksamples.items():
                med = statistics.median(v)
                entry["kernel_median_s"][k] = med
                entry["kernel_gbs"][k] = KERNEL_BYTES[k] * nbytes / med / 1e9
            if all(k in entry["kernel_median_s"] for k in STEP_KERNELS):
                entry["kernel_sum_s"] = sum(entry["kernel_median_s"][k] for k in STEP_KERNELS)
            del cases, xs, dys, kcases
        except Exception as e:  # record and go on: one shape's failure should not lose the rest
            entry["errors"].append(f"{type(e).__name__}: {e}")
        cupy.get_default_memory_pool().free_all_blocks()
        m = entry["median_s"]
        print(f"{entry['shape_name']:>20} xbn {_ms(m.get('xbn'))} ms  torch {_ms(m.get('torch'))} ms"
              f"  generic {_ms(m.get('generic'))} ms  bwd_reduce "
              f"{entry['kernel_gbs'].get('backward_reduce', float('nan')):.0f} GB/s"
              f"  ({time.perf_counter() - t0:.1f} s){'  ERROR ' + entry['errors'][0] if entry['errors'] else ''}",
              flush=True)
        results.append(entry)

    meta = {
        "gpu": info, "copy_bandwidth": bandwidth, "dtype": dtype.name, "repeats": repeats,
        "warmup": args.warmup, "command": "xbn bench --gpu " + " ".join(argv or sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    write_markdown(args.out / "gpu.md", results, meta)
    try:
        write_plot(args.out / "gpu.png", results, bandwidth)
    except ImportError:
        print("matplotlib not installed: no gpu.png", file=sys.stderr)
    print(f"wrote {args.out / 'gpu.md'}, gpu.json, gpu.png")
    return 1 if any(r["errors"] for r in results) else 0
