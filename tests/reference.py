"""Test-only helpers shared by every tier: ``snapshot``, ``to_backend``, ``rand``,
``numerical_grad``, ``check_layer_gradients``, ``assert_same_bits``.

The float64 reference and the error measure live in the package, :mod:`xbn._reference`, because
``xbn parity`` uses them at run time; new tests import them from there. Their names are also
exported here so that ``import reference as ref`` keeps working in the test modules that use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xbn._reference import (  # noqa: F401  (re-exported)
    assert_close,
    backward,
    batch_mean_var,
    forward,
    rel_err,
    to_numpy,
    update_running,
)


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


def to_backend(backend: Any, a: Any) -> Any:
    """A NumPy array as an array of the tier ``backend`` (an xbn Backend), on its device."""
    return backend.xp.asarray(np.asarray(a), device=backend.device)


def rand(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    dtype: Any = np.float64,
    loc: float = 0.0,
    scale: float = 1.0,
) -> np.ndarray:
    """Well-conditioned random data: N(loc, scale), cast to ``dtype``."""
    return rng.normal(loc, scale, size=shape).astype(dtype)


def numerical_grad(f: Any, a: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of the scalar ``f(a)`` at the float64 array ``a``.

    ``a`` is perturbed in place, one element at a time, and restored; closures that read ``a``
    themselves may ignore the argument.
    """
    g = np.empty_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        fp = f(a)
        a[i] = old - h
        fm = f(a)
        a[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


def check_layer_gradients(
    bn: Any,
    backend: Any,
    x: np.ndarray,
    r: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    tol: float,
    call: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The layer's backward against central differences of sum(call(x) * r) in x, weight and
    bias (float64 arrays ``x``, ``r``, ``w``, ``b``; ``call`` defaults to calling the layer).
    Asserts dx, weight.grad and bias.grad within ``tol``; returns the numerical gradients
    (dx, dgamma, dbeta)."""
    call = bn if call is None else call
    xp, dev = backend.xp, backend.device

    def loss(x_: np.ndarray = x, w_: np.ndarray = w, b_: np.ndarray = b) -> float:
        bn.weight.data, bn.bias.data = xp.asarray(w_, device=dev), xp.asarray(b_, device=dev)
        return float(np.sum(to_numpy(call(to_backend(backend, x_))) * r))

    num = (
        numerical_grad(lambda a: loss(x_=a), x.copy()),
        numerical_grad(lambda a: loss(w_=a), w.copy()),
        numerical_grad(lambda a: loss(b_=a), b.copy()),
    )
    loss()  # the unperturbed forward, then its backward
    bn.zero_grad()
    dx = bn.backward(to_backend(backend, r))
    for got, want, what in zip((dx, bn.weight.grad, bn.bias.grad), num, ("dx", "dgamma", "dbeta")):
        assert_close(to_numpy(got), want, tol, what)
    return num


def assert_same_bits(got: Any, want: Any, what: str, *, any_nan: bool = False) -> None:
    """``got`` is ``want`` bit for bit: same dtype, shape and bytes (or both None). With
    ``any_nan`` a NaN may differ from a NaN in sign and payload."""
    if got is None or want is None:
        assert got is None and want is None, what
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype)
    if any_nan:
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan), f"{what}: NaN in other places"
        got, want = np.where(nan, 0, got), np.where(nan, 0, want)
    assert got.tobytes() == want.tobytes(), (
        f"{what}: not the same bits; max difference "
        f"{np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))):.3e}"
    )
