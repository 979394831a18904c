#!/usr/bin/env python3
"""Exercise every CUDA kernel of xbn once per dtype, small, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 1 python ci/sanitize_kernels.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python ci/sanitize_kernels.py
    (also synccheck and initcheck; ci/gpu_tier.sh runs all four)

Covers each entry point (6 families x channel-major/channels-last x scalar/vector loads) for
float32, float64, float16 (and bfloat16 where CuPy has it), with and without a grid reduction
split over blocks, on shapes with odd sizes; the fused reductions of the whole-step ops with
and without weight, bias and running statistics, parameters in float32 and float64. CuPy's memory pool is switched off first, so each
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
        for index, (shape, axis) in enumerate(shapes):
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

            # The fused reductions: parameters in float32 or float64 (alternating by shape),
            # once with everything and once with nothing (absent vectors never touched).
            pdt = np.float64 if index % 2 else np.float32
            w = cupy.asarray(rng.uniform(0.5, 1.5, size=c).astype(pdt))
            b = cupy.asarray(rng.normal(size=c).astype(pdt))
            rm = cupy.asarray(rng.normal(size=c).astype(pdt))
            rv = cupy.asarray(rng.uniform(0.5, 2.0, size=c).astype(pdt))
            f_mean, f_inv, f_scale, f_shift, f_rm, f_rv = kc.launch_forward_stats(
                x, w, b, rm, rv, axis=axis, eps=1e-5, momentum=0.1)
            bare = kc.launch_forward_stats(x, None, None, None, None, axis=axis, eps=1e-5,
                                           momentum=0.1)
            dgamma, dbeta, k_dy, k_xmu, k_const = kc.launch_backward_coefficients(
                dy, x, f_mean, f_inv, w, axis=axis)
            bare_b = kc.launch_backward_coefficients(dy, x, f_mean, f_inv, None, axis=axis)
            cupy.cuda.Device().synchronize()

            m = cupy.asnumpy(mean).astype(np.float64)
            mref, vref = xh.mean(axis=axes), xh.var(axis=axes)
            count = xh.size // c
            inv_ref = 1.0 / np.sqrt(vref + 1e-5)
            wh, bh = cupy.asnumpy(w).astype(np.float64), cupy.asnumpy(b).astype(np.float64)
            rmh, rvh = cupy.asnumpy(rm).astype(np.float64), cupy.asnumpy(rv).astype(np.float64)
            fm = cupy.asnumpy(f_mean).astype(np.float64).reshape(bs)
            sdy_ref = dyh.sum(axis=axes)
            sdx_ref = (dyh * (xh - fm)).sum(axis=axes)
            fi = cupy.asnumpy(f_inv).astype(np.float64)
            checks = {
                "mean": (m, xh.mean(axis=axes)),
                "var": (cupy.asnumpy(var), xh.var(axis=axes)),
                "sum_dy": (cupy.asnumpy(s_dy), dyh.sum(axis=axes)),
                "sum_dy_xmu": (cupy.asnumpy(s_dy_xmu), (dyh * (xh - m.reshape(bs))).sum(axis=axes)),
                "y": (cupy.asnumpy(y.astype(cupy.float64)), xh + m.reshape(bs)),
                "y_noshift": (cupy.asnumpy(y2.astype(cupy.float64)), xh),
                "dx": (cupy.asnumpy(dx.astype(cupy.float64)), dyh + (xh - m.reshape(bs)) + m.reshape(bs)),
                "fused mean": (cupy.asnumpy(f_mean), mref),
                "fused invstd": (cupy.asnumpy(f_inv), inv_ref),
                "fused scale": (cupy.asnumpy(f_scale), inv_ref * wh),
                "fused shift": (cupy.asnumpy(f_shift), bh - mref * inv_ref * wh),
                "fused running mean": (cupy.asnumpy(f_rm), 0.9 * rmh + 0.1 * mref),
                "fused running var": (cupy.asnumpy(f_rv), 0.9 * rvh + 0.1 * vref * count / (count - 1)),
                "bare scale": (cupy.asnumpy(bare[2]), inv_ref),
                "bare shift": (cupy.asnumpy(bare[3]), -mref * inv_ref),
                "sum dgamma": (cupy.asnumpy(dgamma), sdx_ref * fi),
                "sum dbeta": (cupy.asnumpy(dbeta), sdy_ref),
                "k_dy": (cupy.asnumpy(k_dy), fi * wh),
                "sum k_xmu": (cupy.asnumpy(k_xmu), -fi * wh * fi * fi * sdx_ref / count),
                "sum k_const": (cupy.asnumpy(k_const), -fi * wh * sdy_ref / count),
                "bare k_dy": (cupy.asnumpy(bare_b[2]), fi),
            }
            if bare[4] is not None or bare[5] is not None:
                failures.append(f"{name} {shape}: running statistics returned without any given")
            for what, (got, ref) in checks.items():
                err = float(np.max(np.abs(np.asarray(got, np.float64) - ref))) / (float(np.max(np.abs(ref))) or 1.0)
                limit = tol * (10 if what.startswith("sum") else 1)
                if what.startswith("fused running") and pdt == np.float32:
                    limit = max(limit, 1e-6)  # the update runs in float32 for float32 parameters
                if not np.isfinite(err) or err > limit:
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
