"""Small array helpers shared by the modules: argument checks, host copies and device moves.

Every check here only reads its arguments, so a module can run all of them before it changes
any state (the validate-then-mutate rule).
"""

from __future__ import annotations

import numbers
from typing import Any

import array_api_compat
import numpy as np

from .backends import Backend

Array = Any

# A state value is exported as a 0-d int64 array (torch's num_batches_tracked), so a counter must
# fit in int64.
INT64_MAX = 2**63 - 1


def is_real(v: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def is_int(v: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def check_rng(rng: Any, seed: int | None) -> np.random.Generator:
    """The generator initial weights come from: ``rng``, or a new one from ``seed`` (not both)."""
    if rng is not None and seed is not None:
        raise ValueError("give rng or seed, not both")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return np.random.default_rng(seed) if rng is None else rng


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_positive_int(name: str, value: Any) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def check_training_flag(training: Any, default: bool) -> bool:
    """``training`` of a forward call: None means the module's mode."""
    if training is None:
        return default
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be a bool or None, got {type(training).__name__}")
    return bool(training)


def array_namespace(x: Any) -> Any:
    return array_api_compat.array_namespace(x)


def device(x: Any) -> Any:
    return array_api_compat.device(x)


def detach(a: Array) -> Array:
    """``a`` cut from any autograd graph (torch tensors); other arrays as they are.

    State (running statistics, gradients) must never join a graph: it would grow with every call.
    """
    cut = getattr(a, "detach", None)
    return cut() if callable(cut) else a


def describe(x: Any) -> str:
    """A short description of an input for error messages: type, and shape/dtype when it has them."""
    t = f"{type(x).__module__}.{type(x).__qualname__}"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{t} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return t


def check_array(backend: Backend, x: Any, what: str) -> Array:
    """``x`` must be an array of ``backend``'s namespace, on its device; returns it as a plain array.

    An ndarray subclass (a memmap, a masked array) is computed on as the plain ndarray it views,
    so the subclass's behaviour (a mask, which is ignored as ``np.asarray`` ignores it) never
    reaches the layer's state.
    """
    if not backend.owns(x):
        raise TypeError(
            f"{what} must be an array of the layer's backend {backend.name!r}, got {describe(x)}; "
            f"move it first (e.g. xp.asarray or the layer's .to())"
        )
    dev = array_api_compat.device(x)
    if dev != backend.device:
        raise TypeError(f"{what} is on device {dev!r}, but the layer lives on device {backend.device!r}")
    if isinstance(x, np.ndarray) and type(x) is not np.ndarray:
        return x.view(np.ndarray)
    return x


def check_like(dy: Any, x: Any, what: str = "dy") -> None:
    """``dy`` must have the shape and dtype of the forward input ``x``."""
    if tuple(dy.shape) == tuple(x.shape) and dy.dtype == x.dtype:
        return
    hint = ""
    if (
        tuple(dy.shape) == tuple(x.shape)
        and isinstance(dy.dtype, np.dtype)
        and isinstance(x.dtype, np.dtype)
        and dy.dtype.newbyteorder("=") == x.dtype.newbyteorder("=")
    ):
        hint = " (only the byte order differs: convert with .astype(x.dtype))"
    raise ValueError(
        f"{what} must match the forward input: expected shape {tuple(x.shape)} and dtype "
        f"{x.dtype}, got shape {tuple(dy.shape)} and dtype {dy.dtype}{hint}"
    )


def param_dtype(backend: Backend, dtype: Any) -> Any:
    """The backend's dtype object for ``dtype`` (a name or a dtype); it must be real floating."""
    xp = backend.xp
    if isinstance(dtype, str):
        if not hasattr(xp, dtype):
            raise ValueError(f"dtype {dtype!r} is not a dtype of backend {backend.name!r}")
        dtype = getattr(xp, dtype)
    try:
        ok = xp.isdtype(dtype, "real floating")
    except Exception:
        ok = False
    if not ok:
        raise TypeError(f"dtype must be a real floating dtype such as 'float32', got {dtype!r}")
    return dtype


def dtype_name(xp: Any, dtype: Any) -> str:
    for name in ("float32", "float64", "float16", "bfloat16"):
        if getattr(xp, name, None) == dtype:
            return name
    return str(dtype)


def to_host(value: Any, key: str) -> np.ndarray:
    """A plain NumPy array with the values of ``value``, from any backend (NumPy, CuPy, torch,
    array-api-strict, a Python number).

    ndarray subclasses come back as plain arrays: a masked array's mask is dropped, as
    ``np.asarray`` drops it.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{key} must be an array, got bool")
    if isinstance(value, numbers.Number):
        return np.asarray(value)
    if not hasattr(value, "shape"):
        raise TypeError(f"{key} must be an array, got {type(value).__name__}")
    if isinstance(value, np.ndarray):
        return np.asarray(value.view(np.ndarray))
    if hasattr(value, "get") and type(value).__module__.startswith("cupy"):
        return np.asarray(value.get())
    if callable(getattr(value, "detach", None)):  # torch tensors that require grad (Parameters)
        value = value.detach()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            # NumPy has no bfloat16: DLPack refuses it. float32 holds every bfloat16 exactly.
            value = value.float()
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


def move_array(a: Array, target: Backend, dtype: Any) -> Array:
    """``a`` as an array of ``target``'s namespace on its device, by DLPack or a host copy."""
    xp = target.xp
    try:
        out = xp.from_dlpack(a, device=target.device, copy=True)
    except Exception:  # no DLPack path between these two (e.g. GPU to CPU): go through the host
        out = xp.asarray(to_host(a, "array"), device=target.device)
    return out if out.dtype == dtype else xp.astype(out, dtype)


def check_channels(
    x: Any, num_features: int, axis: int, valid_ndims: tuple[int, ...] | None, owner: str
) -> int:
    """Rank and channel count of a layer input; returns the channel axis as a non-negative index."""
    ndim, shape = x.ndim, tuple(x.shape)
    if valid_ndims is not None and ndim not in valid_ndims:
        expected = " or ".join(f"{n}-D" for n in valid_ndims) + " input"
        raise ValueError(f"{owner} expected {expected}, got {ndim}-D input of shape {shape}")
    if ndim < 2:
        raise ValueError(f"expected input of rank >= 2, got {ndim}-D input of shape {shape}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"channel axis {axis} is out of range for {ndim}-D input of shape {shape}")
    if shape[axis % ndim] != num_features:
        raise ValueError(
            f"expected {num_features} channels on axis {axis}, got {shape[axis % ndim]} (input shape {shape})"
        )
    return axis % ndim
