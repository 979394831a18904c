"""Choose the array backend once, when a layer is constructed, and find its fast paths.

A :class:`Backend` bundles the array namespace (through array-api-compat), the device the layer
lives on, and :class:`Ops`: the four hot operations of batch norm. Each op is the generic
Array API function from :mod:`xbn.functional`, unless a kernel module registered a fast path
for that backend (``xbn.kernels.<backend name>``). The registry below is the only seam where
fast paths plug in, so nothing on the hot path asks which backend it runs on.

Setting the environment variable ``XBN_FORCE_GENERIC=1`` (or ``resolve(..., generic=True)``)
skips every registered kernel: the way to A/B a fast path or to rule it out while debugging.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import array_api_compat

from . import functional

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "Ops",
    "OP_NAMES",
    "PASS_OPS",
    "STEP_OPS",
    "available_backends",
    "register_kernel",
    "registered_kernels",
    "resolve",
]

#: The operations a fast path may replace; each has the signature of the function of the same
#: name in :mod:`xbn.functional` (arrays positional, ``axis=`` and ``xp=`` keyword).
#: The first four are single passes over the data; the last two are a whole training forward
#: and a whole backward, which the generic path composes from the first four (given as
#: ``ops=``). A backend registers the whole-step ops where fusing the per-channel work into its
#: passes pays (on a GPU every small per-channel array operation is a kernel launch).
PASS_OPS = ("batch_stats", "scale_shift", "backward_reduce", "backward_apply")
STEP_OPS = ("batch_norm_forward", "batch_norm_backward")
OP_NAMES = PASS_OPS + STEP_OPS

KNOWN_BACKENDS = ("numpy", "cupy", "torch", "array_api_strict")

_KERNELS: dict[str, dict[str, Callable[..., Any]]] = {}
_KERNEL_MODULES_LOADED: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """A known backend that cannot run here (library not installed, or no device)."""


def register_kernel(backend: str, op: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as the fast path of ``op`` on ``backend``.

    The function must accept exactly what ``xbn.functional.<op>`` accepts and return the same
    results (within the dtype's tolerance); it may call the generic function itself for inputs
    it does not handle (another layout, another dtype).
    """
    if op not in OP_NAMES:
        raise ValueError(f"unknown op {op!r}; expected one of {OP_NAMES}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        _KERNELS.setdefault(backend, {})[op] = fn
        return fn

    return decorate


def registered_kernels(backend: str) -> dict[str, Callable[..., Any]]:
    """The fast paths registered for ``backend`` (importing ``xbn.kernels.<backend>`` once)."""
    if backend not in _KERNEL_MODULES_LOADED:
        _KERNEL_MODULES_LOADED.add(backend)
        try:
            importlib.import_module(f"xbn.kernels.{backend}")
        except ModuleNotFoundError as e:
            if e.name != f"xbn.kernels.{backend}":
                raise
    return dict(_KERNELS.get(backend, {}))


@dataclass(frozen=True)
class PassOps:
    """The single-pass operations bound to one namespace (fast path where registered)."""

    batch_stats: Callable[..., Any]
    scale_shift: Callable[..., Any]
    backward_reduce: Callable[..., Any]
    backward_apply: Callable[..., Any]


@dataclass(frozen=True)
class Ops(PassOps):
    """Every hot operation bound to one namespace: a fast path where registered, else generic.

    The whole-step ops receive the pass ops as ``ops=``: the generic ones compose them, and a
    fast one falls back to the generic composition for inputs it does not take.
    """

    batch_norm_forward: Callable[..., Any] = None  # type: ignore[assignment]
    batch_norm_backward: Callable[..., Any] = None  # type: ignore[assignment]
    fast: tuple[str, ...] = ()

    @classmethod
    def build(cls, name: str, xp: ModuleType, *, generic: bool) -> Ops:
        kernels = {} if generic else registered_kernels(name)

        def pick(op: str, **bound: Any) -> Callable[..., Any]:
            return functools.partial(kernels.get(op, getattr(functional, op)), xp=xp, **bound)

        passes = {op: pick(op) for op in PASS_OPS}
        steps = {op: pick(op, ops=PassOps(**passes)) for op in STEP_OPS}
        return cls(**passes, **steps, fast=tuple(sorted(kernels)))


@dataclass(frozen=True)
class Backend:
    """Where a layer lives: ``name`` ("numpy", "cupy", ...), namespace ``xp``, ``device``, ``ops``."""

    name: str
    xp: ModuleType
    device: Any
    ops: Ops

    def owns(self, x: Any) -> bool:
        """Whether ``x`` is an array of this backend's namespace."""
        try:
            return array_api_compat.array_namespace(x) is self.xp
        except TypeError:
            return False


def generic_forced() -> bool:
    """Whether XBN_FORCE_GENERIC asks for the generic path everywhere."""
    return os.environ.get("XBN_FORCE_GENERIC", "").strip().lower() not in ("", "0", "false", "no")


def _namespace_name(xp: ModuleType) -> str:
    mod = xp.__name__
    if mod.startswith("array_api_compat."):
        return mod.split(".", 1)[1]
    return mod.split(".", 1)[0]


def _cuda_usable() -> bool:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # no CuPy, no driver, no device: all mean "not usable"
        return False


def _namespace_for(name: str) -> ModuleType:
    if name == "numpy":
        import array_api_compat.numpy as xp

        return xp
    if name == "cupy":
        try:
            import cupy  # noqa: F401
        except ImportError as e:
            raise BackendUnavailableError(
                "backend 'cupy' needs CuPy; install it with pip install 'xbn[cuda12]' "
                "or 'xbn[cuda13]' (matching your CUDA driver)"
            ) from e
        if not _cuda_usable():
            raise BackendUnavailableError(
                "backend 'cupy' needs a usable CUDA device, but CuPy sees none here "
                "(no GPU or no driver); use backend='numpy'"
            )
        import array_api_compat.cupy as xp

        return xp
    if name == "torch":
        try:
            import array_api_compat.torch as xp
        except ImportError as e:
            raise BackendUnavailableError(
                "backend 'torch' needs PyTorch; install it with pip install torch"
            ) from e
        return xp
    if name == "array_api_strict":
        try:
            import array_api_strict as xp
        except ImportError as e:
            raise BackendUnavailableError(
                "backend 'array_api_strict' needs pip install array-api-strict"
            ) from e
        return xp
    raise ValueError(
        f"unknown backend {name!r}; expected 'auto', one of {KNOWN_BACKENDS}, "
        "an array namespace module, or an example array"
    )


def _namespace_of_module(module: ModuleType) -> ModuleType:
    """The array-api-compat namespace of a module such as numpy, cupy or array_api_strict."""
    name = module.__name__
    if name.startswith("array_api_compat.") or name == "array_api_strict":
        return module
    if name in KNOWN_BACKENDS:
        return _namespace_for(name)
    if hasattr(module, "asarray"):
        return array_api_compat.array_namespace(module.asarray(0.0))
    raise ValueError(f"backend module {name!r} is not an array namespace (it has no asarray)")


def _resolve_device(name: str, xp: ModuleType, device: Any) -> Any:
    if device is None:
        return array_api_compat.device(xp.empty((0,)))
    try:
        if name == "array_api_strict" and isinstance(device, str):
            device = xp.Device(device)
        if name == "cupy" and isinstance(device, int):
            import cupy

            device = cupy.cuda.Device(device)
        probe = xp.empty((0,), device=device)
    except Exception as e:
        raise ValueError(f"device {device!r} is not usable with backend {name!r}: {e}") from e
    return array_api_compat.device(probe)


def resolve(backend: Any = "auto", device: Any = None, *, generic: bool | None = None) -> Backend:
    """Resolve ``backend`` (a name, a namespace module, an example array or a Backend) and ``device``.

    "auto" is CuPy when a CUDA device is usable, else NumPy. An example array gives its own
    namespace and, unless ``device`` is given, its device.

    Examples
    --------
    >>> from xbn.backends import resolve
    >>> b = resolve("numpy")
    >>> b.name, b.device
    ('numpy', 'cpu')
    """
    if generic is None:
        generic = generic_forced()
    if isinstance(backend, Backend):
        if device is None and not (generic and backend.ops.fast):
            return backend
        return resolve(backend.xp, device if device is not None else backend.device, generic=generic)
    if isinstance(backend, str):
        name = backend.strip().lower()
        if name == "auto":
            name = "cupy" if _cuda_usable() else "numpy"
        xp = _namespace_for(name)
    elif isinstance(backend, ModuleType):
        xp = _namespace_of_module(backend)
    else:
        try:
            xp = array_api_compat.array_namespace(backend)
        except TypeError:
            raise ValueError(
                f"unknown backend {backend!r} (type {type(backend).__name__}); expected 'auto', "
                f"one of {KNOWN_BACKENDS}, an array namespace module, or an example array"
            ) from None
        if device is None:
            device = array_api_compat.device(backend)
    name = _namespace_name(xp)
    return Backend(name, xp, _resolve_device(name, xp, device), Ops.build(name, xp, generic=generic))


def available_backends() -> dict[str, str]:
    """Each known backend name mapped to "ok" or the reason it cannot run here."""
    status = {}
    for name in KNOWN_BACKENDS:
        try:
            _namespace_for(name)
            status[name] = "ok"
        except BackendUnavailableError as e:
            status[name] = str(e)
    return status
