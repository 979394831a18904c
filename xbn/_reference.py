"""The float64 NumPy reference for batch norm, and the one way xbn measures an error against it.

The formulas are written out from PyTorch's definitions (docs/semantics.md sections 3 to 5) in
plain NumPy and float64, deliberately independent of :mod:`xbn.functional`, so that a mistake
there cannot hide in both. The test suite and ``xbn parity`` both compare against this module,
and tests/test_torch_parity.py checks it against torch itself.

Semantics, as torch's ``BatchNorm*d``:

* training normalizes with the batch mean and the *biased* variance;
* the running variance is updated with the *unbiased* one, ``var * M / (M - 1)``;
* ``momentum=None`` is the cumulative average, factor ``1 / num_batches_tracked``;
* eval normalizes with the running statistics, unless the layer tracks none (then the batch's);
* dx with batch statistics is ``gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))``,
  with running statistics just ``gamma * invstd * dy``.

Errors are relative to the scale of the reference: ``max |got - want| / max |want|``. An
elementwise relative error would explode on the entries that happen to be near zero (dx of a
value at the channel mean, for one), which says nothing about the computation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "assert_close",
    "backward",
    "batch_mean_var",
    "forward",
    "layer_step",
    "rel_err",
    "to_numpy",
    "update_running",
]


# -- measuring an error --------------------------------------------------------------------------


def to_numpy(a: Any) -> np.ndarray:
    """A NumPy copy of an array of any tier (NumPy, torch, array-api-strict on any device, CuPy)."""
    mod = type(a).__module__
    if mod.startswith("cupy"):
        return a.get()
    if mod.startswith("torch"):
        return a.detach().cpu().numpy().copy()
    if mod.startswith("array_api_strict"):
        import array_api_strict

        return np.array(np.from_dlpack(a.to_device(array_api_strict.Device("CPU_DEVICE"))), copy=True)
    return np.array(a, copy=True)


def _error_scale(want: np.ndarray, scale: float) -> float:
    s = max(float(np.max(np.abs(want), initial=0.0)), scale)
    return s if s > 0 else 1.0  # an all-zero reference: the error is absolute


def rel_err(got: Any, want: Any, *, scale: float = 0.0) -> float:
    """``max |got - want| / max(max |want|, scale)``; absolute where that is 0, inf if got is not
    finite.

    ``scale`` is for values computed from larger terms that cancel (dx with two values per
    channel is O(eps / var) of its terms): their roundoff is on the scale of the terms, not of
    the result.
    """
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: got {got.shape}, reference {want.shape}")
    if want.size == 0:
        return 0.0
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(got - want))) / _error_scale(want, scale)


def assert_close(got: Any, want: Any, tol: float, what: str = "", *, scale: float = 0.0) -> float:
    """Assert ``rel_err(got, want, scale=scale) <= tol``; return the error (for reporting).

    The failure message names the quantity, the error, the tolerance, and where the worst
    element is with its two values.
    """
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    label = f"{what}: " if what else ""
    if got.shape != want.shape:
        raise AssertionError(f"{label}shape {got.shape}, reference shape {want.shape}")
    bad = ~np.isfinite(got)
    if np.any(bad):
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{label}{int(bad.sum())} non-finite values, the first at index {where} "
            f"(got {float(got[where])!r}, reference {float(want[where])!r})"
        )
    err = rel_err(got, want, scale=scale)
    if not err <= tol:
        where = tuple(int(i) for i in np.unravel_index(int(np.argmax(np.abs(got - want))), got.shape))
        raise AssertionError(
            f"{label}max relative error {err:.3e} > tolerance {tol:.1e}, at index {where}: "
            f"got {float(got[where])!r}, reference {float(want[where])!r} "
            f"(error relative to {_error_scale(want, scale):.3e})"
        )
    return err


# -- the reference math --------------------------------------------------------------------------


def _channel_shape(ndim: int, axis: int, c: int) -> tuple[int, ...]:
    return tuple(c if i == axis else 1 for i in range(ndim))


def _reduction_axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis)


def batch_mean_var(x: Any, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance, in float64 (two passes)."""
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    mean = x.mean(axis=_reduction_axes(x.ndim, axis))
    xmu = x - mean.reshape(_channel_shape(x.ndim, axis, x.shape[axis]))
    return mean, (xmu**2).mean(axis=_reduction_axes(x.ndim, axis))


def _stats(
    x: np.ndarray, axis: int, running_mean: Any, running_var: Any, use_batch_stats: bool
) -> tuple[np.ndarray, np.ndarray]:
    if use_batch_stats:
        return batch_mean_var(x, axis)
    return np.asarray(running_mean, dtype=np.float64), np.asarray(running_var, dtype=np.float64)


def forward(
    x: Any,
    *,
    axis: int = 1,
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
    running_mean: Any = None,
    running_var: Any = None,
    use_batch_stats: bool = True,
) -> dict[str, np.ndarray]:
    """y = (x - mean) / sqrt(var + eps) * weight + bias, with batch (biased) or running statistics.

    Returns y and the statistics the backward uses: mean, var, invstd.
    """
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    c = x.shape[axis]
    mean, var = _stats(x, axis, running_mean, running_var, use_batch_stats)
    invstd = 1.0 / np.sqrt(var + eps)
    w = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64)
    b = np.zeros(c) if bias is None else np.asarray(bias, dtype=np.float64)
    bs = _channel_shape(x.ndim, axis, c)
    y = (x - mean.reshape(bs)) * invstd.reshape(bs) * w.reshape(bs) + b.reshape(bs)
    return {"y": y, "mean": mean, "var": var, "invstd": invstd}


def backward(
    dy: Any,
    x: Any,
    *,
    axis: int = 1,
    weight: Any = None,
    eps: float = 1e-5,
    running_mean: Any = None,
    running_var: Any = None,
    use_batch_stats: bool = True,
) -> dict[str, np.ndarray]:
    """dx, dgamma and dbeta of :func:`forward` (A.11; A.6 with running statistics)."""
    dy = np.asarray(dy, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    c = x.shape[axis]
    bs = _channel_shape(x.ndim, axis, c)
    axes = _reduction_axes(x.ndim, axis)
    m = x.size // c
    mean, var = _stats(x, axis, running_mean, running_var, use_batch_stats)
    invstd = 1.0 / np.sqrt(var + eps)
    w = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64)
    xmu = x - mean.reshape(bs)
    sum_dy = dy.sum(axis=axes)
    sum_dy_xmu = (dy * xmu).sum(axis=axes)
    if use_batch_stats:  # the batch statistics depend on x too
        dx = (w * invstd).reshape(bs) * (
            dy - (sum_dy / m).reshape(bs) - xmu * (invstd**2 * sum_dy_xmu / m).reshape(bs)
        )
    else:
        dx = dy * (w * invstd).reshape(bs)
    return {"dx": dx, "dgamma": sum_dy_xmu * invstd, "dbeta": sum_dy}


def update_running(
    running_mean: Any,
    running_var: Any,
    x: Any,
    *,
    axis: int = 1,
    momentum: float | None = 0.1,
    num_batches_tracked: int = 0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One training step's update (A.2, A.3): returns (running_mean, running_var, num_batches_tracked)."""
    x = np.asarray(x, dtype=np.float64)
    axis = axis % x.ndim
    m = x.size // x.shape[axis]
    mean, var = batch_mean_var(x, axis)
    nbt = num_batches_tracked + 1
    factor = 1.0 / nbt if momentum is None else momentum
    rm = (1 - factor) * np.asarray(running_mean, dtype=np.float64) + factor * mean
    rv = (1 - factor) * np.asarray(running_var, dtype=np.float64) + factor * var * m / (m - 1)
    return rm, rv, nbt


def layer_step(
    x: Any,
    dy: Any,
    *,
    axis: int = 1,
    weight: Any = None,
    bias: Any = None,
    running_mean: Any = None,
    running_var: Any = None,
    num_batches_tracked: int = 0,
    training: bool = True,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
) -> dict[str, Any]:
    """What one forward and backward of a torch BatchNorm layer produce, from its state.

    Always y and dx; dgamma and dbeta when it is affine (``weight`` given); the updated
    running_mean, running_var and num_batches_tracked when it trains and tracks statistics.
    """
    tracking = running_mean is not None
    use_batch_stats = training or not tracking
    stats = dict(
        axis=axis,
        eps=eps,
        running_mean=running_mean,
        running_var=running_var,
        use_batch_stats=use_batch_stats,
    )
    out: dict[str, Any] = {"y": forward(x, weight=weight, bias=bias, **stats)["y"]}
    grads = backward(dy, x, weight=weight, **stats)
    out["dx"] = grads["dx"]
    if weight is not None:
        out["dgamma"], out["dbeta"] = grads["dgamma"], grads["dbeta"]
    if training and tracking:
        out["running_mean"], out["running_var"], out["num_batches_tracked"] = update_running(
            running_mean,
            running_var,
            x,
            axis=axis,
            momentum=momentum,
            num_batches_tracked=num_batches_tracked,
        )
    return out
