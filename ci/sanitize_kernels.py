#!/usr/bin/env python3
"""Exercise xbn's CUDA kernels, small, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 1 python ci/sanitize_kernels.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python ci/sanitize_kernels.py
    (also synccheck and initcheck; ci/gpu_tier.sh runs all four)
    python ci/sanitize_kernels.py --full   # every vector width as well (14 shapes per dtype)
    python ci/sanitize_kernels.py --list   # the plan; needs neither CuPy's GPU parts nor a GPU

Representative set (the default, what the GPU tier runs under each tool): per dtype (float32,
float64, float16, and bfloat16 where CuPy has it) four small shapes, channel-major and
channels-last, each once odd-sized (scalar loads, one block per channel) and once with 16-byte
vector loads and every reduction split over blocks (partials, counters, last-block merge). On
each shape every op of the registry runs (``xbn.backends.resolve("cupy").ops``: the four passes,
the whole training forward and backward, the eval-mode forward and backward), so each kernel
family of ``xbn.kernels._launch.OPS`` launches once per layout and dtype.

Launches are recorded where xbn compiles its kernels (``cupy.RawModule``), so the script fails
if a planned (dtype, family, layout) never ran on a kernel (a silent fallback to the generic
path would otherwise give a clean, empty sanitizer log) or a reduction never split. Results are
checked against a float64 NumPy reference. CuPy's memory pool is switched off first, so each
array is its own cudaMalloc and memcheck sees an access one element past any buffer.

The last line is ``sanitize_kernels: done: ...``; ci/gpu_tier.sh takes a sanitizer log without
it for a run that never reached the end (a sanitizer can report "0 errors" for a program it
never ran). Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

DONE = "sanitize_kernels: done"
EPS = 1e-5
MOMENTUM = 0.1
DTYPES = ("float32", "float64", "float16", "bfloat16")
#: (shape, channel axis): ncl odd (scalar loads, no split), nlc odd, ncl and nlc with 16-byte
#: loads and every reduction split over blocks (on any GPU with at least 16 SMs).
REPRESENTATIVE = [((4, 3, 7), 1), ((5, 7, 3), -1), ((2, 2, 65536), 1), ((16384, 16), 1)]
#: --full: 16-byte, 8-byte and scalar loads of each layout, splits of each, odd sizes.
FULL = [
    ((4, 3, 64), 1),
    ((4, 3, 7), 1),
    ((64, 16), 1),
    ((64, 3), 1),
    ((5, 7, 3), -1),
    ((4, 3, 6), 1),
    ((4, 3, 196), 1),
    ((64, 6), 1),
    ((64, 12), 1),  # 8-byte vectors
    ((2, 2, 65536), 1),
    ((2, 2, 65537), 1),
    ((16384, 16), 1),
    ((9001, 3), 1),
    ((3, 1, 4097), 1),
]
_KERNEL = re.compile(r"^xbn_(\w+)_(ncl|nlc)_v(\d+)$")


class Recorder:
    """Wraps ``cupy.RawModule`` so every launch of an xbn kernel is recorded as
    (dtype key, kernel name, grid); the xbn.kernels.cupy wrappers are not touched."""

    def __init__(self, cupy: Any) -> None:
        self.launches: list[tuple[str, str, tuple[int, ...]]] = []
        real = cupy.RawModule
        recorder = self

        class Function:
            def __init__(self, fn: Any, key: str, name: str) -> None:
                self._fn, self._key, self._name = fn, key, name

            def __call__(self, grid: Any, block: Any, args: Any, **kwargs: Any) -> Any:
                recorder.launches.append((self._key, self._name, tuple(grid)))
                return self._fn(grid, block, args, **kwargs)

            def __getattr__(self, attr: str) -> Any:
                return getattr(self._fn, attr)

        class Module:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self._module = real(*args, **kwargs)
                options = kwargs.get("options") or (args[1] if len(args) > 1 else ())
                self._key = next(
                    (o[len("-DXBN_DTYPE_") :].lower() for o in options if o.startswith("-DXBN_DTYPE_")), "?"
                )

            def get_function(self, name: str) -> Any:
                return Function(self._module.get_function(name), self._key, name)

            def __getattr__(self, attr: str) -> Any:
                return getattr(self._module, attr)

        cupy.RawModule = Module

    def ran(self) -> set[tuple[str, str, str]]:
        """(dtype key, family, layout) of every recorded launch."""
        out = set()
        for key, name, _ in self.launches:
            m = _KERNEL.match(name)
            if m:
                out.add((key, m.group(1), m.group(2)))
        return out

    def kernels(self) -> set[tuple[str, str]]:
        return {(key, name) for key, name, _ in self.launches}

    def split(self, reductions: tuple[str, ...]) -> set[tuple[str, str, str]]:
        """(dtype key, family, layout) of the reductions launched with more than one part."""
        out = set()
        for key, name, grid in self.launches:
            m = _KERNEL.match(name)
            if m and m.group(1) in reductions and len(grid) > 1 and grid[1] > 1:
                out.add((key, m.group(1), m.group(2)))
        return out


def relative_error(got: Any, ref: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return float(np.max(np.abs(got - ref))) / (scale or 1.0) if ref.size else 0.0


def reference(
    xh: np.ndarray,
    dyh: np.ndarray,
    axis: int,
    params: dict[str, np.ndarray],
    mean: np.ndarray,
    inv: np.ndarray,
) -> dict[str, np.ndarray]:
    """Float64 values of everything the script checks; ``mean``/``inv`` are the ones the
    kernels computed (the backward ops take them as given, as the layer does)."""
    nd = xh.ndim
    ax = axis % nd
    axes = tuple(i for i in range(nd) if i != ax)
    c = xh.shape[ax]
    count = xh.size // c
    bs = [1] * nd
    bs[ax] = c

    def ch(v: np.ndarray) -> np.ndarray:
        return v.reshape(bs)

    m_ref, v_ref = xh.mean(axis=axes), xh.var(axis=axes)
    inv_ref = 1.0 / np.sqrt(v_ref + EPS)
    w, b, rm, rv = params["weight"], params["bias"], params["running_mean"], params["running_var"]
    xmu = xh - ch(mean)
    sum_dy = dyh.sum(axis=axes)
    sum_dy_xmu = (dyh * xmu).sum(axis=axes)
    xhat = xmu * ch(inv)
    dx = ch(w * inv) * (dyh - ch(sum_dy / count) - xhat * ch(sum_dy_xmu * inv / count))
    dx_bare = ch(inv) * (dyh - ch(sum_dy / count) - xhat * ch(sum_dy_xmu * inv / count))
    return {
        "mean": m_ref,
        "var": v_ref,
        "invstd": inv_ref,
        "sum_dy": sum_dy,
        "sum_dy_xmu": sum_dy_xmu,
        "y shift": xh + ch(mean),
        "y no shift": xh,
        "dx apply": dyh + xmu + ch(mean),
        "forward y": (xh - ch(m_ref)) * ch(inv_ref * w) + ch(b),
        "forward running mean": (1 - MOMENTUM) * rm + MOMENTUM * m_ref,
        "forward running var": (1 - MOMENTUM) * rv + MOMENTUM * v_ref * count / (count - 1),
        "bare forward y": (xh - ch(m_ref)) * ch(inv_ref),
        "backward dx": dx,
        "backward dgamma": sum_dy_xmu * inv,
        "backward dbeta": sum_dy,
        "bare backward dx": dx_bare,
        "eval backward dx": dyh * ch(w * inv),
    }


def available_dtypes(cupy: Any) -> list[tuple[str, Any]]:
    out = [(n, np.dtype(n)) for n in ("float32", "float64", "float16")]
    try:
        import ml_dtypes

        cupy.asarray(np.zeros(2, dtype=ml_dtypes.bfloat16))
        out.append(("bfloat16", ml_dtypes.bfloat16))
    except Exception as e:
        print(f"bfloat16: not available in this CuPy ({type(e).__name__}), its kernels are not exercised")
    return out


def exercise(
    cupy: Any,
    ops: Any,
    launch: Any,
    name: str,
    dt: Any,
    shape: tuple[int, ...],
    axis: int,
    index: int,
    rng: np.random.Generator,
) -> list[str]:
    """Run every op once on one (dtype, shape); the failures found."""
    acc = launch.accumulator_dtype(name)
    tol = {"float64": 1e-10, "float32": 1e-4}.get(name, 2e-2)
    x = cupy.asarray(rng.normal(1.0, 2.0, size=shape).astype(np.float32)).astype(dt)
    dy = cupy.asarray(rng.normal(size=shape).astype(np.float32)).astype(dt)
    xh = cupy.asnumpy(x.astype(cupy.float64))
    dyh = cupy.asnumpy(dy.astype(cupy.float64))
    c = shape[axis]
    ones = cupy.ones(c, dtype=acc)
    # Parameters in float32 or float64, alternating by shape (the kernels take either).
    pdt = np.float64 if index % 2 else np.float32
    host = {
        "weight": rng.uniform(0.5, 1.5, size=c),
        "bias": rng.normal(size=c),
        "running_mean": rng.normal(size=c),
        "running_var": rng.uniform(0.5, 2.0, size=c),
    }
    host = {k: v.astype(pdt).astype(np.float64) for k, v in host.items()}
    dev = {k: cupy.asarray(v.astype(pdt)) for k, v in host.items()}

    mean, var = ops.batch_stats(x, axis=axis)
    sum_dy, sum_dy_xmu = ops.backward_reduce(dy, x, mean, axis=axis)
    y = ops.scale_shift(x, ones, mean, axis=axis)
    y_noshift = ops.scale_shift(x, ones, None, axis=axis)
    dx_apply = ops.backward_apply(dy, x, mean, ones, ones, mean, axis=axis)
    fy, f_mean, f_inv, f_rm, f_rv = ops.batch_norm_forward(
        x,
        dev["weight"],
        dev["bias"],
        dev["running_mean"],
        dev["running_var"],
        axis=axis,
        eps=EPS,
        momentum=MOMENTUM,
    )
    bare = ops.batch_norm_forward(x, None, None, None, None, axis=axis, eps=EPS, momentum=MOMENTUM)
    bdx, dgamma, dbeta = ops.batch_norm_backward(dy, x, f_mean, f_inv, dev["weight"], axis=axis)
    bare_dx = ops.batch_norm_backward(dy, x, f_mean, f_inv, None, axis=axis)[0]
    eval_dx = ops.batch_norm_backward(dy, x, f_mean, f_inv, dev["weight"], axis=axis, batch_stats_used=False)[
        0
    ]
    # float32 parameters: the inference kernel takes them with every input dtype (float64 ones
    # only with float64 input), so its family runs on every shape
    eval_params = {k: v.astype(np.float32) for k, v in dev.items()}
    eval_y = ops.batch_norm_inference(
        x,
        eval_params["weight"],
        eval_params["bias"],
        eval_params["running_mean"],
        eval_params["running_var"],
        axis=axis,
        eps=EPS,
    )
    cupy.cuda.Device().synchronize()

    def host64(a: Any) -> np.ndarray:
        return cupy.asnumpy(a.astype(cupy.float64))

    ref = reference(xh, dyh, axis, host, host64(mean), host64(f_inv))
    p32 = {k: v.astype(np.float32).astype(np.float64) for k, v in host.items()}
    shape_c = [1] * xh.ndim
    shape_c[axis % xh.ndim] = c
    ref["eval forward y"] = (xh - p32["running_mean"].reshape(shape_c)) / np.sqrt(
        p32["running_var"].reshape(shape_c) + EPS
    ) * p32["weight"].reshape(shape_c) + p32["bias"].reshape(shape_c)
    got = {
        "mean": mean,
        "var": var,
        "invstd": f_inv,
        "sum_dy": sum_dy,
        "sum_dy_xmu": sum_dy_xmu,
        "y shift": y,
        "y no shift": y_noshift,
        "dx apply": dx_apply,
        "forward y": fy,
        "forward running mean": f_rm,
        "forward running var": f_rv,
        "bare forward y": bare[0],
        "backward dx": bdx,
        "backward dgamma": dgamma,
        "backward dbeta": dbeta,
        "bare backward dx": bare_dx,
        "eval backward dx": eval_dx,
        "eval forward y": eval_y,
    }
    failures = []
    if bare[3] is not None or bare[4] is not None:
        failures.append(f"{name} {shape}: running statistics returned without any given")
    for what, value in got.items():
        err = relative_error(host64(value), ref[what])
        limit = tol * (10 if what.startswith(("sum", "backward d")) else 1)
        if what.startswith("forward running") and pdt == np.float32:
            limit = max(limit, 1e-6)  # the update runs in float32 for float32 parameters
        if not np.isfinite(err) or err > limit:
            failures.append(f"{name} {shape} axis {axis} {what}: relative error {err:.2e}")
    return failures


def list_plan(shapes: list[tuple[tuple[int, ...], int]], sm_count: int = 132) -> str:
    """The launches each shape gets (132-SM device, default occupancy), without a GPU."""
    from xbn.kernels import _launch

    lines = []
    for shape, axis in shapes:
        layout = _launch.plan_layout(shape, axis, c_contiguous=True)
        for name in DTYPES:
            itemsize = 8 if name == "float64" else 4 if name == "float32" else 2
            vec = _launch.vector_width(layout, itemsize)
            plans = [_launch.plan(op, layout, vec, sm_count=sm_count) for op in _launch.OPS]
            split = [p.kernel for p in plans if p.parts > 1 and p.workspace]
            lines.append(
                f"{'x'.join(map(str, shape)):>12} axis {axis:2d} {name:8s} {layout.kind} "
                f"W={vec}: {len(plans)} families" + (f", split: {len(split)}" if split else "")
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every vector width (14 shapes per dtype)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit (no GPU needed)")
    args = parser.parse_args(argv)
    shapes = FULL if args.full else REPRESENTATIVE

    from xbn import backends
    from xbn.kernels import _launch

    if args.list:
        print(list_plan(shapes))
        print(f"{len(shapes)} shapes x {len(DTYPES)} dtypes, every op of the registry on each")
        return 0

    import cupy

    recorder = Recorder(cupy)  # before the first kernel compiles
    cupy.cuda.set_allocator(None)  # every array its own allocation: exact bounds for memcheck
    cupy.cuda.set_pinned_memory_allocator(None)
    ops = backends.resolve("cupy", generic=False).ops

    dtypes = available_dtypes(cupy)
    failures: list[str] = []
    rng = np.random.default_rng(0)
    for name, dt in dtypes:
        for index, (shape, axis) in enumerate(shapes):
            try:
                failures += exercise(cupy, ops, _launch, name, dt, shape, axis, index, rng)
            except Exception as e:  # a kernel error surfaces here; go on with the others
                failures.append(f"{name} {shape} axis {axis}: {type(e).__name__}: {e}")

    keys = [_launch.dtype_key(n) for n, _ in dtypes]
    want = {(k, op, kind) for k in keys for op in _launch.OPS for kind in ("ncl", "nlc")}
    missing = sorted(want - recorder.ran())
    if missing:
        failures.append(f"(dtype, family, layout) that never ran on a kernel: {missing}")
    if args.full:
        names = {
            (k, f"xbn_{op}_{kind}_v{w}")
            for k in keys
            for op in _launch.OPS
            for kind in ("ncl", "nlc")
            for w in _launch.WIDTHS[k]
        }
        if names - recorder.kernels():
            failures.append(f"kernels that never ran: {sorted(names - recorder.kernels())}")
    want_split = {(k, op, kind) for k in keys for op in _launch.REDUCTIONS for kind in ("ncl", "nlc")}
    if want_split - recorder.split(_launch.REDUCTIONS):
        failures.append(
            f"reductions never split over blocks: {sorted(want_split - recorder.split(_launch.REDUCTIONS))}"
        )
    for f in failures:
        print("FAIL", f)
    print(
        f"{DONE}: ran {len(recorder.launches)} launches of {len(recorder.kernels())} kernels "
        f"over {len(dtypes)} dtypes and {len(shapes)} shapes, "
        f"{len(recorder.split(_launch.REDUCTIONS))} split reductions; {len(failures)} failures"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
