"""``xbn parity``: every backend against a float64 NumPy reference, in one table.

The matrix is backends x dtypes x layouts x modes. Each case builds a layer on the backend, loads
the same random parameters and running statistics, runs forward and backward, and compares y,
dx, dgamma, dbeta and the updated running statistics with the float64 reference of
:mod:`xbn._reference` (PyTorch's formulas, independent of :mod:`xbn.functional`; the test suite
checks it against torch). The reference sees the input already rounded to the case's dtype, so
only the computation's error is measured. The command exits 1 if any case exceeds its dtype's
tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import backends
from ._reference import layer_step, rel_err, to_numpy
from .layers import BatchNorm

#: Largest allowed relative error (max |got - ref| / max |ref|) per input dtype.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}

#: layout name -> (input shape, channel axis)
LAYOUTS = {
    "NCHW": ((4, 3, 5, 6), 1),
    "NHWC": ((4, 5, 6, 3), -1),
    "NC": ((16, 5), 1),
    "NCDHW": ((2, 3, 3, 4, 5), 1),
    "NCHW-wide": ((8, 4, 33, 31), 1),
}

MODES = ("train", "eval", "affine-off", "no-running-stats")

QUANTITIES = ("y", "dx", "dgamma", "dbeta", "running_mean", "running_var")


@dataclass
class CaseResult:
    backend: str
    dtype: str
    layout: str
    mode: str
    errors: dict[str, float] = field(default_factory=dict)
    tolerance: float = 0.0
    error: str | None = None

    @property
    def worst(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def passed(self) -> bool:
        return self.error is None and self.worst <= self.tolerance


def _dtypes_of(b: backends.Backend) -> list[str]:
    return [d for d in TOLERANCE if hasattr(b.xp, d)]


def run_case(b: backends.Backend, dtype: str, layout: str, mode: str, seed: int) -> CaseResult:
    res = CaseResult(b.name, dtype, layout, mode, tolerance=TOLERANCE[dtype])
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    c = shape[axis]
    xp, dev = b.xp, b.device
    param_dtype = "float64" if dtype == "float64" else "float32"
    affine = mode != "affine-off"
    tracking = mode != "no-running-stats"
    training = mode != "eval"
    momentum = 0.1
    try:
        bn = BatchNorm(
            c,
            axis=axis,
            affine=affine,
            track_running_stats=tracking,
            momentum=momentum,
            backend=b,
            dtype=param_dtype,
        )
        state: dict[str, np.ndarray] = {}
        if affine:
            state["weight"] = rng.uniform(0.5, 1.5, c).astype(param_dtype)
            state["bias"] = rng.normal(0, 0.5, c).astype(param_dtype)
        if tracking:
            state["running_mean"] = rng.normal(0, 0.5, c).astype(param_dtype)
            state["running_var"] = rng.uniform(0.5, 2.0, c).astype(param_dtype)
            state["num_batches_tracked"] = np.asarray(3, dtype=np.int64)
        bn.load_state_dict(state)
        bn.train(training)

        x_host = rng.normal(0.5, 2.0, shape) + rng.normal(0, 1, c).reshape(
            [c if i == axis % len(shape) else 1 for i in range(len(shape))]
        )
        dy_host = rng.normal(0, 1, shape)
        x = xp.astype(xp.asarray(x_host, device=dev), getattr(xp, dtype))
        dy = xp.astype(xp.asarray(dy_host, device=dev), getattr(xp, dtype))
        y = bn(x)
        dx = bn.backward(dy)

        def f64(name: str) -> np.ndarray | None:
            v = state.get(name)
            return None if v is None else v.astype(np.float64)

        def rounded(a: Any) -> np.ndarray:
            """The case's input as the backend holds it, in float64 (via float32: NumPy has no bfloat16)."""
            if dtype in ("float16", "bfloat16"):
                a = xp.astype(a, xp.float32)
            return to_numpy(a).astype(np.float64)

        ref = layer_step(
            rounded(x),
            rounded(dy),
            axis=axis,
            weight=f64("weight"),
            bias=f64("bias"),
            running_mean=f64("running_mean"),
            running_var=f64("running_var"),
            training=training,
            eps=bn.eps,
            momentum=momentum,
        )
        got = {"y": y, "dx": dx}
        if affine:
            got["dgamma"], got["dbeta"] = bn.weight.grad, bn.bias.grad
        if "running_mean" in ref:
            got["running_mean"], got["running_var"] = bn.running_mean, bn.running_var
        for key in QUANTITIES:
            if key not in ref:
                continue
            g = got[key]
            if dtype == "bfloat16" and g.dtype != xp.float32:  # NumPy has no bfloat16
                g = xp.astype(g, xp.float32)
            res.errors[key] = rel_err(to_numpy(g), ref[key])
        if (
            tracking
            and not training
            and (not np.array_equal(to_numpy(bn.running_mean), state["running_mean"]))
        ):
            res.error = "eval forward changed the running mean"
    except Exception as e:  # a crash is a failed case, reported in the table
        res.error = f"{type(e).__name__}: {e}"
    return res


def run_matrix(
    names: list[str],
    *,
    dtypes: list[str] | None = None,
    layouts: list[str] | None = None,
    modes: list[str] | None = None,
    seed: int = 0,
) -> tuple[list[CaseResult], dict[str, str]]:
    """Run every case; returns the results and {backend: reason} for backends that cannot run."""
    results, skipped = [], {}
    for name in names:
        try:
            b = backends.resolve(name)
        except backends.BackendUnavailableError as e:
            skipped[name] = str(e)
            continue
        for dtype in _dtypes_of(b):
            if dtypes and dtype not in dtypes:
                continue
            for layout in layouts or LAYOUTS:
                for mode in modes or MODES:
                    results.append(run_case(b, dtype, layout, mode, seed))
    return results, skipped


def format_table(results: list[CaseResult]) -> str:
    head = ["backend", "dtype", "layout", "mode", *QUANTITIES, "tol", "result"]
    rows = []
    for r in results:
        cells = [r.backend, r.dtype, r.layout, r.mode]
        cells += [f"{r.errors[q]:.1e}" if q in r.errors else "-" for q in QUANTITIES]
        cells += [f"{r.tolerance:.0e}", "ok" if r.passed else f"FAIL{': ' + r.error if r.error else ''}"]
        rows.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _seed(text: str) -> int:
    # NumPy's generators take non-negative integers only, and would say so from inside the run
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if seed < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        action="append",
        choices=[*backends.KNOWN_BACKENDS, "auto"],
        default=None,
        help="backend to check; repeatable (default: every known backend, "
        "those that cannot run here are listed as skipped)",
    )
    parser.add_argument("--dtype", action="append", choices=list(TOLERANCE), default=None)
    parser.add_argument("--layout", action="append", choices=list(LAYOUTS), default=None)
    parser.add_argument("--mode", action="append", choices=list(MODES), default=None)
    parser.add_argument("--seed", type=_seed, default=0, help="non-negative (default 0)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def _error(message: str) -> int:
    print(f"xbn parity: error: {message}", file=sys.stderr)
    return 2


def _unique(values: list[str] | None) -> list[str] | None:
    """Repeated choices run once."""
    return None if values is None else list(dict.fromkeys(values))


def run(args: argparse.Namespace) -> int:
    names = _unique(args.backend) or list(backends.KNOWN_BACKENDS)
    json_file, created = None, False
    if args.json:
        # Opened before the matrix runs, so that an unwritable path fails at once rather than
        # after every case; append mode leaves an existing file intact until the results are in.
        created = not os.path.lexists(args.json)
        try:
            json_file = open(args.json, "a")  # noqa: SIM115 - closed in the finally below
        except OSError as e:
            return _error(f"--json {args.json}: cannot write there ({e.strerror or e})")
    wrote = False
    try:
        t0 = time.perf_counter()
        results, skipped = run_matrix(
            names,
            dtypes=_unique(args.dtype),
            layouts=_unique(args.layout),
            modes=_unique(args.mode),
            seed=args.seed,
        )
        if results:
            print(format_table(results))
        for name, reason in skipped.items():
            print(f"skipped {name}: {reason}")
        failed = [r for r in results if not r.passed]
        print(
            f"\n{len(results) - len(failed)} passed, {len(failed)} failed "
            f"({len(skipped)} backends skipped) in {time.perf_counter() - t0:.1f} s"
        )
        if json_file is not None:
            json_file.seek(0)
            json_file.truncate()
            json.dump(
                {"results": [asdict(r) | {"passed": r.passed} for r in results], "skipped": skipped},
                json_file,
                indent=1,
            )
            wrote = True
    finally:
        if json_file is not None:
            json_file.close()
            if created and not wrote:
                os.remove(args.json)
    if not results:
        why = [f"{name} cannot run here: {reason}" for name, reason in skipped.items()]
        usable = [name for name in names if name not in skipped]
        if usable:  # they ran no case, so the --dtype filter left none of theirs
            why.append(f"{', '.join(usable)} has none of the dtypes {', '.join(args.dtype or ())}")
        print(f"no case ran: {'; '.join(why)}", file=sys.stderr)
        return 1
    return 1 if failed else 0
