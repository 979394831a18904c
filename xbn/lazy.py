"""Lazy batch norm: ``num_features`` comes from the first input, as in ``torch.nn.LazyBatchNorm*d``.

Before its first input a lazy layer has options but no arrays. xbn has no uninitialized-parameter
type, so whatever would hand out those arrays says so instead: ``parameters()``,
``named_parameters()``, ``named_buffers()``, ``state_dict()`` and the attributes ``weight``,
``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked`` raise
:class:`UninitializedError`, which asks for one forward first (so does ``xbn.optim.SGD`` built
on ``parameters()``). ``load_state_dict`` before the first input takes C from the state.

The first forward (or load) builds the equivalent layer -- ``LazyBatchNorm1d`` becomes a
``BatchNorm1d`` with the same options, backend, dtype and mode -- and the lazy object turns into
it, class included, as torch's ``cls_to_become`` does. From then on it *is* that BatchNorm. The
layer is built and run aside first, so a first forward that fails (bad input) leaves the object
lazy and unchanged.

Examples
--------
>>> import numpy as np, xbn
>>> bn = xbn.LazyBatchNorm1d(backend="numpy")
>>> bn
LazyBatchNorm1d(axis=1, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, backend='numpy')
>>> bn.parameters()  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
xbn.lazy.UninitializedError: LazyBatchNorm1d has no parameters before its first input ...
>>> y = bn(np.ones((4, 3), dtype=np.float32))
>>> type(bn).__name__, bn.num_features, [p.shape for p in bn.parameters()]
('BatchNorm1d', 3, [(3,), (3,)])
"""

from __future__ import annotations

from typing import Any, ClassVar

from . import _arrays
from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .module import Module

Array = Any

__all__ = ["LazyBatchNorm", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d", "UninitializedError"]

#: The names that only exist once C is known (gamma and beta are weight and bias).
_STATE = ("weight", "bias", "gamma", "beta", "running_mean", "running_var", "num_batches_tracked")


class UninitializedError(RuntimeError, ValueError):
    """A lazy layer was asked for arrays it does not have before its first input.

    Both a RuntimeError and a ValueError (torch raises ValueError for an uninitialized parameter).
    """


class LazyBatchNorm(BatchNorm):
    """:class:`xbn.BatchNorm` whose ``num_features`` is the size of the first input's channel axis.

    Parameters
    ----------
    axis, eps, momentum, affine, track_running_stats, virtual_batch_size, frozen, backend, device, dtype
        As for :class:`xbn.BatchNorm`, checked here, when the layer is made.

    Examples
    --------
    >>> import numpy as np, xbn
    >>> bn = xbn.LazyBatchNorm(axis=-1, backend="numpy").eval()
    >>> y = bn(np.zeros((2, 5, 4), dtype=np.float32))
    >>> bn
    BatchNorm(4, axis=-1, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, backend='numpy')
    >>> bn.training, bn.num_batches_tracked
    (False, 0)
    """

    #: The class the layer turns into when C is known.
    cls_to_become: ClassVar[type[BatchNorm]] = BatchNorm
    #: Whether ``cls_to_become`` takes ``axis`` (BatchNorm1d/2d/3d fix it to 1).
    _takes_axis: ClassVar[bool] = True

    def __init__(
        self,
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
        # BatchNorm's own checks on a one-channel stand-in: the options are validated exactly as
        # they will be when the real layer is built. Its arrays are then dropped.
        super().__init__(
            1,
            axis=axis,
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
        d = self.__dict__
        d["_parameters"].clear()
        d["_buffers"].clear()
        d.pop("num_batches_tracked", None)
        d["num_features"] = None
        d["_pending"] = None

    # -- becoming the real layer -------------------------------------------------------------

    def _build(self, num_features: int) -> BatchNorm:
        """The equivalent layer with C = ``num_features``, from the current options; self unchanged."""
        cls = self.cls_to_become
        options: dict[str, Any] = dict(
            eps=self.eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track_running_stats,
            virtual_batch_size=self.virtual_batch_size,
            frozen=self.frozen,
            backend=self._backend,
            dtype=self._dtype,
        )
        if self._takes_axis:
            options["axis"] = self.axis
        layer = cls(num_features, **options)
        layer.train(self.training)
        return layer

    def _become(self, layer: BatchNorm) -> None:
        """Take over ``layer``'s registries and state, and its class."""
        d = self.__dict__
        d.pop("_pending", None)
        d.update(layer.__dict__)
        object.__setattr__(self, "__class__", type(layer))

    def _channels_of(self, x: Array) -> tuple[Array, int]:
        """The input as a plain array and its channel count; the checks a BatchNorm would make
        before it compares the channel count."""
        backend = self._backend
        assert backend is not None  # a BatchNorm always has one
        x = _arrays.check_array(backend, x, "input")
        shape, axis = tuple(x.shape), self.axis
        in_range = x.ndim >= 2 and -x.ndim <= axis < x.ndim
        c = shape[axis] if in_range else 1
        # rank and axis errors, worded as BatchNorm words them
        _arrays.check_channels(x, c, axis, self._valid_ndims, type(self).__name__)
        if c == 0:
            raise ValueError(
                f"{type(self).__name__} takes num_features from axis {axis} of its first input, "
                f"which has size 0 (input shape {shape})"
            )
        return x, c

    def forward(self, x: Array, training: bool | None = None) -> Array:
        """Build the layer for ``x``'s channel count, run it, and become it if that succeeded."""
        _arrays.check_training_flag(training, self.training)
        x, c = self._channels_of(x)
        layer = self._build(c)
        y = layer.forward(x, training)  # every other check; a failure leaves self lazy
        self._become(layer)
        return y

    # -- what does not exist yet ----------------------------------------------------------------

    def _uninitialized(self, what: str) -> UninitializedError:
        return UninitializedError(
            f"{type(self).__name__} has no {what} before its first input (num_features comes "
            "from it): run one forward first, or load a state_dict"
        )

    def __getattr__(self, name: str) -> Any:
        if name in _STATE:
            raise _UninitializedAttribute(str(self._uninitialized(name)))
        return super().__getattr__(name)

    def _check_ready(self, what: str) -> None:
        # Module asks every module of a tree, so a model's parameters() raises here too.
        raise self._uninitialized(what)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear before the first input."""
        _arrays.check_bool("set_to_none", set_to_none)

    # -- state: none to give, C to take ---------------------------------------------------------

    def _state_names(self) -> list[str]:
        # Module.load_state_dict lists every module's names before it converts anything, so the
        # C seen by a previous, failed load is forgotten here.
        self.__dict__["_pending"] = None
        names = ["weight", "bias"] if self.affine else []
        return names + (
            ["running_mean", "running_var", "num_batches_tracked"] if self.track_running_stats else []
        )

    def _state_value(self, name: str) -> Any:
        raise self._uninitialized("state to save")

    def _convert_state(self, name: str, value: Any, key: str) -> Any:
        """``value`` converted as the layer with C from the state would convert it.

        The first per-channel entry gives C; the others are checked against that layer. Only
        the scratch ``_pending`` changes: the layer itself stays lazy until assignment.
        """
        pending = self.__dict__.get("_pending")
        if pending is None:
            if name == "num_batches_tracked":
                raise ValueError(
                    f"{key}: {type(self).__name__} takes num_features from a per-channel entry "
                    "(weight, bias, running_mean, running_var), and the state has none before it"
                )
            host = _arrays.to_host(value, key)
            if host.ndim != 1 or host.shape[0] < 1:
                raise ValueError(
                    f"{key} must be a 1-D array with one value per channel, got shape {host.shape}"
                )
            pending = self._build(int(host.shape[0]))
            self.__dict__["_pending"] = pending
        return pending._convert_state(name, value, key)

    def _assign_state(self, name: str, value: Any) -> None:
        pending = self.__dict__.get("_pending")
        if pending is None:  # pragma: no cover - Module.load_state_dict converts before it assigns
            raise RuntimeError("load_state_dict assigned a value it had not converted")
        self._become(pending)
        Module._assign_state(self, name, value)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_pending"] = None  # scratch of a load, not state
        return state

    def extra_repr(self) -> str:
        return self._options_repr()


class _UninitializedAttribute(UninitializedError, AttributeError):
    """An attribute a lazy layer gets from its first input: hasattr() is False, the message says why."""


class _LazyBatchNormNd(LazyBatchNorm):
    _takes_axis = False

    def __init__(
        self,
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


class LazyBatchNorm1d(_LazyBatchNormNd):
    """A :class:`xbn.BatchNorm1d` with C from the first (N, C) or (N, C, L) input."""

    cls_to_become = BatchNorm1d
    _valid_ndims = (2, 3)


class LazyBatchNorm2d(_LazyBatchNormNd):
    """A :class:`xbn.BatchNorm2d` with C from the first (N, C, H, W) input."""

    cls_to_become = BatchNorm2d
    _valid_ndims = (4,)


class LazyBatchNorm3d(_LazyBatchNormNd):
    """A :class:`xbn.BatchNorm3d` with C from the first (N, C, D, H, W) input."""

    cls_to_become = BatchNorm3d
    _valid_ndims = (5,)
