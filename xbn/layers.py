"""Batch normalization layers: options, the forward/backward orchestration, the running statistics.

The math lives in :mod:`xbn.functional` (or a registered fast path, through ``backend.ops``);
parameters, buffers, state_dict, moves and copies come from :class:`xbn.Module`. Every check runs
before any state changes, and the running statistics are replaced only after the whole forward
succeeded, so an exception leaves parameters, running statistics and ``num_batches_tracked`` as
they were.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from . import _arrays, ghost
from . import functional as F
from .backends import Backend
from .module import BackwardBeforeForwardError, Module, Parameter

Array = Any

__all__ = [
    "Parameter",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BackwardBeforeForwardError",
]


@dataclass(frozen=True)
class SavedForward:
    """What a forward leaves for its backward: the input and the statistics it normalized with.

    ``mean`` and ``invstd`` are None for an empty batch. Not x_hat: O(C) extra memory.
    """

    x: Array
    mean: Array | None
    invstd: Array | None
    weight: Array | None
    batch_stats_used: bool
    axis: int
    #: what a variant's own backward needs beside these (ghost groups, renorm's r and d)
    extra: Any = None


@dataclass(frozen=True)
class _EvalStatistics:
    """The running statistics an eval-mode forward normalized with, as ``SavedForward.extra``.

    The forward's mean and invstd are computed from them by :meth:`resolve`, in a backward: an
    inference forward then costs no per-channel array operations of its own. (Running
    statistics are replaced by new arrays, never changed in place by xbn, so these stay the
    forward's, as PyTorch keeps them for its eval-mode backward.)
    """

    running_mean: Array
    running_var: Array
    eps: float

    def resolve(self, saved: SavedForward, xp: Any) -> SavedForward:
        mean, inv = F.eval_statistics(
            self.running_mean, self.running_var, dtype=saved.x.dtype, eps=self.eps, xp=xp
        )
        return dataclasses.replace(saved, mean=mean, invstd=inv, extra=None)


class BatchNorm(Module):
    """Batch normalization over every axis but the channel axis ``axis``, for inputs of rank >= 2.

    Semantics are PyTorch's ``BatchNorm{1,2,3}d``: training normalizes with the biased batch
    variance and moves the running variance towards the unbiased one; ``momentum=None`` keeps a
    cumulative average; with ``track_running_stats=False`` batch statistics are used in eval too.

    Parameters
    ----------
    num_features
        C, the size of the channel axis.
    axis
        The channel axis (1 for NCHW, -1 for channels-last).
    eps, momentum, affine, track_running_stats
        As in PyTorch.
    backend, device
        Where the layer lives: "auto" (CuPy with a usable GPU, else NumPy), "numpy", "cupy",
        "torch", "array_api_strict", an array namespace module, or an example array.
    dtype
        dtype of the parameters and running statistics.

    Examples
    --------
    >>> import numpy as np, xbn
    >>> bn = xbn.BatchNorm(3, axis=-1, backend="numpy")
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, size=(8, 4, 3)).astype(np.float32)
    >>> y = bn(x)
    >>> bool(np.allclose(y.mean(axis=(0, 1)), 0.0, atol=1e-5))
    True
    >>> dx = bn.backward(np.ones_like(y))
    >>> bn.weight.grad.shape, bn.num_batches_tracked
    ((3,), 1)
    """

    #: Input ranks the class accepts; None means any rank >= 2.
    _valid_ndims: tuple[int, ...] | None = None
    _backend: Backend  # always set: a BatchNorm owns arrays

    def __init__(
        self,
        num_features: int,
        *,
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
        super().__init__()
        num_features = _arrays.check_positive_int("num_features", num_features)
        if not _arrays.is_int(axis):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        if not _arrays.is_real(eps):
            raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        if momentum is not None:
            if not _arrays.is_real(momentum):
                raise TypeError(f"momentum must be a real number or None, got {type(momentum).__name__}")
            if not 0.0 <= momentum <= 1.0:
                raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        affine = _arrays.check_bool("affine", affine)
        track_running_stats = _arrays.check_bool("track_running_stats", track_running_stats)
        if virtual_batch_size is not None:
            virtual_batch_size = _arrays.check_positive_int("virtual_batch_size", virtual_batch_size)
            if axis == 0:
                raise ValueError("virtual_batch_size splits axis 0, so the channel axis cannot be 0")
        _check_frozen(frozen, track_running_stats)
        self._init_backend(backend, device, dtype)

        self.num_features = num_features
        self.axis = int(axis)
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.virtual_batch_size = virtual_batch_size
        self._frozen = bool(frozen)

        xp, c, dev, dt = self.xp, num_features, self.device, self._dtype
        self.register_parameter("weight", Parameter(xp.ones((c,), dtype=dt, device=dev)) if affine else None)
        self.register_parameter("bias", Parameter(xp.zeros((c,), dtype=dt, device=dev)) if affine else None)
        tracking = track_running_stats
        self.register_buffer("running_mean", xp.zeros((c,), dtype=dt, device=dev) if tracking else None)
        self.register_buffer("running_var", xp.ones((c,), dtype=dt, device=dev) if tracking else None)
        if tracking:
            self.register_buffer("num_batches_tracked", 0)
        else:  # no state_dict entry, as in torch; the attribute stays an int for the contract
            self.num_batches_tracked = 0

    @property
    def frozen(self) -> bool:
        """Normalize with the running statistics and never update them, in training mode too.

        For fine-tuning: gamma and beta still learn (with the eval-mode backward), and unlike
        ``eval()`` the setting survives a recursive ``model.train()``.
        """
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        _check_frozen(value, self.track_running_stats)
        self._frozen = bool(value)

    @property
    def gamma(self) -> Parameter | None:
        """The same object as ``weight``."""
        return self.weight

    @property
    def beta(self) -> Parameter | None:
        """The same object as ``bias``."""
        return self.bias

    # -- forward and backward --------------------------------------------------------------

    def forward(self, x: Array, training: bool | None = None) -> Array:
        """Normalize ``x``; ``training`` overrides ``self.training`` for this call."""
        call = self._check_forward(x, training)
        x, axis, xp = call.x, call.axis, self.xp
        w = self.weight.data if self.weight is not None else None
        b = self.bias.data if self.bias is not None else None

        if call.count == 0:
            # An empty batch has no statistics: return an empty output and change no state.
            self._save_for_backward(SavedForward(x, None, None, w, call.batch_stats, axis))
            return xp.empty_like(x)

        extra = None
        if call.batch_stats:
            nbt = self.num_batches_tracked + 1
            m = 1.0 / nbt if self.momentum is None else self.momentum
            y, mean, inv, new_mean, new_var, extra = self._train_forward(
                x, w, b, axis=axis, momentum=m, update=call.update
            )
            if call.update:  # last, after everything succeeded
                self.running_mean, self.running_var = _arrays.detach(new_mean), _arrays.detach(new_var)
                self.num_batches_tracked = nbt
        else:
            # One op (one launch on a GPU). The mean and invstd it normalized with are derived
            # from the running statistics only if a backward asks, which inference never does.
            rm, rv = self.running_mean, self.running_var
            y = self._backend.ops.batch_norm_inference(x, w, b, rm, rv, axis=axis, eps=self.eps)
            mean = inv = None
            extra = _EvalStatistics(rm, rv, self.eps)
        self._save_for_backward(SavedForward(x, mean, inv, w, call.batch_stats, axis, extra))
        return y

    def _check_forward(self, x: Array, training: bool | None, *, check_count: bool = True) -> ForwardCall:
        """Every check of a forward call, and what it decides; changes nothing.

        ``check_count=False`` leaves out the "more than one value per channel" check, for a
        layer whose statistics are taken over more than this input (SyncBatchNorm checks the
        count over all processes).
        """
        training = _arrays.check_training_flag(training, self.training)
        x = _arrays.check_array(self._backend, x, "input")
        if not self.xp.isdtype(x.dtype, "real floating"):
            raise TypeError(f"input must have a real floating dtype, got {x.dtype}")
        axis = _arrays.check_channels(x, self.num_features, self.axis, self._valid_ndims, type(self).__name__)
        batch_stats = (training and not self._frozen) or self.running_mean is None
        count = F.values_per_channel(tuple(x.shape), axis)
        if batch_stats and check_count:
            self._check_batch(tuple(x.shape), axis, count)
        return ForwardCall(
            x, axis, batch_stats, batch_stats and training and self.running_mean is not None, count
        )

    def _check_batch(self, shape: tuple[int, ...], axis: int, count: int) -> None:
        """The batch must give statistics: more than one value per channel (per ghost batch)."""
        vbs, note = self.virtual_batch_size, ""
        if vbs is not None and count > 0:
            if axis == 0:
                raise ValueError("virtual_batch_size splits axis 0, which is the channel axis here")
            smallest = shape[0] % vbs or min(vbs, shape[0])  # the last ghost batch may be smaller
            count = count // shape[0] * smallest
            note = f" (its smallest ghost batch has {smallest} of {shape[0]} samples)"
        if count == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {shape}{note}"
            )

    def _train_forward(
        self, x: Array, w: Array | None, b: Array | None, *, axis: int, momentum: float, update: bool
    ) -> tuple[Array, Array, Array, Array | None, Array | None, Any]:
        """Normalize with batch statistics: (y, mean, invstd, new running mean, var, extra).

        The one piece a variant replaces (ghost batches here; renorm, SyncBatchNorm elsewhere);
        ``extra`` goes to :meth:`_train_backward` in the saved forward.
        """
        vbs = self.virtual_batch_size
        if vbs is not None and x.shape[0] > vbs:
            return ghost.forward(
                x,
                w,
                b,
                self.running_mean if update else None,
                self.running_var if update else None,
                axis=axis,
                eps=self.eps,
                momentum=momentum,
                group=vbs,
                xp=self.xp,
            )
        y, mean, inv, new_mean, new_var = self._backend.ops.batch_norm_forward(
            x,
            w,
            b,
            self.running_mean if update else None,
            self.running_var if update else None,
            axis=axis,
            eps=self.eps,
            momentum=momentum,
        )
        return y, mean, inv, new_mean, new_var, None

    def _train_backward(self, dy: Array, saved: SavedForward) -> tuple[Array, Array | None, Array | None]:
        """(dx, dgamma, dbeta) of a forward that used batch statistics."""
        if isinstance(saved.extra, ghost.Groups):
            return ghost.backward(
                dy,
                saved.x,
                saved.mean,
                saved.invstd,
                saved.weight,
                axis=saved.axis,
                groups=saved.extra,
                xp=self.xp,
            )
        return self._ops_backward(dy, saved)

    def _ops_backward(self, dy: Array, saved: SavedForward) -> tuple[Array, Array | None, Array | None]:
        """The backend's whole backward of ``saved`` (batch or running statistics, as it used)."""
        return self._backend.ops.batch_norm_backward(
            dy,
            saved.x,
            saved.mean,
            saved.invstd,
            saved.weight,
            axis=saved.axis,
            batch_stats_used=saved.batch_stats_used,
            need_param_grads=self.affine,
        )

    def backward(self, dy: Array) -> Array:
        """Gradient of the last forward: returns dx and adds dgamma, dbeta to the grads.

        Gradients accumulate into ``weight.grad`` and ``bias.grad`` as in PyTorch; clear them
        with the optimizer's ``zero_grad()`` between steps. One backward per forward: a second
        one raises. A backward that fails validation keeps the forward for a corrected call.
        """
        saved: SavedForward = self._saved_for_backward()
        dy = _arrays.check_array(self._backend, dy, "dy")
        _arrays.check_like(dy, saved.x)
        xp = self.xp
        if isinstance(saved.extra, _EvalStatistics):
            saved = saved.extra.resolve(saved, xp)
        if saved.mean is None:  # empty batch: separate zeros, so the two grads never alias
            dx = xp.empty_like(dy)
            dgamma, dbeta = (
                xp.zeros((self.num_features,), dtype=self._dtype, device=self.device) for _ in range(2)
            )
        elif saved.batch_stats_used:
            dx, dgamma, dbeta = self._train_backward(dy, saved)
        else:
            dx, dgamma, dbeta = self._ops_backward(dy, saved)
        if self.weight is not None and self.bias is not None:
            self._accumulate_grad(self.weight, dgamma)
            self._accumulate_grad(self.bias, dbeta)
        self._release_saved()
        return dx

    def extra_repr(self) -> str:
        return f"{self.num_features}, {self._options_repr()}"

    def _options_repr(self) -> str:
        """The options, as the constructor takes them (a lazy layer prints no num_features)."""
        options = (
            f"axis={self.axis}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )
        if self.virtual_batch_size is not None:
            options += f", virtual_batch_size={self.virtual_batch_size}"
        if self._frozen:
            options += ", frozen=True"
        return options + f", backend={self.backend!r}"


@dataclass(frozen=True)
class ForwardCall:
    """What the checks of one forward call decided."""

    x: Array  # the input as a plain array of the backend
    axis: int  # channel axis, non-negative
    batch_stats: bool  # normalize with the batch's statistics (else the running ones)
    update: bool  # move the running statistics
    count: int  # values per channel


def _check_frozen(frozen: Any, track_running_stats: bool) -> None:
    if _arrays.check_bool("frozen", frozen) and not track_running_stats:
        raise ValueError("frozen=True needs running statistics (track_running_stats=True)")


class _BatchNormNd(BatchNorm):
    """Channel axis 1, with the ranks of PyTorch's BatchNorm1d/2d/3d."""

    def __init__(
        self,
        num_features: int,
        *,
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


class BatchNorm1d(_BatchNormNd):
    """Batch norm over (N, C) or (N, C, L) inputs, channel axis 1."""

    _valid_ndims = (2, 3)


class BatchNorm2d(_BatchNormNd):
    """Batch norm over (N, C, H, W) inputs, channel axis 1."""

    _valid_ndims = (4,)


class BatchNorm3d(_BatchNormNd):
    """Batch norm over (N, C, D, H, W) inputs, channel axis 1."""

    _valid_ndims = (5,)
