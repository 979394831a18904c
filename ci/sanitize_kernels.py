#!/usr/bin/env python3
"""Exercise every CUDA kernel of xbn once per dtype, small, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 1 python ci/sanitize_kernels.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python ci/sanitize_kernels.py
    (also synccheck and initcheck; ci/gpu_tier.sh runs all four)

Covers each entry point (4 families x channel-major/channels-last x scalar/vector loads) for
float32, float64, float16 (and bfloat16 where CuPy has it), with and without a grid reduction
split over blocks, on shapes with odd sizes. CuPy's memory pool is switched off first, so each
array is its own cudaMalloc and memcheck sees an access one element past any buffer. Results
are checked against NumPy too, and the script exits 1 if a planned kernel never ran, so a
clean sanitizer log really covers every kernel.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def main() -> int:
    import cupy

    from xbn.kernels import _launch
    from xbn.kernels import cupy as kc

    cupy.cuda.set_allocator(None)  # every array its own allocation: exact bounds for memcheck
    cupy.cuda.set_pinned_memory_allocator(None)

    ran: set[tuple[str, str]] = set()
    split: set[tuple[str, str]] = set()
    real_run = kc._run

    def recording_run(op, key, plan, values, device_id):
        ran.add((key, plan.kernel))
        if plan.parts > 1:
            split.add((key, f"{op}_{plan.kernel.split('_')[-2]}"))
        return real_run(op, key, plan, values, device_id)

    kc._run = recording_run

    dtypes = ["float32", "float64", "float16"]
    try:
        import ml_dtypes

        cupy.asarray(np.zeros(2, dtype=ml_dtypes.bfloat16))
        dtypes.append("bfloat16")
        bf16 = ml_dtypes.bfloat16
    except Exception:
        bf16 = None
        print("bfloat16: not available in this CuPy, its kernels are not exercised")

    # (shape, axis): ncl and nlc with 16-byte, 8-byte and scalar loads; splits of each layout.
    shapes = [
        ((4, 3, 64), 1), ((4, 3, 7), 1), ((64, 16), 1), ((64, 3), 1), ((5, 7, 3), -1),
        ((4, 3, 6), 1), ((4, 3, 196), 1), ((64, 6), 1), ((64, 12), 1),  # 8-byte vectors
        ((2, 2, 65536), 1), ((2, 2, 65537), 1), ((16384, 16), 1), ((9001, 3), 1), ((3, 1, 4097), 1),
    ]
    failures = []
    rng = np.random.default_rng(0)
    for name in dtypes:
        dt = bf16 if name == "bfloat16" else np.dtype(name)
        acc = _launch.accumulator_dtype(name)
        tol = {"float64": 1e-10, "float32": 1e-4}.get(name, 2e-2)
        for shape, axis in shapes:
            host = rng.normal(1.0, 2.0, size=shape)
            x = cupy.asarray(host.astype(np.float32)).astype(dt)
            dy = cupy.asarray(rng.normal(size=shape).astype(np.float32)).astype(dt)
            xh = cupy.asnumpy(x.astype(cupy.float64))
            dyh = cupy.asnumpy(dy.astype(cupy.float64))
            c = shape[axis]
            axes = tuple(i for i in range(len(shape)) if i != axis % len(shape))
            bs = [1] * len(shape)
            bs[axis] = c

            mean, var = kc.launch_batch_stats(x, axis=axis)
            s_dy, s_dy_xmu = kc.launch_backward_reduce(dy, x, mean, axis=axis)
            ones = cupy.ones(c, dtype=acc)
            y = kc.launch_scale_shift(x, ones, mean, axis=axis)
            y2 = kc.launch_scale_shift(x, ones, None, axis=axis)
            dx = kc.launch_backward_apply(dy, x, mean, ones, ones, mean, axis=axis)
            cupy.cuda.Device().synchronize()

            m = cupy.asnumpy(mean).astype(np.float64)
            checks = {
                "mean": (m, xh.mean(axis=axes)),
                "var": (cupy.asnumpy(var), xh.var(axis=axes)),
                "sum_dy": (cupy.asnumpy(s_dy), dyh.sum(axis=axes)),
                "sum_dy_xmu": (cupy.asnumpy(s_dy_xmu), (dyh * (xh - m.reshape(bs))).sum(axis=axes)),
                "y": (cupy.asnumpy(y.astype(cupy.float64)), xh + m.reshape(bs)),
                "y_noshift": (cupy.asnumpy(y2.astype(cupy.float64)), xh),
                "dx": (cupy.asnumpy(dx.astype(cupy.float64)), dyh + (xh - m.reshape(bs)) + m.reshape(bs)),
            }
            for what, (got, ref) in checks.items():
                err = float(np.max(np.abs(np.asarray(got, np.float64) - ref))) / (float(np.max(np.abs(ref))) or 1.0)
                if not np.isfinite(err) or err > tol * (10 if what.startswith("sum") else 1):
                    failures.append(f"{name} {shape} axis {axis} {what}: relative error {err:.2e}")

    expected = {
        (_launch.dtype_key(n), f"xbn_{op}_{kind}_v{w}")
        for n in dtypes for op in _launch.OPS for kind in ("ncl", "nlc")
        for w in _launch.WIDTHS[_launch.dtype_key(n)]
    }
    missing = sorted(expected - ran)
    if missing:
        failures.append(f"kernels that never ran: {missing}")
    want_split = {(_launch.dtype_key(n), f"{op}_{kind}") for n in dtypes
                  for op in _launch.REDUCTIONS for kind in ("ncl", "nlc")}
    if want_split - split:
        failures.append(f"reductions never split over blocks: {sorted(want_split - split)}")
    print(f"ran {len(ran)} kernel instantiations over {len(dtypes)} dtypes "
          f"({len(split)} split reductions)")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
