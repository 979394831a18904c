"""Run xbn's CUDA kernels on the CPU: tests/cuda_host compiles the very .cu sources as C++.

Each CUDA thread becomes a std::thread, blocks run in a shuffled order, and the build uses
AddressSanitizer and UndefinedBehaviorSanitizer, so the tests here check on any machine with
g++ what only a GPU could otherwise: that every element is written exactly where the planner
says, that no access leaves its buffer, that every thread reaches every barrier, that the grid
reduction's last block merges correctly whichever block it is, and that its counters are left
at zero. The launch arguments come from the same planner (:mod:`xbn.kernels._launch`) the CuPy
wrappers use; only the device properties (SM count, occupancy) are made up, small, so that
small arrays already split channels across blocks.

bfloat16 arrays are carried as uint16 bit patterns (NumPy has no bfloat16).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from xbn.kernels import _launch

HERE = Path(__file__).resolve().parent / "cuda_host"
KERNELS = Path(_launch.__file__).resolve().parent
FLAGS = (
    "-std=c++20",
    "-O1",
    "-g",
    "-pthread",
    "-Wall",
    "-Wno-unknown-pragmas",
    "-ffp-contract=off",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",
    "-fno-omit-frame-pointer",
)
#: Made-up device: 8 SMs of 512 resident threads, so a wave is 16 blocks of 256.
SM_COUNT = 8
THREADS_PER_SM = 512


def compiler() -> str | None:
    """g++ (or $CXX) if it builds the harness' features (C++20 <barrier>, _Float16, sanitizers)."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx:
        return None
    return cxx if _probe(cxx) else None


@functools.cache
def _probe(cxx: str) -> bool:
    src = "#include <barrier>\nint main(){ _Float16 h = (_Float16)1.5f; return (int)(float)h - 1; }\n"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "probe.cpp"
        path.write_text(src)
        try:
            r = subprocess.run(
                [cxx, *FLAGS, str(path), "-o", str(Path(d) / "probe")], capture_output=True, timeout=120
            )
            if r.returncode != 0:
                return False
            return subprocess.run([str(Path(d) / "probe")], timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def _fingerprint() -> str:
    h = hashlib.sha256()
    for path in sorted(HERE.glob("*")) + sorted(KERNELS.glob("*.cu*")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(" ".join(FLAGS).encode())
    return h.hexdigest()[:16]


@functools.cache
def driver(key: str) -> Path:
    """The harness built for dtype ``key``, cached by the hash of every source it compiles."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++20 compiler with sanitizers and _Float16 found")
    out_dir = Path(tempfile.gettempdir()) / f"xbn-cuda-host-{_fingerprint()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / f"driver_{key}"
    if not exe.exists():
        tmp = out_dir / f"driver_{key}.{os.getpid()}.tmp"
        cmd = [
            cxx,
            *FLAGS,
            f"-DXBN_DTYPE_{key.upper()}",
            f"-I{KERNELS}",
            f"-I{HERE}",
            str(HERE / "driver.cpp"),
            "-o",
            str(tmp),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"building the host harness failed:\n{r.stdout}\n{r.stderr}")
        tmp.replace(exe)
    return exe


class HostRunError(AssertionError):
    """The harness reported a problem (divergent barrier, sanitizer error, bad launch)."""


def run_raw(
    key: str,
    kernel: str,
    grid: tuple[int, ...],
    block: tuple[int, ...],
    buffers: list[np.ndarray],
    ints: list[int],
    *,
    doubles: list[float] = (),
    seed: int = 0,
    timeout: float = 300,
) -> list[np.ndarray]:
    """Launch ``kernel`` (compiled for dtype ``key``) with ``buffers`` as its pointer arguments,
    ``ints`` as its int arguments and ``doubles`` as its double arguments, each in order; return
    the buffers' contents afterwards."""
    with tempfile.TemporaryDirectory() as d:
        files = []
        for i, a in enumerate(buffers):
            path = Path(d) / f"buf{i}"
            np.ascontiguousarray(a).tofile(path)
            files.append(str(path))
        cmd = [
            str(driver(key)),
            kernel,
            str(grid[0]),
            str(grid[1]),
            str(block[0]),
            str(block[1]),
            str(seed),
            str(len(files)),
            *files,
            str(len(ints)),
            *map(str, ints),
        ]
        if doubles:  # hexadecimal: every bit of each double reaches the kernel
            cmd += [str(len(doubles)), *(float(v).hex() for v in doubles)]
        env = dict(
            os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1"
        )
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as e:
            raise HostRunError(
                f"{kernel} did not finish in {timeout} s (a deadlock: threads waiting at different barriers?)"
            ) from e
        if r.returncode != 0:
            raise HostRunError(
                f"{kernel} grid={tuple(grid)} block={tuple(block)} ints={ints}: "
                f"exit {r.returncode}\n{r.stderr[-4000:]}"
            )
        return [np.fromfile(f, dtype=a.dtype).reshape(a.shape) for f, a in zip(files, buffers)]


def run_kernel(
    key: str,
    plan: _launch.LaunchPlan,
    op: str,
    values: dict[str, Any],
    *,
    seed: int = 0,
    timeout: float = 300,
) -> dict[str, np.ndarray]:
    """Launch ``plan`` in the harness with the arrays of ``values``; return them afterwards."""
    _launch.arguments(op, plan, values)  # checks the names
    names = _launch.ARGUMENTS[op]
    arrays = [n for n in names if isinstance(values[n], np.ndarray)]
    doubles = [float(values[n]) for n in names if isinstance(values[n], (float, np.floating))]
    ints = [
        int(values[n]) for n in names if n not in arrays and not isinstance(values[n], (float, np.floating))
    ]
    outs = run_raw(
        key,
        plan.kernel,
        plan.grid,
        plan.block,
        [values[n] for n in arrays],
        ints + list(plan.args),
        doubles=doubles,
        seed=seed,
        timeout=timeout,
    )
    return dict(zip(arrays, outs))


# -- dtypes -------------------------------------------------------------------------------------


def to_storage(x: np.ndarray, name: str) -> np.ndarray:
    """float64 values as the kernels' storage for dtype ``name`` (bfloat16: uint16 bits, RNE)."""
    if name == "bfloat16":
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return rounded.astype(np.uint16)
    return np.asarray(x, dtype=name)


def from_storage(a: np.ndarray, name: str) -> np.ndarray:
    """Storage back to float64 values."""
    if name == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def itemsize(name: str) -> int:
    return 2 if name == "bfloat16" else np.dtype(name).itemsize


def poison(shape: tuple[int, ...], name: str) -> np.ndarray:
    """An output buffer full of NaN (in the storage dtype)."""
    if name == "bfloat16":
        return np.full(shape, 0x7FC1, dtype=np.uint16)
    return np.full(shape, np.nan, dtype=name)


# -- the four ops, assembled as xbn.kernels.cupy assembles them ---------------------------------


def _plan(
    op: str,
    layout: _launch.Layout,
    dtype: str,
    wide: bool,
    sm_count: int,
    plan: _launch.LaunchPlan | None = None,
) -> _launch.LaunchPlan:
    if plan is not None:  # a test's own launch shape, for the same kernel family
        assert plan.kernel.startswith(f"xbn_{op}_{layout.kind}_v"), (op, plan.kernel)
        return plan
    vec = _launch.vector_width(layout, itemsize(dtype)) if wide else 1
    return _launch.plan(op, layout, vec, sm_count=sm_count, threads_per_sm=THREADS_PER_SM)


def _workspace(plan: _launch.LaunchPlan, acc: str) -> dict[str, np.ndarray]:
    # Exactly sized (the sanitizer sees any overrun); with one part a single poisoned slot that
    # must come back untouched.
    n = max(plan.workspace, 1)
    return {
        "ws_a": np.full(n, np.nan, dtype=acc),
        "ws_b": np.full(n, np.nan, dtype=acc),
        "counters": np.zeros(max(plan.counters, 1), dtype=np.uint32),
    }


def _check_workspace(plan: _launch.LaunchPlan, out: dict[str, np.ndarray]) -> None:
    if np.any(out["counters"] != 0):
        raise HostRunError(f"{plan.kernel}: counters not reset to zero: {out['counters']}")
    if plan.parts == 1 and not (np.isnan(out["ws_a"]).all() and np.isnan(out["ws_b"]).all()):
        raise HostRunError(f"{plan.kernel}: touched the workspace with parts == 1")


def batch_stats(
    x: np.ndarray,
    dtype: str,
    *,
    axis: int,
    wide: bool = True,
    seed: int = 0,
    sm_count: int = SM_COUNT,
    plan: _launch.LaunchPlan | None = None,
):
    """(mean, var, plan) of ``x`` (storage array of ``dtype``) by the stats kernel."""
    layout = _launch.plan_layout(x.shape, axis, c_contiguous=True)
    key, acc = _launch.dtype_key(dtype), _launch.accumulator_dtype(dtype)
    plan = _plan("stats", layout, dtype, wide, sm_count, plan)
    c = layout.channels
    ws = _workspace(plan, acc)
    values = {
        "x": x,
        "mean": poison((c,), acc),
        "var": poison((c,), acc),
        "ws_n": np.full(max(plan.workspace, 1), -7, dtype=np.int32),
        **ws,
    }
    out = run_kernel(key, plan, "stats", values, seed=seed)
    _check_workspace(plan, out)
    return out["mean"], out["var"], plan


def backward_reduce(
    dy: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    dtype: str,
    *,
    axis: int,
    wide: bool = True,
    seed: int = 0,
    sm_count: int = SM_COUNT,
    plan=None,
):
    layout = _launch.plan_layout(x.shape, axis, c_contiguous=True)
    key, acc = _launch.dtype_key(dtype), _launch.accumulator_dtype(dtype)
    plan = _plan("backward_reduce", layout, dtype, wide, sm_count, plan)
    c = layout.channels
    values = {
        "dy": dy,
        "x": x,
        "mean": np.asarray(mean, dtype=acc),
        "sum_dy": poison((c,), acc),
        "sum_dy_xmu": poison((c,), acc),
        **_workspace(plan, acc),
    }
    out = run_kernel(key, plan, "backward_reduce", values, seed=seed)
    _check_workspace(plan, out)
    return out["sum_dy"], out["sum_dy_xmu"], plan


def scale_shift(
    x: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray | None,
    dtype: str,
    *,
    axis: int,
    wide: bool = True,
    seed: int = 0,
    sm_count: int = SM_COUNT,
    plan=None,
):
    layout = _launch.plan_layout(x.shape, axis, c_contiguous=True)
    key, acc = _launch.dtype_key(dtype), _launch.accumulator_dtype(dtype)
    plan = _plan("scale_shift", layout, dtype, wide, sm_count, plan)
    scale = np.asarray(scale, dtype=acc)
    values = {
        "x": x,
        "scale": scale,
        "shift": np.asarray(shift, dtype=acc) if shift is not None else scale.copy(),
        "has_shift": 0 if shift is None else 1,
        "y": poison(x.shape, dtype),
    }
    out = run_kernel(key, plan, "scale_shift", values, seed=seed)
    return out["y"], plan


def backward_apply(
    dy: np.ndarray,
    x: np.ndarray,
    mean,
    k_dy,
    k_xmu,
    k_const,
    dtype: str,
    *,
    axis: int,
    wide: bool = True,
    seed: int = 0,
    sm_count: int = SM_COUNT,
    plan=None,
):
    layout = _launch.plan_layout(x.shape, axis, c_contiguous=True)
    key, acc = _launch.dtype_key(dtype), _launch.accumulator_dtype(dtype)
    plan = _plan("backward_apply", layout, dtype, wide, sm_count, plan)
    values = {
        "dy": dy,
        "x": x,
        "mean": np.asarray(mean, dtype=acc),
        "k_dy": np.asarray(k_dy, dtype=acc),
        "k_xmu": np.asarray(k_xmu, dtype=acc),
        "k_const": np.asarray(k_const, dtype=acc),
        "dx": poison(x.shape, dtype),
    }
    out = run_kernel(key, plan, "backward_apply", values, seed=seed)
    return out["dx"], plan


# -- the fused reductions of the whole-step ops -------------------------------------------------


def _param(v: np.ndarray | None, dt: str, placeholder: np.ndarray) -> np.ndarray:
    return placeholder if v is None else np.asarray(v, dtype=dt)


def stats_fused(
    x: np.ndarray,
    weight,
    bias,
    running_mean,
    running_var,
    dtype: str,
    *,
    axis: int,
    eps: float = 1e-5,
    momentum: float = 0.1,
    param_dtype: str = "float32",
    wide: bool = True,
    seed: int = 0,
    sm_count: int = SM_COUNT,
    plan: _launch.LaunchPlan | None = None,
):
    """The fused statistics kernel (xbn_stats_fused_*) as the CuPy wrapper launches it:
    returns ({mean, inv, scale, shift, new_running_mean, new_running_var}, plan); the running
    outputs are None without running statistics. Absent vectors get placeholders that the
    kernel must leave alone (checked)."""
    layout = _launch.plan_layout(x.shape, axis, c_contiguous=True)
    key, acc = _launch.dtype_key(dtype), _launch.accumulator_dtype(dtype)
    plan = _plan("stats_fused", layout, dtype, wide, sm_count, plan)
    c = layout.channels
    running = running_mean is not None and running_var is not None
    sentinel = np.full(c, -123.0, dtype=param_dtype)  # stands in for every absent vector
    flags = (
        (_launch.FLAG_HAS_WEIGHT if weight is not None else 0)
        | (_launch.FLAG_HAS_BIAS if bias is not None else 0)
        | (_launch.FLAG_HAS_RUNNING if running else 0)
        | (_launch.FLAG_PARAMS_F64 if param_dtype == "float64" else 0)
    )
    count = layout.count
    values = {
        "x": x,
        "mean": poison((c,), acc),
        "inv": poison((c,), acc),
        "scale": poison((c,), acc),
        "shift": poison((c,), acc),
        "weight": _param(weight, param_dtype, sentinel.copy()),
        "bias": _param(bias, param_dtype, sentinel.copy()),
        "running_mean": _param(running_mean if running else None, param_dtype, sentinel.copy()),
        "running_var": _param(running_var if running else None, param_dtype, sentinel.copy()),
        "new_running_mean": poison((c,), param_dtype) if running else sentinel.copy(),
        "new_running_var": poison((c,), param_dtype) if running else sentinel.copy(),
        "ws_n": np.full(max(plan.workspace, 1), -7, dtype=np.int32),
        **_workspace(plan, acc),
        "eps": float(eps),
        "keep": float(1.0 - momentum) if running else 0.0,
        "momentum": float(momentum) if running else 0.0,
        "unbias": float(count / (count - 1)) if running else 0.0,
        "flags": flags,
    }
    out = run_kernel(key, plan, "stats_fused", values, seed=seed)
    _check_workspace(plan, out)
    for name in ("weight", "bias", "running_mean", "running_var"):
        if not np.array_equal(out[name], values[name]):
            raise HostRunError(f"{plan.kernel}: wrote into its input {name}")
    if not running:
        for name in ("new_running_mean", "new_running_var"):
            if not (out[name] == -123.0).all():
                raise HostRunError(f"{plan.kernel}: wrote {name} without running statistics")
    result = {k: out[k] for k in ("mean", "inv", "scale", "shift")}
    result["new_running_mean"] = out["new_running_mean"] if running else None
    result["new_running_var"] = out["new_running_var"] if running else None
    return result, plan


def backward_reduce_fused(
    dy: np.ndarray,
    x: np.ndarray,
    mean,
    inv,
    weight,
    dtype: str,
    *,
    axis: int,
    param_dtype: str = "float32",
    wide: bool = True,
    seed: int = 0,
    sm_count: int = SM_COUNT,
    plan: _launch.LaunchPlan | None = None,
):
    """The fused backward reduction (xbn_backward_reduce_fused_*): returns
    ({dgamma, dbeta, k_dy, k_xmu, k_const}, plan)."""
    layout = _launch.plan_layout(x.shape, axis, c_contiguous=True)
    key, acc = _launch.dtype_key(dtype), _launch.accumulator_dtype(dtype)
    plan = _plan("backward_reduce_fused", layout, dtype, wide, sm_count, plan)
    c = layout.channels
    flags = (_launch.FLAG_HAS_WEIGHT if weight is not None else 0) | (
        _launch.FLAG_PARAMS_F64 if param_dtype == "float64" else 0
    )
    names = ("dgamma", "dbeta", "k_dy", "k_xmu", "k_const")
    values = {
        "dy": dy,
        "x": x,
        "mean": np.asarray(mean, dtype=acc),
        "inv": np.asarray(inv, dtype=acc),
        "weight": _param(weight, param_dtype, np.full(c, -123.0, dtype=param_dtype)),
        **{n: poison((c,), acc) for n in names},
        **_workspace(plan, acc),
        "flags": flags,
    }
    out = run_kernel(key, plan, "backward_reduce_fused", values, seed=seed)
    _check_workspace(plan, out)
    return {n: out[n] for n in names}, plan


def inference(
    x: np.ndarray,
    weight,
    bias,
    running_mean,
    running_var,
    dtype: str,
    *,
    axis: int,
    eps: float = 1e-5,
    param_dtype: str = "float32",
    wide: bool = True,
    seed: int = 0,
    sm_count: int = SM_COUNT,
    plan: _launch.LaunchPlan | None = None,
):
    """The eval-mode forward kernel (xbn_inference_*): returns (y, plan). Absent weight or bias
    get a placeholder the kernel must leave alone (checked)."""
    layout = _launch.plan_layout(x.shape, axis, c_contiguous=True)
    key = _launch.dtype_key(dtype)
    plan = _plan("inference", layout, dtype, wide, sm_count, plan)
    c = layout.channels
    sentinel = np.full(c, -123.0, dtype=param_dtype)
    flags = (
        (_launch.FLAG_HAS_WEIGHT if weight is not None else 0)
        | (_launch.FLAG_HAS_BIAS if bias is not None else 0)
        | (_launch.FLAG_PARAMS_F64 if param_dtype == "float64" else 0)
    )
    values = {
        "x": x,
        "weight": _param(weight, param_dtype, sentinel.copy()),
        "bias": _param(bias, param_dtype, sentinel.copy()),
        "running_mean": np.asarray(running_mean, dtype=param_dtype),
        "running_var": np.asarray(running_var, dtype=param_dtype),
        "y": poison(x.shape, dtype),
        "eps": float(eps),
        "flags": flags,
    }
    out = run_kernel(key, plan, "inference", values, seed=seed)
    for name in ("weight", "bias", "running_mean", "running_var"):
        if not np.array_equal(out[name], values[name]):
            raise HostRunError(f"{plan.kernel}: wrote into its input {name}")
    return out["y"], plan
