"""A float64 NumPy reference for batch norm, written from the formulas (REFERENCE.md A.2, A.3, A.11).

Deliberately independent of :mod:`xbn.functional`: plain NumPy, the textbook one-line formulas,
everything in float64. Tests compare xbn against this, and against torch where it is installed.
Also the shared helpers every tier needs: ``to_numpy``, ``snapshot``, ``rel_err``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


# -- conversion helpers -------------------------------------------------------------------------


def to_numpy(a: Any) -> np.ndarray | None:
    """A NumPy copy of an array of any tier (NumPy, torch, array-api-strict on any device, CuPy)."""
    if a is None:
        return None
    mod = type(a).__module__
    if mod.startswith("cupy"):
        return a.get()
    if mod.startswith("torch"):
        return a.detach().cpu().numpy().copy()
    if mod.startswith("array_api_strict"):
        import array_api_strict

        return np.array(np.from_dlpack(a.to_device(array_api_strict.Device("CPU_DEVICE"))), copy=True)
    return np.array(a, copy=True)


def snapshot(layer: Any) -> dict[str, Any]:
    """Everything a failed call must leave unchanged: bytes, dtypes and shapes of the state."""
    snap: dict[str, Any] = {"num_batches_tracked": layer.num_batches_tracked}
    for name in ("weight", "bias"):
        p = getattr(layer, name)
        for field in ("data", "grad"):
            a = None if p is None else getattr(p, field)
            snap[f"{name}.{field}"] = None if a is None else _fingerprint(a)
    for name in ("running_mean", "running_var"):
        a = getattr(layer, name)
        snap[name] = None if a is None else _fingerprint(a)
    snap["training"] = layer.training
    return snap


def _fingerprint(a: Any) -> tuple[str, tuple[int, ...], bytes]:
    h = to_numpy(a)
    return (str(h.dtype), h.shape, h.tobytes())


def rel_err(got: Any, ref: Any) -> float:
    """max |got - ref| / max |ref| (the scale of the reference; 1 when it is all zeros)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if ref.size == 0:
        return 0.0
    scale = float(np.max(np.abs(ref)))
    return float(np.max(np.abs(got - ref))) / (scale if scale > 0 else 1.0)


def assert_close(got: Any, ref: Any, tol: float, what: str = "") -> float:
    """Assert rel_err(got, ref) <= tol and return the error (for reporting)."""
    err = rel_err(got, ref)
    assert np.all(np.isfinite(np.asarray(got, dtype=np.float64))), f"{what}: non-finite values"
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
    return err


# -- the reference math -------------------------------------------------------------------------


def _bshape(ndim: int, axis: int, c: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = c
    return tuple(shape)


def _axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis)


def batch_mean_var(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance, in float64 (two passes)."""
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    axes = _axes(x.ndim, axis)
    mean = x.mean(axis=axes)
    var = ((x - mean.reshape(_bshape(x.ndim, axis, x.shape[axis]))) ** 2).mean(axis=axes)
    return mean, var


def forward(
    x: np.ndarray,
    *,
    axis: int = 1,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    eps: float = 1e-5,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    use_batch_stats: bool = True,
) -> dict[str, np.ndarray]:
    """y = (x - mean) / sqrt(var + eps) * weight + bias, with batch (biased) or running statistics.

    Returns y and the saved (mean, var, invstd) the backward needs.
    """
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    c = x.shape[axis]
    if use_batch_stats:
        mean, var = batch_mean_var(x, axis)
    else:
        mean = np.asarray(running_mean, dtype=np.float64)
        var = np.asarray(running_var, dtype=np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    w = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64)
    b = np.zeros(c) if bias is None else np.asarray(bias, dtype=np.float64)
    bs = _bshape(x.ndim, axis, c)
    y = (x - mean.reshape(bs)) * invstd.reshape(bs) * w.reshape(bs) + b.reshape(bs)
    return {"y": y, "mean": mean, "var": var, "invstd": invstd}


def backward(
    dy: np.ndarray,
    x: np.ndarray,
    *,
    axis: int = 1,
    weight: np.ndarray | None = None,
    eps: float = 1e-5,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    use_batch_stats: bool = True,
) -> dict[str, np.ndarray]:
    """(dx, dgamma, dbeta) of the forward above, from REFERENCE A.11 (A.6 for eval mode)."""
    dy = np.asarray(dy, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    c = x.shape[axis]
    bs = _bshape(x.ndim, axis, c)
    axes = _axes(x.ndim, axis)
    m = x.size // c
    if use_batch_stats:
        mean, var = batch_mean_var(x, axis)
    else:
        mean = np.asarray(running_mean, dtype=np.float64)
        var = np.asarray(running_var, dtype=np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    w = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64)
    xmu = x - mean.reshape(bs)
    sum_dy = dy.sum(axis=axes)
    sum_dy_xmu = (dy * xmu).sum(axis=axes)
    dgamma = sum_dy_xmu * invstd
    dbeta = sum_dy
    if use_batch_stats:
        dx = (w * invstd).reshape(bs) * (
            dy
            - (sum_dy / m).reshape(bs)
            - xmu * (invstd**2 * sum_dy_xmu / m).reshape(bs)
        )
    else:
        dx = dy * (w * invstd).reshape(bs)
    return {"dx": dx, "dgamma": dgamma, "dbeta": dbeta}


def update_running(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    x: np.ndarray,
    *,
    axis: int = 1,
    momentum: float | None = 0.1,
    num_batches_tracked: int = 0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One training step's update (A.2, A.3): returns (running_mean, running_var, nbt)."""
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    m_count = x.size // x.shape[axis]
    mean, var = batch_mean_var(x, axis)
    unbiased = var * m_count / (m_count - 1)
    nbt = num_batches_tracked + 1
    m = 1.0 / nbt if momentum is None else momentum
    rm = (1 - m) * np.asarray(running_mean, dtype=np.float64) + m * mean
    rv = (1 - m) * np.asarray(running_var, dtype=np.float64) + m * unbiased
    return rm, rv, nbt


def to_backend(backend: Any, a: Any) -> Any:
    """A NumPy array as an array of the tier ``backend`` (an xbn Backend), on its device."""
    return backend.xp.asarray(np.asarray(a), device=backend.device)


def rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any = np.float64,
         loc: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """Well-conditioned random data: N(loc, scale), cast to ``dtype``."""
    return rng.normal(loc, scale, size=shape).astype(dtype)
