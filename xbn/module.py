"""``xbn.Module``: the base of every layer, as ``torch.nn.Module`` is of torch's.

A Module registers its parameters, buffers and child modules in the order they are assigned,
and from that registry alone gives the whole-tree operations: recursive ``train``/``eval``,
``parameters``/``named_parameters``, ``zero_grad``, ``state_dict`` with torch's prefixed keys,
an atomic ``load_state_dict`` and ``to``, a torch-style ``__repr__``, and ``copy.deepcopy`` /
pickle (a Backend pickles as its name and device and is resolved again on load).

A layer adds only what is its own: its options, ``forward`` and ``backward``. ``forward`` saves
what ``backward`` needs with :meth:`Module._save_for_backward`; one backward consumes it, so a
second backward for one forward raises instead of adding the gradients twice (torch raises too).

Examples
--------
>>> import numpy as np, xbn
>>> model = xbn.nn.Sequential(
...     xbn.nn.Linear(6, 8, backend="numpy", seed=0), xbn.BatchNorm1d(8, backend="numpy"),
...     xbn.nn.ReLU(), xbn.nn.Linear(8, 3, backend="numpy", seed=1))
>>> list(model.state_dict())[:5]
['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean']
>>> model.load_state_dict(model.state_dict())
IncompatibleKeys(missing_keys=[], unexpected_keys=[])
>>> print(model)
Sequential(
  (0): Linear(in_features=6, out_features=8, bias=True, backend='numpy')
  (1): BatchNorm1d(8, axis=1, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, backend='numpy')
  (2): ReLU()
  (3): Linear(in_features=8, out_features=3, bias=True, backend='numpy')
)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from . import _arrays
from .backends import Backend, resolve

Array = Any

__all__ = ["Module", "Parameter", "IncompatibleKeys", "BackwardBeforeForwardError"]


class BackwardBeforeForwardError(RuntimeError, ValueError):
    """``backward`` with no forward to go with it: none was run, or its backward already ran.

    Both a RuntimeError (as torch's "Trying to backward through the graph a second time") and a
    ValueError.
    """


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
        grad = "set" if self.grad is not None else None
        return f"Parameter(shape={self.shape}, dtype={self.data.dtype}, grad={grad})"


class IncompatibleKeys(NamedTuple):
    """What ``load_state_dict`` did not match: keys the model has that the dict lacked, and the reverse."""

    missing_keys: list[str]
    unexpected_keys: list[str]


_REGISTRIES = ("_parameters", "_buffers", "_modules")


def _counter_value(value: Any, key: str) -> int:
    """A counter's new value: a 0-d integer in [0, 2**63 - 1], to round-trip through torch's int64."""
    if _arrays.is_int(value):
        n = int(value)  # a Python int may exceed every NumPy integer dtype
    else:
        host = _arrays.to_host(value, key)
        if host.shape != () or host.dtype.kind not in "iu":
            raise ValueError(
                f"{key} must be a 0-d integer array or int, got shape {host.shape} and dtype {host.dtype}"
            )
        n = int(host)
    if n < 0:
        raise ValueError(f"{key} must be >= 0, got {n}")
    if n > _arrays.INT64_MAX:
        raise ValueError(f"{key} must be at most 2**63 - 1 (torch stores it as int64), got {n}")
    return n


class Module:
    """Base class of xbn's layers: registered parameters, buffers and children, in order.

    Assigning an :class:`xbn.Parameter` or a Module to an attribute registers it; buffers (running
    statistics, counters) are registered with :meth:`register_buffer`. A buffer holds an array,
    None (absent: no state_dict entry), or a Python int (a counter such as
    ``num_batches_tracked``, exported as a 0-d int64 array as torch does).

    A module that owns arrays lives on one backend (``self._backend``) and keeps its parameters
    and floating buffers in one dtype (``self._dtype``); modules without arrays (ReLU,
    Sequential) have neither and follow their inputs or their children.
    """

    training: bool
    _backend: Backend | None
    _dtype: Any

    def __init__(self) -> None:
        d = self.__dict__
        d["_parameters"] = {}
        d["_buffers"] = {}
        d["_modules"] = {}
        d["training"] = True
        d["_backend"] = None
        d["_dtype"] = None
        d["_saved"] = None
        d["_saved_consumed"] = False

    # -- registration ----------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        params = d.get("_parameters")
        if params is None:
            raise AttributeError(f"{type(self).__name__}.__init__ must call Module.__init__() first")
        buffers, modules = d["_buffers"], d["_modules"]
        if isinstance(value, Parameter):
            self._register("_parameters", name, value)
        elif isinstance(value, Module):
            self._register("_modules", name, value)
        elif name in params:
            if value is not None:
                raise TypeError(
                    f"cannot assign {type(value).__name__} to parameter {name!r}: "
                    "expected an xbn.Parameter or None"
                )
            params[name] = None
        elif name in buffers:
            buffers[name] = value
        elif name in modules:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to child module {name!r}")
            modules[name] = None
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # Only reached when ordinary lookup fails: the registered names live in the registries.
        d = self.__dict__
        for registry in _REGISTRIES:
            entries = d.get(registry)
            if entries is not None and name in entries:
                return entries[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        if not self._unregister(name):
            object.__delattr__(self, name)

    def _unregister(self, name: str) -> bool:
        d = self.__dict__
        found = False
        for registry in _REGISTRIES:
            if name in d[registry]:
                del d[registry][name]
                found = True
        d.pop(name, None)
        return found

    def _register(self, registry: str, name: str, value: Any) -> None:
        """Put ``value`` under ``name`` in ``registry``; a name already there keeps its place
        (the order is the forward order of a Sequential and the order of state_dict keys)."""
        d = self.__dict__
        for other in _REGISTRIES:
            if other != registry:
                d[other].pop(name, None)
        d.pop(name, None)
        d[registry][name] = value

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Register a parameter slot; None keeps the slot empty (no state_dict entry)."""
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"{name!r} must be an xbn.Parameter or None, got {type(param).__name__}")
        self._register("_parameters", name, param)

    def register_buffer(self, name: str, value: Any) -> None:
        """Register state that is not learned: an array, None, or an int counter."""
        self._register("_buffers", name, value)

    def add_module(self, name: str, module: Module | None) -> None:
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{name!r} must be an xbn.Module, got {type(module).__name__}")
        self._register("_modules", name, module)

    def _check_ready(self, what: str) -> None:
        """Raise if this module has no ``what`` (parameters, buffers, state) to give yet.

        Every module is ready from its constructor on, except a lazy one before its first input.
        """

    # -- backend ---------------------------------------------------------------------------

    def _init_backend(self, backend: Any, device: Any, dtype: Any) -> None:
        """Resolve where this module's arrays live, and their dtype (checks only, no state)."""
        b = resolve(backend, device)
        self.__dict__["_dtype"] = _arrays.param_dtype(b, dtype)
        self.__dict__["_backend"] = b

    @property
    def backend(self) -> str | None:
        """The backend's name ("numpy", "cupy", "torch", ...), None for a module without arrays."""
        return None if self._backend is None else self._backend.name

    @property
    def xp(self) -> Any:
        """The array namespace (array-api-compat's wrapper where there is one)."""
        return None if self._backend is None else self._backend.xp

    @property
    def device(self) -> Any:
        return None if self._backend is None else self._backend.device

    @property
    def dtype(self) -> Any:
        """dtype of the parameters and floating buffers."""
        return self._dtype

    # -- the tree --------------------------------------------------------------------------

    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, m in self._modules.items():
            if m is not None:
                yield name, m

    def children(self) -> Iterator[Module]:
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module and every descendant, depth first, each once, with its dotted name."""
        seen: set[int] = set()

        def walk(m: Module, pre: str) -> Iterator[tuple[str, Module]]:
            if id(m) in seen:
                return
            seen.add(id(m))
            yield pre, m
            for name, child in m.named_children():
                yield from walk(child, f"{pre}.{name}" if pre else name)

        yield from walk(self, prefix)

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        """Every parameter of the tree with its dotted name, each Parameter once."""
        seen: set[int] = set()
        for pre, m in self.named_modules():
            m._check_ready("parameters")
            for name, p in m._parameters.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{pre}.{name}" if pre else name), p

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self) -> Iterator[tuple[str, Any]]:
        for pre, m in self.named_modules():
            m._check_ready("buffers")
            for name, b in m._buffers.items():
                if b is not None:
                    yield (f"{pre}.{name}" if pre else name), b

    def train(self, mode: bool = True) -> Module:
        mode = _arrays.check_bool("mode", mode)
        for m in self.modules():
            m.__dict__["training"] = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every gradient: to None (torch's default) or to exact zeros."""
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                xp = _arrays.array_namespace(p.grad)
                p.grad = xp.zeros_like(p.grad)

    # -- forward and backward --------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def backward(self, dy: Array) -> Array:
        raise NotImplementedError(f"{type(self).__name__} does not define backward()")

    def _save_for_backward(self, saved: Any) -> None:
        d = self.__dict__
        d["_saved"], d["_saved_consumed"] = saved, False

    def _saved_for_backward(self) -> Any:
        """What the last forward saved; raises if there is none to back through."""
        saved = self.__dict__["_saved"]
        if saved is None:
            if self.__dict__["_saved_consumed"]:
                raise BackwardBeforeForwardError(
                    "backward() already ran for the last forward(); run forward() again before "
                    "another backward() (its gradients were accumulated once already)"
                )
            raise BackwardBeforeForwardError("backward() needs a preceding forward(); none was run")
        return saved

    def _release_saved(self) -> None:
        """Called when a backward has succeeded: its forward cannot be backed through again."""
        d = self.__dict__
        d["_saved"], d["_saved_consumed"] = None, True

    def _snapshot(self) -> list[tuple[Module, type, dict[str, Any], list[tuple[Parameter, Any, Any]]]]:
        """What restores every module of the tree after a failed call: class, attributes,
        registries, and each parameter's data and grad.

        State is replaced, never written in place (running statistics, grads, parameter data are
        all new arrays), so shallow copies are exact. The class is kept because a lazy layer
        becomes another class on its first input.
        """
        snap = []
        for m in self.modules():
            attrs = dict(m.__dict__)
            for registry in _REGISTRIES:
                attrs[registry] = dict(attrs[registry])
            params = [(p, p.data, p.grad) for p in attrs["_parameters"].values() if p is not None]
            snap.append((m, type(m), attrs, params))
        return snap

    @staticmethod
    def _restore(
        snapshot: list[tuple[Module, type, dict[str, Any], list[tuple[Parameter, Any, Any]]]],
    ) -> None:
        for m, cls, attrs, params in snapshot:
            object.__setattr__(m, "__class__", cls)
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for p, data, grad in params:
                p.data, p.grad = data, grad

    def _accumulate_grad(self, p: Parameter, g: Array) -> None:
        """Add ``g`` to ``p.grad`` (as torch does across backward calls), in the parameter's dtype.

        Gradients are state: detached from any autograd graph, so a torch input that requires
        grad does not make them grow a graph call after call.
        """
        g = _arrays.detach(g)
        if g.dtype != p.data.dtype:
            g = self.xp.astype(g, p.data.dtype) if self.xp is not None else g
        p.grad = g if p.grad is None else p.grad + g

    # -- state -----------------------------------------------------------------------------

    def _state_names(self) -> list[str]:
        """This module's own state_dict keys, in order: parameters, then buffers."""
        names = [n for n, p in self._parameters.items() if p is not None]
        return names + [n for n, b in self._buffers.items() if b is not None]

    def _state_value(self, name: str) -> Any:
        if name in self._parameters:
            return self._parameters[name].data
        return self._buffers[name]

    def state_dict(self) -> dict[str, Array]:
        """Copies of every parameter and buffer under torch's prefixed keys, in registration order.

        An int counter becomes a 0-d int64 array on the module's device.
        """
        sd: dict[str, Array] = {}
        for pre, m in self.named_modules():
            m._check_ready("state to save")
            for name in m._state_names():
                v = m._state_value(name)
                xp = m.xp
                if isinstance(v, int):
                    v = xp.asarray(v, dtype=xp.int64, device=m.device)
                else:
                    v = xp.asarray(v, copy=True)
                sd[f"{pre}.{name}" if pre else name] = v
        return sd

    def _convert_state(self, name: str, value: Any, key: str) -> Any:
        """``value`` checked and converted for state entry ``name``; reads, never writes.

        Floating state keeps its shape and this module's dtype and device; a counter takes a 0-d
        integer in [0, 2**63 - 1] (it must round-trip through torch's int64).
        """
        current = self._state_value(name)
        if isinstance(current, int):
            return _counter_value(value, key)
        host = _arrays.to_host(value, key)
        if host.dtype.kind != "f":
            raise TypeError(f"{key} must have a real floating dtype, got {host.dtype}")
        shape = tuple(current.shape)
        if host.shape != shape:
            raise ValueError(f"{key} must have shape {shape}, got {host.shape}")
        # copy=True: the values may share memory with their source (torch's state_dict().numpy()
        # does), and an in-place update there must not reach into this module.
        return self.xp.asarray(host, dtype=self._dtype, device=self.device, copy=True)

    def _assign_state(self, name: str, value: Any) -> None:
        if name in self._parameters:
            self._parameters[name].data = value  # the same Parameter: optimizers keep tracking it
        else:
            self._buffers[name] = value

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Load state from arrays of any backend, all validated before anything changes.

        With ``strict=True`` a key mismatch raises ValueError; with ``strict=False`` the keys that
        match are loaded and the rest reported. Returns ``(missing_keys, unexpected_keys)``.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        strict = _arrays.check_bool("strict", strict)
        owners: dict[str, tuple[Module, str]] = {}
        for pre, m in self.named_modules():
            for name in m._state_names():
                owners[f"{pre}.{name}" if pre else name] = (m, name)
        missing = [k for k in owners if k not in state_dict]
        unexpected = [k for k in state_dict if k not in owners]
        if strict and (missing or unexpected):
            raise ValueError(
                f"state_dict keys do not match: expected {list(owners)}; "
                f"missing {missing}, unexpected {unexpected}"
            )
        converted = [
            (m, name, m._convert_state(name, state_dict[key], key))
            for key, (m, name) in owners.items()
            if key in state_dict
        ]
        for m, name, value in converted:  # everything validated: now change state
            m._assign_state(name, value)
        return IncompatibleKeys(missing, unexpected)

    # -- moving and copying ----------------------------------------------------------------

    def _plan_move(self, backend: Any, device: Any) -> tuple[Backend, Any, dict[str, Any]] | None:
        """This module's arrays moved to ``backend``/``device``, without changing the module."""
        if self._backend is None:
            return None
        target = resolve(self._backend if backend is None else backend, device)
        name = _arrays.dtype_name(self._backend.xp, self._dtype)
        dtype = getattr(target.xp, name, None)
        if dtype is None:
            raise ValueError(f"backend {target.name!r} has no dtype {name}")

        def move(a: Any) -> Any:
            if a is None or isinstance(a, int):
                return a
            return _arrays.move_array(a, target, dtype)

        moved = {f"buffer:{n}": move(b) for n, b in self._buffers.items()}
        for n, p in self._parameters.items():
            if p is not None:
                moved[f"data:{n}"], moved[f"grad:{n}"] = move(p.data), move(p.grad)
        return target, dtype, moved

    def to(self, backend: Any = None, device: Any = None) -> Module:
        """Move every parameter, gradient and buffer of the tree to ``backend`` / ``device``.

        Atomic: every array of every module is moved before any module changes, so a failure
        leaves the whole tree where it was. Arrays cross by DLPack where both sides support it
        and through a NumPy host copy otherwise. Saved forwards are dropped: a backward must
        follow a new forward.
        """
        plans = [(m, m._plan_move(backend, device)) for m in self.modules()]
        for m, plan in plans:
            d = m.__dict__
            d["_saved"], d["_saved_consumed"] = None, False
            if plan is None:
                continue
            target, dtype, moved = plan
            d["_backend"], d["_dtype"] = target, dtype
            for n in m._buffers:
                m._buffers[n] = moved[f"buffer:{n}"]
            for n, p in m._parameters.items():
                if p is not None:
                    p.data, p.grad = moved[f"data:{n}"], moved[f"grad:{n}"]
        return self

    def __getstate__(self) -> dict[str, Any]:
        # A saved forward holds the caller's input: a copy starts without one, as a copy of a
        # torch module has no autograd graph attached.
        state = self.__dict__.copy()
        state["_saved"], state["_saved_consumed"] = None, False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- printing --------------------------------------------------------------------------

    def extra_repr(self) -> str:
        """The module's own options, printed inside its parentheses."""
        return ""

    def __repr__(self) -> str:
        lines = [f"({name}): " + repr(m).replace("\n", "\n  ") for name, m in self.named_children()]
        extra = self.extra_repr()
        if not lines:
            return f"{type(self).__name__}({extra})"
        body = ([extra] if extra else []) + lines
        return f"{type(self).__name__}(\n  " + "\n  ".join(body) + "\n)"
