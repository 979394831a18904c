"""Stochastic gradient descent with PyTorch's semantics (momentum, dampening, Nesterov, weight decay)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

from . import _arrays
from .backends import resolve
from .module import Parameter

__all__ = ["SGD"]


class SGD:
    """``torch.optim.SGD`` for :class:`xbn.Parameter`: same update, same defaults.

    For each parameter with a gradient: g = grad + weight_decay * p; with momentum the buffer
    b = g on the first step and b = momentum * b + (1 - dampening) * g after; Nesterov uses
    g + momentum * b, plain momentum uses b; then p = p - lr * g. Parameters whose grad is None
    are skipped. Updates assign new arrays rather than writing in place, so arrays cached by a
    forward pass are never changed under it.

    Examples
    --------
    >>> import numpy as np, xbn
    >>> bn = xbn.BatchNorm1d(2, backend="numpy")
    >>> opt = xbn.optim.SGD(bn.parameters(), lr=0.5)
    >>> _ = bn(np.array([[0.0, 1.0], [2.0, 5.0]], dtype=np.float32))
    >>> _ = bn.backward(np.ones((2, 2), dtype=np.float32))
    >>> opt.step(); bn.bias.data.tolist()
    [-1.0, -1.0]
    """

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        self.params = list(params)
        for p in self.params:
            if not isinstance(p, Parameter):
                raise TypeError(f"params must be xbn.Parameter objects, got {type(p).__name__}")
        for name, value in (
            ("lr", lr),
            ("momentum", momentum),
            ("dampening", dampening),
            ("weight_decay", weight_decay),
        ):
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.dampening = float(dampening)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)
        self._buffers: dict[int, Any] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every gradient: to None, as PyTorch does by default, or to exact zeros.

        Zeros are new arrays, not ``grad * 0``, which would keep NaN and Inf.
        """
        for p in self.params:
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad = _arrays.array_namespace(p.grad).zeros_like(p.grad)

    def step(self) -> None:
        """One update of every parameter that has a gradient; all or nothing if one fails."""
        updates = []
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.weight_decay != 0:
                g = g + self.weight_decay * p.data
            buf = None
            if self.momentum != 0:
                buf = self._buffer_beside(i, p)
                buf = g if buf is None else self.momentum * buf + (1.0 - self.dampening) * g
                g = g + self.momentum * buf if self.nesterov else buf
            updates.append((i, p, p.data - self.lr * g, buf))
        for i, p, data, buf in updates:
            p.data = data
            if buf is not None:
                self._buffers[i] = buf

    def _buffer_beside(self, i: int, p: Parameter) -> Any:
        """Momentum buffer ``i`` on the parameter's backend and device.

        A model moved with ``to()`` after some steps leaves its buffers behind; they follow it
        here rather than fail in a mixed-namespace expression.
        """
        buf = self._buffers.get(i)
        if buf is None or (type(buf) is type(p.data) and _arrays.device(buf) == _arrays.device(p.data)):
            return buf
        return _arrays.move_array(buf, resolve(p.data), p.data.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"momentum_buffers": dict(self._buffers)}
