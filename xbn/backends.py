"""Choose the array backend once, when a layer is constructed, and find its fast paths.

A :class:`Backend` bundles the array namespace (through array-api-compat), the device the layer
lives on, and :class:`Ops`: the six hot operations of batch norm. Each op is the generic
Array API function from :mod:`xbn.functional`, unless a kernel module registered a fast path
for that backend (``xbn.kernels.<backend name>``). The registry below is the only seam where
fast paths plug in, so nothing on the hot path asks which backend it runs on.

A fast path takes what it can and returns ``NotImplemented`` for anything else (another layout,
another dtype, a strided view, an array too large for its indexing); the seam then calls the
generic function with the same arguments. So no kernel module carries a copy of the fallback,
and every input a fast path declines still gets the generic result.

Setting the environment variable ``XBN_FORCE_GENERIC=1`` (or ``resolve(..., generic=True)``)
skips every registered kernel: the way to A/B a fast path or to rule it out while debugging.

A :class:`Backend` is immutable: ``copy.deepcopy`` returns it as it is, and pickle stores its
name, device and generic flag and resolves them again on load (arrays and compiled kernels do
not travel; a layer's arrays pickle with the layer).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from types import ModuleType
from typing import Any, Protocol, TypeVar

import array_api_compat

from . import functional

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "Ops",
    "PassOps",
    "OP_NAMES",
    "PASS_OPS",
    "STEP_OPS",
    "BatchStats",
    "ScaleShift",
    "BackwardReduce",
    "BackwardApply",
    "BatchNormForward",
    "BatchNormBackward",
    "BatchNormInference",
    "available_backends",
    "register_kernel",
    "registered_kernels",
    "resolve",
]

Array = Any

# -- the ops' signatures: those of xbn.functional (arrays positional, options keyword) ----------
# A registered fast path has the same signature and may return NotImplemented instead.


class BatchStats(Protocol):
    def __call__(self, x: Array, /, *, axis: int, xp: ModuleType | None = None) -> tuple[Array, Array]: ...


class ScaleShift(Protocol):
    def __call__(
        self, x: Array, scale: Array, shift: Array | None, /, *, axis: int, xp: ModuleType | None = None
    ) -> Array: ...


class BackwardReduce(Protocol):
    def __call__(
        self, dy: Array, x: Array, mean: Array, /, *, axis: int, xp: ModuleType | None = None
    ) -> tuple[Array, Array]: ...


class BackwardApply(Protocol):
    def __call__(
        self,
        dy: Array,
        x: Array,
        mean: Array,
        k_dy: Array,
        k_xmu: Array,
        k_const: Array,
        /,
        *,
        axis: int,
        xp: ModuleType | None = None,
    ) -> Array: ...


class BatchNormForward(Protocol):
    def __call__(
        self,
        x: Array,
        weight: Array | None,
        bias: Array | None,
        running_mean: Array | None,
        running_var: Array | None,
        /,
        *,
        axis: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        xp: ModuleType | None = None,
        ops: Any = None,
    ) -> tuple[Array, Array, Array, Array | None, Array | None]: ...


class BatchNormBackward(Protocol):
    def __call__(
        self,
        dy: Array,
        x: Array,
        mean: Array,
        inv: Array,
        weight: Array | None,
        /,
        *,
        axis: int,
        batch_stats_used: bool = True,
        need_param_grads: bool = True,
        xp: ModuleType | None = None,
        ops: Any = None,
    ) -> tuple[Array, Array | None, Array | None]: ...


class BatchNormInference(Protocol):
    def __call__(
        self,
        x: Array,
        weight: Array | None,
        bias: Array | None,
        running_mean: Array,
        running_var: Array,
        /,
        *,
        axis: int,
        eps: float = 1e-5,
        xp: ModuleType | None = None,
        ops: Any = None,
    ) -> Array: ...


@dataclass(frozen=True, eq=False)
class PassOps:
    """The single passes over the data, bound to one namespace: what the whole-step ops compose
    (given to them as ``ops=``)."""

    batch_stats: BatchStats
    scale_shift: ScaleShift
    backward_reduce: BackwardReduce
    backward_apply: BackwardApply


@dataclass(frozen=True, eq=False)
class Ops(PassOps):
    """Every hot operation bound to one namespace: a fast path where registered, else generic.

    The whole-step ops are a training forward, a whole backward and an eval-mode forward, which
    the generic path composes from the passes; a backend registers them where fusing the
    per-channel work into its passes pays (on a GPU every small per-channel array operation is
    a kernel launch).
    ``fast``: the ops that have a registered fast path (each still falls back per call).
    """

    batch_norm_forward: BatchNormForward
    batch_norm_backward: BatchNormBackward
    batch_norm_inference: BatchNormInference
    fast: tuple[str, ...] = field(default=(), metadata={"op": False})

    @classmethod
    def build(cls, name: str, xp: ModuleType, *, generic: bool) -> Ops:
        kernels = {} if generic else registered_kernels(name)
        passes = PassOps(**{op: _bind(op, kernels.get(op), xp=xp) for op in PASS_OPS})
        steps = {op: _bind(op, kernels.get(op), xp=xp, ops=passes) for op in STEP_OPS}
        return cls(**{op: getattr(passes, op) for op in PASS_OPS}, **steps, fast=tuple(sorted(kernels)))


#: The operations a fast path may replace, each named as its function in :mod:`xbn.functional`
#: and written once, as a field of :class:`PassOps` (single passes over the data) or
#: :class:`Ops` (whole steps).
PASS_OPS = tuple(f.name for f in fields(PassOps))
STEP_OPS = tuple(f.name for f in fields(Ops) if f.metadata.get("op", True) and f.name not in PASS_OPS)
OP_NAMES = PASS_OPS + STEP_OPS


def _bind(op: str, fast: Callable[..., Any] | None, *, xp: ModuleType, ops: PassOps | None = None) -> Any:
    """``op`` on namespace ``xp``: the fast path, and the generic function where it declines.

    The caller may still pass ``xp=`` (and ``ops=``) itself, as the generic compositions do.
    """
    generic = getattr(functional, op)
    if fast is None:
        if ops is None:
            return functools.partial(generic, xp=xp)
        return functools.partial(generic, xp=xp, ops=ops)
    # Two closures rather than one with a dict of bound keywords: this runs on every call, and
    # the hot path is one call of the fast path and one identity check.
    if ops is None:

        def run(*args: Any, xp: ModuleType = xp, **kwargs: Any) -> Any:
            out = fast(*args, xp=xp, **kwargs)
            if out is NotImplemented:
                return generic(*args, xp=xp, **kwargs)
            return out

    else:

        def run(*args: Any, xp: ModuleType = xp, ops: Any = ops, **kwargs: Any) -> Any:
            out = fast(*args, xp=xp, ops=ops, **kwargs)
            if out is NotImplemented:
                return generic(*args, xp=xp, ops=ops, **kwargs)
            return out

    return functools.update_wrapper(run, fast)


KNOWN_BACKENDS = ("numpy", "cupy", "torch", "array_api_strict")

_KERNELS: dict[str, dict[str, Callable[..., Any]]] = {}
_KERNEL_MODULES_LOADED: set[str] = set()

_F = TypeVar("_F", bound=Callable[..., Any])


class BackendUnavailableError(RuntimeError):
    """A known backend that cannot run here (library not installed, or no device)."""


def register_kernel(backend: str, op: str) -> Callable[[_F], _F]:
    """Decorator: register ``fn`` as the fast path of ``op`` on ``backend``.

    The function must accept exactly what ``xbn.functional.<op>`` accepts and return the same
    results (within the dtype's tolerance), or ``NotImplemented`` for inputs it does not take
    (another layout, another dtype): the seam then runs the generic function instead.
    """
    if op not in OP_NAMES:
        raise ValueError(f"unknown op {op!r}; expected one of {OP_NAMES}")

    def decorate(fn: _F) -> _F:
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
class Backend:
    """Where a layer lives: ``name`` ("numpy", "cupy", ...), namespace ``xp``, ``device``, ``ops``.

    Two Backends are equal when they have the same namespace, device and ``generic`` flag (the
    ops follow from those). ``generic``: resolved with ``generic=True`` (or XBN_FORCE_GENERIC),
    so no registered kernel is used.
    """

    name: str
    xp: ModuleType
    device: Any
    ops: Ops = field(compare=False, repr=False)
    generic: bool = False

    def owns(self, x: Any) -> bool:
        """Whether ``x`` is an array of this backend's namespace."""
        try:
            return array_api_compat.array_namespace(x) is self.xp
        except TypeError:
            return False

    def __copy__(self) -> Backend:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Backend:
        return self  # immutable; a copy of a layer shares it, as it shares the namespace

    def __reduce__(self) -> tuple[Any, ...]:
        ref = self.name if self.name in KNOWN_BACKENDS else self.xp.__name__
        return (_restore, (ref, _device_token(self.name, self.device), self.generic))


def _device_token(name: str, device: Any) -> Any:
    """``device`` as a plain picklable value that :func:`resolve` accepts for backend ``name``."""
    if device is None or isinstance(device, (str, int)):
        return device
    if name == "cupy":
        return int(device.id)
    if name == "array_api_strict":
        return str(device._device)  # the name Device() was made from; it has no public getter
    if name == "torch":
        return str(device)
    return device


def _restore(ref: str, device: Any, generic: bool) -> Backend:
    """A pickled Backend, resolved again: the same namespace and device, kernels found anew.

    A non-generic one is resolved as ``resolve`` would be by default, so XBN_FORCE_GENERIC in
    the loading process still turns its fast paths off.
    """
    backend: Any = ref if ref in KNOWN_BACKENDS else importlib.import_module(ref)
    return resolve(backend, device, generic=True if generic else None)


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
        return importlib.import_module("array_api_compat.numpy")
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
        return importlib.import_module("array_api_compat.cupy")
    if name == "torch":
        try:
            return importlib.import_module("array_api_compat.torch")
        except ImportError as e:
            raise BackendUnavailableError(
                "backend 'torch' needs PyTorch; install it with pip install torch"
            ) from e
    if name == "array_api_strict":
        try:
            return importlib.import_module("array_api_strict")
        except ImportError as e:
            raise BackendUnavailableError(
                "backend 'array_api_strict' needs pip install array-api-strict"
            ) from e
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
    if isinstance(backend, Backend):
        # generic=False does not undo a generic Backend: a layer built on one stays generic
        generic = backend.generic or (generic_forced() if generic is None else generic)
        if device is None and generic == backend.generic:
            return backend
        return resolve(backend.xp, backend.device if device is None else device, generic=generic)
    if generic is None:
        generic = generic_forced()
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
    return Backend(name, xp, _resolve_device(name, xp, device), Ops.build(name, xp, generic=generic), generic)


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
