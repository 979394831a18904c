"""Batch renormalization (Ioffe, 2017): training outputs that agree with eval outputs.

In training, each channel is normalized with its batch statistics and then corrected towards the
running statistics::

    r = clip(sigma_B / sigma_R, 1 / rmax, rmax)
    d = clip((mu_B - mu_R) / sigma_R, -dmax, dmax)
    y = gamma * (x_hat * r + d) + beta,        x_hat = (x - mu_B) / sigma_B

with sigma = sqrt(var + eps) and mu_R, sigma_R the running statistics as they were before this
step's update. r and d are constants in the backward (the paper's stop-gradient). Without
clipping, a training step normalizes exactly as eval would with the same running statistics;
with ``rmax = 1, dmax = 0`` it is BatchNorm.

That is BatchNorm's forward with an effective weight ``gamma * r`` and bias ``beta + gamma * d``,
so the statistics, the normalization and the backward's two passes are BatchNorm's own ops (and
their fast paths); only the per-channel arithmetic around them is renorm's.

Examples
--------
>>> import numpy as np, xbn
>>> bn = xbn.BatchRenorm1d(2, rmax=1.0, dmax=0.0, backend="numpy", dtype="float64")
>>> x = np.array([[1.0, 10.0], [3.0, 14.0]])
>>> np.round(bn(x), 4).tolist()        # rmax = 1, dmax = 0: batch norm
[[-1.0, -1.0], [1.0, 1.0]]
>>> bn.rmax, bn.dmax = 3.0, 5.0      # a warm-up schedule loosens the clipping between steps
>>> bn.rmax, bn.dmax
(3.0, 5.0)
>>> bn.rmax = 0.5
Traceback (most recent call last):
...
ValueError: rmax must be a finite number >= 1 (r is clipped to [1/rmax, rmax]), got 0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from . import _arrays
from . import functional as F
from .backends import Ops
from .layers import BatchNorm, SavedForward

Array = Any

__all__ = [
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "renorm_corrections",
]


def _check_rmax(rmax: Any) -> float:
    if not _arrays.is_real(rmax):
        raise TypeError(f"rmax must be a real number, got {type(rmax).__name__}")
    if not (math.isfinite(rmax) and rmax >= 1.0):
        raise ValueError(f"rmax must be a finite number >= 1 (r is clipped to [1/rmax, rmax]), got {rmax}")
    return float(rmax)


def _check_dmax(dmax: Any) -> float:
    if not _arrays.is_real(dmax):
        raise TypeError(f"dmax must be a real number, got {type(dmax).__name__}")
    if not (math.isfinite(dmax) and dmax >= 0.0):
        raise ValueError(f"dmax must be a finite number >= 0 (d is clipped to [-dmax, dmax]), got {dmax}")
    return float(dmax)


def renorm_corrections(
    mean: Array,
    var: Array,
    running_mean: Array,
    running_var: Array,
    /,
    *,
    eps: float,
    rmax: float,
    dmax: float,
    xp: ModuleType | None = None,
) -> tuple[Array, Array]:
    """Per-channel (r, d) of batch renormalization, clipped.

    r = clip(sqrt(var + eps) / sqrt(running_var + eps), 1/rmax, rmax) and
    d = clip((mean - running_mean) / sqrt(running_var + eps), -dmax, dmax), where ``mean`` and
    ``var`` are the batch's mean and biased variance. The arrays must share one dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from xbn.renorm import renorm_corrections
    >>> r, d = renorm_corrections(np.array([2.0, 0.0]), np.array([4.0, 100.0]), np.zeros(2),
    ...                           np.ones(2), eps=0.0, rmax=3.0, dmax=1.0)
    >>> r.tolist(), d.tolist()    # sigma_B / sigma_R = 2 and 10 (clipped); mean offsets 2 (clipped) and 0
    ([2.0, 3.0], [1.0, 0.0])
    """
    xp = F._ns(xp, mean, running_mean)
    sigma_r = xp.sqrt(running_var + eps)
    r = _clip(xp.sqrt(var + eps) / sigma_r, 1.0 / rmax, rmax, xp)
    d = _clip((mean - running_mean) / sigma_r, -dmax, dmax, xp)
    return r, d


def _clip(a: Array, lo: float, hi: float, xp: ModuleType) -> Array:
    # minimum/maximum rather than clip: array-api-compat's clip checks and broadcasts its bounds
    # on every call, about a sixth of a small layer's training step (C = 64, batch 4, NumPy)
    return xp.minimum(xp.maximum(a, xp.full_like(a, lo)), xp.full_like(a, hi))


@dataclass(frozen=True)
class _Corrections:
    """What a renorm training forward leaves its backward beside BatchNorm's saved statistics."""

    r: Array
    d: Array


class BatchRenorm(BatchNorm):
    """Batch renormalization over every axis but the channel axis ``axis``.

    Training normalizes with the batch statistics corrected by the clipped ratios r and d to the
    running statistics (see :mod:`xbn.renorm`); eval, frozen statistics, the running-statistics
    update (``momentum``, ``momentum=None``, unbiased variance), state_dict keys and every other
    part of the contract are :class:`xbn.BatchNorm`'s.

    Parameters
    ----------
    num_features
        C, the size of the channel axis.
    rmax
        r is clipped to [1/rmax, rmax]; finite, >= 1. Settable between steps.
    dmax
        d is clipped to [-dmax, dmax]; finite, >= 0. Settable between steps. The paper warms
        up from rmax = 1, dmax = 0 (batch norm) to its final values.
    axis, eps, momentum, affine, frozen, backend, device, dtype
        As for :class:`xbn.BatchNorm`.
    track_running_stats
        Must be True: the corrections are relative to the running statistics.
    virtual_batch_size
        Must be None: ghost batches are not combined with renorm (both treat small batches;
        see docs/variants.md).

    Examples
    --------
    >>> import numpy as np, xbn
    >>> bn = xbn.BatchRenorm(3, axis=-1, rmax=1.5, dmax=0.5, backend="numpy")
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, size=(8, 3)).astype(np.float32)
    >>> y = bn(x)                   # running stats 0 and 1: r = 1.5 and d = 0.5 on every channel
    >>> bool(np.allclose(y.mean(axis=0), 0.5, atol=1e-5))
    True
    >>> dx = bn.backward(np.ones_like(y))
    >>> bn.bias.grad.tolist(), bn.num_batches_tracked
    ([8.0, 8.0, 8.0], 1)
    """

    def __init__(
        self,
        num_features: int,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        axis: int = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        virtual_batch_size: int | None = None,
        frozen: bool = False,
        backend: Any = "auto",
        device: Any = None,
        dtype: Any = "float32",
    ) -> None:
        rmax, dmax = _check_rmax(rmax), _check_dmax(dmax)
        if not _arrays.check_bool("track_running_stats", track_running_stats):
            raise ValueError(
                "BatchRenorm needs running statistics (track_running_stats=True): r and d correct "
                "the batch statistics towards them"
            )
        _check_no_ghost(virtual_batch_size)
        super().__init__(
            num_features,
            axis=axis,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=True,
            virtual_batch_size=None,
            frozen=frozen,
            backend=backend,
            device=device,
            dtype=dtype,
        )
        self._rmax, self._dmax = rmax, dmax

    @property
    def rmax(self) -> float:
        """r is clipped to [1/rmax, rmax]."""
        return self._rmax

    @rmax.setter
    def rmax(self, value: float) -> None:
        self._rmax = _check_rmax(value)

    @property
    def dmax(self) -> float:
        """d is clipped to [-dmax, dmax]."""
        return self._dmax

    @dmax.setter
    def dmax(self, value: float) -> None:
        self._dmax = _check_dmax(value)

    @property
    def virtual_batch_size(self) -> None:
        """Always None: BatchRenorm does not split batches into ghost batches."""
        return None

    @virtual_batch_size.setter
    def virtual_batch_size(self, value: Any) -> None:
        _check_no_ghost(value)

    @property
    def _ops(self) -> Ops:
        backend = self._backend
        assert backend is not None  # a layer with arrays always has one
        return backend.ops

    def _train_forward(
        self, x: Array, w: Array | None, b: Array | None, *, axis: int, momentum: float, update: bool
    ) -> tuple[Array, Array, Array, Array | None, Array | None, Any]:
        xp, ops = self.xp, self._ops
        mean, var = ops.batch_stats(x, axis=axis)
        # r and d compare with the running statistics, which may be wider than the input
        cdt = xp.result_type(mean.dtype, self._dtype)
        mean, var = F._cast(mean, cdt, xp), F._cast(var, cdt, xp)
        inv = F.invstd(var, eps=self.eps, xp=xp)
        rm, rv = self.running_mean, self.running_var
        r, d = renorm_corrections(
            mean,
            var,
            F._cast(rm, cdt, xp),
            F._cast(rv, cdt, xp),
            eps=self.eps,
            rmax=self._rmax,
            dmax=self._dmax,
            xp=xp,
        )
        w_eff, b_eff = _effective_affine(w, b, r, d, xp)
        # var= keeps constant channels exact: there y is b_eff = beta + gamma * d
        y = F.normalize(x, mean, inv, w_eff, b_eff, axis=axis, var=var, xp=xp, ops=ops)
        new_mean = new_var = None
        if update:
            new_mean, new_var = F.updated_running_stats(
                rm,
                rv,
                mean,
                var,
                count=F.values_per_channel(tuple(x.shape), axis),
                momentum=momentum,
                xp=xp,
            )
        return y, mean, inv, new_mean, new_var, _Corrections(r, d)

    def _train_backward(self, dy: Array, saved: SavedForward) -> tuple[Array, Array | None, Array | None]:
        c = saved.extra
        if not isinstance(c, _Corrections):  # pragma: no cover - every renorm training forward saves them
            raise TypeError("BatchRenorm's backward needs the r and d of its forward")
        xp = self.xp
        w = saved.weight
        w_eff = c.r if w is None else F._cast(w, c.r.dtype, xp) * c.r
        # r and d are constants: dx is BatchNorm's with the weight gamma * r
        dx, dgamma_hat, dbeta = self._ops.batch_norm_backward(
            dy,
            saved.x,
            saved.mean,
            saved.invstd,
            w_eff,
            axis=saved.axis,
            batch_stats_used=True,
            need_param_grads=self.affine,
        )
        if dgamma_hat is None or dbeta is None:
            return dx, None, None
        # y = gamma * (x_hat * r + d) + beta: dgamma = r * sum(dy * x_hat) + d * sum(dy)
        return dx, c.r * dgamma_hat + c.d * dbeta, dbeta

    def extra_repr(self) -> str:
        base = super().extra_repr()
        head, _, backend = base.rpartition(", backend=")
        return f"{head}, rmax={self._rmax}, dmax={self._dmax}, backend={backend}"


def _effective_affine(w: Array | None, b: Array | None, r: Array, d: Array, xp: Any) -> tuple[Array, Array]:
    """(gamma * r, beta + gamma * d): renorm's step as BatchNorm's affine map."""
    if w is None:
        w_eff, b_eff = r, d
    else:
        wc = F._cast(w, r.dtype, xp)
        w_eff, b_eff = wc * r, wc * d
    if b is not None:
        b_eff = F._cast(b, r.dtype, xp) + b_eff
    return w_eff, b_eff


def _check_no_ghost(virtual_batch_size: Any) -> None:
    if virtual_batch_size is not None:
        raise ValueError(
            "BatchRenorm does not take virtual_batch_size: renorm already corrects small-batch "
            "statistics towards the running ones; use BatchNorm(virtual_batch_size=...) for ghost "
            f"batches (got virtual_batch_size={virtual_batch_size!r})"
        )


class _BatchRenormNd(BatchRenorm):
    """Channel axis 1, with the ranks of BatchNorm1d/2d/3d."""

    def __init__(
        self,
        num_features: int,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        virtual_batch_size: int | None = None,
        frozen: bool = False,
        backend: Any = "auto",
        device: Any = None,
        dtype: Any = "float32",
    ) -> None:
        super().__init__(
            num_features,
            rmax=rmax,
            dmax=dmax,
            axis=1,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            virtual_batch_size=virtual_batch_size,
            frozen=frozen,
            backend=backend,
            device=device,
            dtype=dtype,
        )


class BatchRenorm1d(_BatchRenormNd):
    """Batch renormalization over (N, C) or (N, C, L) inputs, channel axis 1."""

    _valid_ndims = (2, 3)


class BatchRenorm2d(_BatchRenormNd):
    """Batch renormalization over (N, C, H, W) inputs, channel axis 1."""

    _valid_ndims = (4,)


class BatchRenorm3d(_BatchRenormNd):
    """Batch renormalization over (N, C, D, H, W) inputs, channel axis 1."""

    _valid_ndims = (5,)
