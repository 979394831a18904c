"""Batch normalization layers: state, mode, validation and orchestration.

The math lives in :mod:`xbn.functional`; the backend (namespace, device, fast paths) is chosen
once in the constructor by :func:`xbn.backends.resolve`. Every check runs before any state
changes, and the running statistics are replaced only after the whole forward succeeded, so an
exception leaves parameters, running statistics and ``num_batches_tracked`` as they were.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import array_api_compat
import numpy as np

from . import functional as F
from .backends import Backend, resolve

Array = Any

__all__ = [
    "Parameter",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BackwardBeforeForwardError",
]


class BackwardBeforeForwardError(RuntimeError, ValueError):
    """``backward`` was called with no forward before it (a RuntimeError and a ValueError)."""


class Parameter:
    """A learnable array ``data`` and its gradient ``grad`` (None until a backward fills it)."""

    __slots__ = ("data", "grad")

    def __init__(self, data: Array) -> None:
        self.data = data
        self.grad: Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.data.dtype}, grad={'set' if self.grad is not None else None})"


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _describe(x: Any) -> str:
    """A short description of an input for error messages: type, and shape/dtype when it has them."""
    t = f"{type(x).__module__}.{type(x).__qualname__}"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{t} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return t


class BatchNorm:
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

    def __init__(
        self,
        num_features: int,
        *,
        axis: int = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        backend: Any = "auto",
        device: Any = None,
        dtype: Any = "float32",
    ) -> None:
        if not isinstance(num_features, numbers.Integral) or isinstance(num_features, bool):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
        if num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features}")
        if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        if not _is_real(eps):
            raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        if momentum is not None:
            if not _is_real(momentum):
                raise TypeError(f"momentum must be a real number or None, got {type(momentum).__name__}")
            if not 0.0 <= momentum <= 1.0:
                raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        for flag, value in (("affine", affine), ("track_running_stats", track_running_stats)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")

        self._backend: Backend = resolve(backend, device)
        xp = self._backend.xp
        self._dtype = self._param_dtype(dtype)
        self.num_features = int(num_features)
        self.axis = int(axis)
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.training = True

        c, dev, dt = self.num_features, self._backend.device, self._dtype
        self.weight: Parameter | None = Parameter(xp.ones((c,), dtype=dt, device=dev)) if affine else None
        self.bias: Parameter | None = Parameter(xp.zeros((c,), dtype=dt, device=dev)) if affine else None
        self.running_mean: Array | None = None
        self.running_var: Array | None = None
        self.num_batches_tracked: int = 0
        if self.track_running_stats:
            self.running_mean = xp.zeros((c,), dtype=dt, device=dev)
            self.running_var = xp.ones((c,), dtype=dt, device=dev)
        # (x, mean, invstd, weight, batch_stats_used, axis) of the last forward
        self._cache: tuple[Any, ...] | None = None

    # -- backend ---------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The backend's name: "numpy", "cupy", "torch", "array_api_strict", ..."""
        return self._backend.name

    @property
    def xp(self) -> Any:
        """The layer's array namespace (array-api-compat's wrapper where there is one)."""
        return self._backend.xp

    @property
    def device(self) -> Any:
        return self._backend.device

    @property
    def dtype(self) -> Any:
        """dtype of the parameters and running statistics."""
        return self._dtype

    def _param_dtype(self, dtype: Any) -> Any:
        xp = self._backend.xp
        if isinstance(dtype, str):
            if not hasattr(xp, dtype):
                raise ValueError(f"dtype {dtype!r} is not a dtype of backend {self._backend.name!r}")
            dtype = getattr(xp, dtype)
        try:
            ok = xp.isdtype(dtype, "real floating")
        except Exception:
            ok = False
        if not ok:
            raise TypeError(f"dtype must be a real floating dtype such as 'float32', got {dtype!r}")
        return dtype

    # -- mode and parameters ---------------------------------------------------------------

    @property
    def gamma(self) -> Parameter | None:
        """The same object as ``weight``."""
        return self.weight

    @property
    def beta(self) -> Parameter | None:
        """The same object as ``bias``."""
        return self.bias

    def train(self, mode: bool = True) -> BatchNorm:
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"mode must be a bool, got {type(mode).__name__}")
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        return self.train(False)

    def parameters(self) -> list[Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # -- validation ------------------------------------------------------------------------

    def _expected_rank(self) -> str:
        if self._valid_ndims is None:
            return "rank >= 2"
        return " or ".join(f"{n}-D" for n in self._valid_ndims) + " input"

    def _check_array(self, x: Any, what: str) -> None:
        b = self._backend
        if not b.owns(x):
            raise TypeError(
                f"{what} must be an array of the layer's backend {b.name!r}, got {_describe(x)}; "
                f"move it first (e.g. xp.asarray or the layer's .to())"
            )
        dev = array_api_compat.device(x)
        if dev != b.device:
            raise TypeError(f"{what} is on device {dev!r}, but the layer lives on device {b.device!r}")

    def _check_input(self, x: Any) -> int:
        """Validate a forward input; return the channel axis as a non-negative index."""
        self._check_array(x, "input")
        xp = self._backend.xp
        if not xp.isdtype(x.dtype, "real floating"):
            raise TypeError(f"input must have a real floating dtype, got {x.dtype}")
        ndim = x.ndim
        if self._valid_ndims is not None and ndim not in self._valid_ndims:
            raise ValueError(
                f"{type(self).__name__} expected {self._expected_rank()}, "
                f"got {ndim}-D input of shape {tuple(x.shape)}"
            )
        if ndim < 2:
            raise ValueError(f"expected input of rank >= 2, got {ndim}-D input of shape {tuple(x.shape)}")
        if not -ndim <= self.axis < ndim:
            raise ValueError(
                f"channel axis {self.axis} is out of range for {ndim}-D input of shape {tuple(x.shape)}"
            )
        axis = self.axis % ndim
        if x.shape[axis] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels on axis {self.axis}, "
                f"got {x.shape[axis]} (input shape {tuple(x.shape)})"
            )
        return axis

    # -- forward and backward --------------------------------------------------------------

    def __call__(self, x: Array, training: bool | None = None) -> Array:
        return self.forward(x, training=training)

    def forward(self, x: Array, training: bool | None = None) -> Array:
        """Normalize ``x``; ``training`` overrides ``self.training`` for this call."""
        if training is None:
            training = self.training
        elif not isinstance(training, (bool, np.bool_)):
            raise TypeError(f"training must be a bool or None, got {type(training).__name__}")
        training = bool(training)
        axis = self._check_input(x)
        xp, ops = self._backend.xp, self._backend.ops
        use_batch_stats = training or self.running_mean is None
        count = F.values_per_channel(tuple(x.shape), axis)
        if use_batch_stats and count == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
            )
        w = self.weight.data if self.weight is not None else None
        b = self.bias.data if self.bias is not None else None

        if count == 0:
            # An empty batch has no statistics: return an empty output and change no state.
            self._cache = (x, None, None, w, use_batch_stats, axis)
            return xp.empty_like(x)

        update = training and self.running_mean is not None
        if use_batch_stats:
            nbt = self.num_batches_tracked + 1
            m = 1.0 / nbt if self.momentum is None else self.momentum
            y, mean, inv, new_mean, new_var = ops.batch_norm_forward(
                x, w, b, self.running_mean if update else None,
                self.running_var if update else None, axis=axis, eps=self.eps, momentum=m,
            )
            if update:  # last, after everything succeeded
                self.running_mean, self.running_var = new_mean, new_var
                self.num_batches_tracked = nbt
        else:
            cdt = xp.result_type(F.compute_dtype(x.dtype, xp=xp), self._dtype)
            mean = xp.astype(self.running_mean, cdt)
            inv = F.invstd(xp.astype(self.running_var, cdt), eps=self.eps, xp=xp)
            # no var=: running statistics mark no constant channel, x need not equal their mean
            y = F.normalize(x, mean, inv, w, b, axis=axis, xp=xp, ops=ops)
        self._cache = (x, mean, inv, w, use_batch_stats, axis)
        return y

    def backward(self, dy: Array) -> Array:
        """Gradient of the last forward: returns dx and adds dgamma, dbeta to the grads.

        Gradients accumulate into ``weight.grad`` and ``bias.grad`` as in PyTorch; clear them
        with the optimizer's ``zero_grad()`` between steps.
        """
        if self._cache is None:
            raise BackwardBeforeForwardError("backward() needs a preceding forward(); none was run")
        x, mean, inv, w, use_batch_stats, axis = self._cache
        self._check_array(dy, "dy")
        if tuple(dy.shape) != tuple(x.shape) or dy.dtype != x.dtype:
            raise ValueError(
                f"dy must match the forward input: expected shape {tuple(x.shape)} and dtype "
                f"{x.dtype}, got shape {tuple(dy.shape)} and dtype {dy.dtype}"
            )
        xp = self._backend.xp
        if mean is None:  # empty batch
            dx = xp.empty_like(dy)
            zeros = xp.zeros((self.num_features,), dtype=self._dtype, device=self._backend.device)
            dgamma, dbeta = zeros, zeros
        else:
            dx, dgamma, dbeta = self._backend.ops.batch_norm_backward(
                dy, x, mean, inv, w, axis=axis, batch_stats_used=use_batch_stats,
                need_param_grads=self.affine,
            )
        if self.weight is not None and self.bias is not None:
            for p, g in ((self.weight, dgamma), (self.bias, dbeta)):
                g = g if g.dtype == self._dtype else xp.astype(g, self._dtype)
                p.grad = g if p.grad is None else p.grad + g
        return dx

    def to(self, backend: Any = None, device: Any = None) -> BatchNorm:
        """Move every parameter, gradient and buffer to ``backend`` / ``device``; returns self.

        Arrays cross by DLPack where the two sides support it and through a NumPy host copy
        otherwise. The cached forward is dropped: a backward must follow a new forward.
        """
        target = resolve(self._backend if backend is None else backend, device)
        name = _dtype_name(self._backend.xp, self._dtype)
        dtype = getattr(target.xp, name, None)
        if dtype is None:
            raise ValueError(f"backend {target.name!r} has no dtype {name}")

        def move(a: Array | None) -> Array | None:
            return None if a is None else _move_array(a, target, dtype)

        moved = {
            "running_mean": move(self.running_mean),
            "running_var": move(self.running_var),
            **{f"{n}.{f}": move(getattr(getattr(self, n), f))
               for n in ("weight", "bias") if getattr(self, n) is not None for f in ("data", "grad")},
        }
        self._backend, self._dtype, self._cache = target, dtype, None
        self.running_mean, self.running_var = moved["running_mean"], moved["running_var"]
        for n in ("weight", "bias"):
            p = getattr(self, n)
            if p is not None:
                p.data, p.grad = moved[f"{n}.data"], moved[f"{n}.grad"]
        return self

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Array]:
        """Copies of the state under PyTorch's keys (``num_batches_tracked`` a 0-d int64 array)."""
        xp, dev = self._backend.xp, self._backend.device
        sd: dict[str, Array] = {}
        if self.weight is not None and self.bias is not None:
            sd["weight"] = xp.asarray(self.weight.data, copy=True)
            sd["bias"] = xp.asarray(self.bias.data, copy=True)
        if self.running_mean is not None:
            sd["running_mean"] = xp.asarray(self.running_mean, copy=True)
            sd["running_var"] = xp.asarray(self.running_var, copy=True)
            sd["num_batches_tracked"] = xp.asarray(self.num_batches_tracked, dtype=xp.int64, device=dev)
        return sd

    def _state_keys(self) -> list[str]:
        keys = ["weight", "bias"] if self.affine else []
        if self.track_running_stats:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load state from arrays of any backend; everything is validated before anything changes."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        expected = self._state_keys()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing or unexpected:
            raise ValueError(
                f"state_dict keys do not match: expected {expected}; "
                f"missing {missing}, unexpected {unexpected}"
            )
        new: dict[str, Any] = {}
        for key in expected:
            host = _to_host(state_dict[key], key)
            if key == "num_batches_tracked":
                if host.shape != () or host.dtype.kind not in "iu":
                    raise ValueError(
                        f"num_batches_tracked must be a 0-d integer array or int, got shape "
                        f"{host.shape} and dtype {host.dtype}"
                    )
                if int(host) < 0:
                    raise ValueError(f"num_batches_tracked must be >= 0, got {int(host)}")
                new[key] = int(host)
                continue
            if host.dtype.kind != "f":
                raise TypeError(f"{key} must have a real floating dtype, got {host.dtype}")
            if host.shape != (self.num_features,):
                raise ValueError(f"{key} must have shape ({self.num_features},), got {host.shape}")
            new[key] = host
        xp, dev, dt = self._backend.xp, self._backend.device, self._dtype
        # copy=True: the values may share memory with their source (torch's state_dict().numpy()
        # does), and an in-place update there must not reach into this layer.
        arrays = {
            k: xp.asarray(v, dtype=dt, device=dev, copy=True)
            for k, v in new.items() if k != "num_batches_tracked"
        }
        if self.affine:
            self.weight.data, self.bias.data = arrays["weight"], arrays["bias"]  # type: ignore[union-attr]
        if self.track_running_stats:
            self.running_mean, self.running_var = arrays["running_mean"], arrays["running_var"]
            self.num_batches_tracked = new["num_batches_tracked"]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.num_features}, axis={self.axis}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, backend={self.backend!r})"
        )


def _to_host(value: Any, key: str) -> np.ndarray:
    """A NumPy copy of a state value from any backend (NumPy, CuPy, torch, array-api-strict, int)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{key} must be an array, got bool")
    if isinstance(value, numbers.Number):
        return np.asarray(value)
    if not hasattr(value, "shape"):
        raise TypeError(f"{key} must be an array, got {type(value).__name__}")
    if hasattr(value, "get") and type(value).__module__.startswith("cupy"):
        return np.asarray(value.get())
    if callable(getattr(value, "detach", None)):  # torch tensors that require grad (Parameters)
        value = value.detach()
    try:
        return np.asarray(value)
    except Exception:
        pass
    try:  # other namespaces on a host device, e.g. array-api-strict (any of its devices)
        return np.from_dlpack(value)
    except Exception:
        pass
    try:  # device arrays that can move to "cpu" themselves, e.g. torch on CUDA
        return np.from_dlpack(array_api_compat.to_device(value, "cpu"))
    except Exception as e:
        raise TypeError(f"{key}: cannot read an array of type {type(value).__name__} ({e})") from e


def _dtype_name(xp: Any, dtype: Any) -> str:
    for name in ("float32", "float64", "float16", "bfloat16"):
        if getattr(xp, name, None) == dtype:
            return name
    return str(dtype)


def _move_array(a: Array, target: Backend, dtype: Any) -> Array:
    """``a`` as an array of ``target``'s namespace on its device, by DLPack or a host copy."""
    xp = target.xp
    try:
        out = xp.from_dlpack(a, device=target.device, copy=True)
    except Exception:  # no DLPack path between these two (e.g. GPU to CPU): go through the host
        out = xp.asarray(_to_host(a, "array"), device=target.device)
    return out if out.dtype == dtype else xp.astype(out, dtype)


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
        backend: Any = "auto",
        device: Any = None,
        dtype: Any = "float32",
    ) -> None:
        super().__init__(
            num_features, axis=1, eps=eps, momentum=momentum, affine=affine,
            track_running_stats=track_running_stats, backend=backend, device=device, dtype=dtype,
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
