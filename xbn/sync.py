"""Synchronized batch normalization: statistics over the batches of every process of a world.

:class:`SyncBatchNorm` is :class:`xbn.BatchNorm` whose training forward normalizes with the
mean and variance of the batches of all processes together, as if they were one batch, and
whose backward uses the gradient sums of all of them. Each pass makes exactly one collective
call, a sum all-reduce of one small float64 buffer (see :mod:`xbn.distributed`).

The forward buffer, for C channels and P processes::

    [ flags (ceil(P / 52)) | n | A (C) | W (C) | B (C) ]

with, from each process, its count n of values per channel, its per-channel mean m and sum
of squared deviations M2 (two-pass, in the input's compute dtype, by the backend's fast path),
and a shift s that every process holds without communicating, the running mean (zero when the
layer tracks none)::

    A = n * (m - s),   W = M2,   B = n * (m - s)**2

Summed over processes these give Chan's parallel combination exactly::

    N = sum n,   mean = s + sum A / N,   M2 = sum W + (sum B - (sum A)**2 / N)

so unequal batch sizes (an empty one included) are exact. The combination runs in float64; its
rounding in the variance is about P * 1e-16 * (mean - s)**2 / var, relative, which the shift
keeps small once the running mean has followed the data (and below float32's resolution for
|mean| / std up to about 1e4 even at s = 0; the tests take x = 1e4 + N(0, 1) in float32). The
between-process term is never negative; when every process's channel is constant (sum W = 0)
and that term is within its rounding bound, the channel is constant and its variance is exactly
0, so it normalizes to exactly the bias, as BatchNorm's does.

The running mean is a valid shift only because it is the same on every process. SyncBatchNorm
keeps it so (every process applies the same update from the same all-reduced buffer); start
every process from the same state (the same initialization or ``load_state_dict`` of one
checkpoint), as data-parallel training needs anyway.

The flags make a bad input in one process an error in every process instead of a deadlock:
each process validates locally, and a process whose input is rejected sends zero statistics
with the bit of its rank set (52 ranks per float64 slot, so the sums are exact). When any bit
is set every process raises, changing nothing: the process with the bad input its own error,
the others a :class:`PeerInputError` naming the ranks. The backward's buffer is
``[ flags | sum(dy) (C) | sum(dy * (x - mean)) (C) ]`` and works the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _arrays
from . import functional as F
from .backends import Backend
from .distributed import Communicator
from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, ForwardCall, SavedForward
from .module import Module

Array = Any

__all__ = ["SyncBatchNorm", "PeerInputError", "convert_sync_batchnorm"]

#: Ranks per flag slot: a sum of distinct powers of two below 2**52 is exact in float64.
FLAG_BITS = 52
_EPS64 = float(np.finfo(np.float64).eps)


class PeerInputError(RuntimeError, ValueError):
    """Another process rejected its input, so this process's synchronized call stopped too.

    Raised in every process whose own input was fine when one or more others failed their
    checks; ``ranks`` lists those processes (their own error says what was wrong). Nothing
    changed in any process. Both a RuntimeError and a ValueError.
    """

    def __init__(self, message: str, ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ranks = tuple(ranks)


@dataclass(frozen=True)
class _Synced:
    """The saved forward's ``extra`` when it used the world's statistics."""

    count: int  # values per channel over every process
    local: int  # values per channel here


def _flag_slots(size: int) -> int:
    return -(-size // FLAG_BITS)


def _flag_ranks(slots: np.ndarray, size: int) -> tuple[int, ...]:
    """The ranks whose bits are set in the summed flag slots."""
    ranks = []
    for i, v in enumerate(slots.tolist()):
        bits = int(v)
        ranks += [i * FLAG_BITS + b for b in range(FLAG_BITS) if bits >> b & 1]
    return tuple(r for r in ranks if r < size)


class SyncBatchNorm(BatchNorm):
    """Batch normalization with the statistics of every process's batch, over ``comm``.

    The whole contract of :class:`xbn.BatchNorm` (options, state_dict, ``to``, eval), with
    these differences in a training forward when ``comm.size > 1``:

    * the mean and variance are those of the union of the batches of all processes; the
      running statistics and ``num_batches_tracked`` move from them identically everywhere,
      also in a process whose batch is empty (it contributes nothing, takes part, and gets an
      empty output), so the replicas stay identical;
    * "more than one value per channel" applies to the count over all processes;
    * dx uses the sums of dy and dy * (x - mean) over all processes; ``weight.grad`` and
      ``bias.grad`` get this process's share (as in PyTorch's SyncBatchNorm): summed over
      processes, as data-parallel training sums every parameter's gradient, they equal
      BatchNorm's on the concatenated batch;
    * an input or dy rejected in any process raises in every process, changing nothing (the
      others raise :class:`PeerInputError` naming its rank).

    Eval mode, ``frozen``, and a world of one process behave exactly as BatchNorm (no
    communication). Every process must call forward and backward the same number of times in
    the same mode. Ghost batches (``virtual_batch_size``) are not supported, and the layer
    cannot be pickled or copied: its communicator belongs to this process.

    Parameters
    ----------
    num_features
        C, the size of the channel axis.
    comm
        An :class:`xbn.distributed.Communicator` that fits the layer's backend
        (:class:`~xbn.distributed.MPICommunicator`, :class:`~xbn.distributed.NCCLCommunicator`
        for CuPy, :class:`~xbn.distributed.LocalCommunicator`).
    axis, eps, momentum, affine, track_running_stats, frozen, backend, device, dtype
        As in :class:`xbn.BatchNorm`.

    Examples
    --------
    >>> import numpy as np, xbn
    >>> from xbn.distributed import LocalCommunicator
    >>> x = np.random.default_rng(0).normal(size=(8, 3, 4, 4)).astype(np.float32)
    >>> sync = xbn.SyncBatchNorm(3, comm=LocalCommunicator(), backend="numpy")
    >>> plain = xbn.BatchNorm2d(3, backend="numpy")
    >>> bool(np.array_equal(sync(x), plain(x)))   # a world of one: exactly BatchNorm
    True
    """

    def __init__(
        self,
        num_features: int,
        *,
        comm: Communicator,
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
        if not isinstance(comm, Communicator):
            raise TypeError(
                f"comm must be an xbn.distributed.Communicator (MPICommunicator, NCCLCommunicator, "
                f"LocalCommunicator), got {_arrays.describe(comm)}"
            )
        if virtual_batch_size is not None:
            raise ValueError(_NO_GHOSTS + f", got virtual_batch_size={virtual_batch_size!r}")
        super().__init__(
            num_features,
            axis=axis,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            frozen=frozen,
            backend=backend,
            device=device,
            dtype=dtype,
        )
        comm.check_backend(self._layer_backend)
        self.__dict__["_comm"] = comm

    @property
    def _layer_backend(self) -> Backend:
        backend = self._backend
        assert backend is not None  # a layer always has one, from __init__ on
        return backend

    @property
    def comm(self) -> Communicator:
        """The communicator the statistics are synchronized over."""
        return self._comm

    @property
    def virtual_batch_size(self) -> None:
        """Always None: ghost batches are not supported."""
        return None

    @virtual_batch_size.setter
    def virtual_batch_size(self, value: Any) -> None:
        if value is not None:
            raise ValueError(_NO_GHOSTS + f", got virtual_batch_size={value!r}")

    # -- forward ---------------------------------------------------------------------------

    def _syncs(self, training: Any) -> bool:
        """Whether a forward with this ``training`` argument synchronizes.

        Decided from the layer's settings and the flag alone, so every process decides alike
        even when its input is bad; an invalid flag counts as None here and is reported
        through the collective by the checks.
        """
        if self._comm.size == 1 or self._frozen:
            return False
        if isinstance(training, (bool, np.bool_)):
            return bool(training)
        return self.training

    def forward(self, x: Array, training: bool | None = None) -> Array:
        """Normalize ``x`` (with the statistics of every process when training)."""
        if not self._syncs(training):
            return super().forward(x, training)
        comm, xp, c = self._comm, self.xp, self.num_features
        slots = _flag_slots(comm.size)
        error: Exception | None = None
        call: ForwardCall | None = None
        shift: Array = None
        try:
            shift = self._shift()
            call = self._check_forward(x, training, check_count=False)  # global count: after the all-reduce
            buf = self._pack_forward(call, shift, slots)
        except Exception as e:  # any failure here must reach the others, or they wait forever
            error = e
            buf = self._invalid_buffer(slots + 1 + 3 * c)
        out = comm.allreduce_sum(buf)
        head = _arrays.to_host(out[: slots + 1], "all-reduced buffer")
        self._raise_if_rejected(error, head[:slots], "input")
        assert call is not None
        total = int(head[slots])
        if total == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{tuple(call.x.shape)} here and 1 value per channel over all {comm.size} processes"
            )
        x, axis = call.x, call.axis
        w = self.weight.data if self.weight is not None else None
        b = self.bias.data if self.bias is not None else None
        if total == 0:  # every batch is empty: no statistics anywhere, no state changes
            self._save_for_backward(SavedForward(x, None, None, w, True, axis))
            return xp.empty_like(x)

        o = slots + 1
        a, within, between = out[o : o + c], out[o + c : o + 2 * c], out[o + 2 * c :]
        d = a / total  # mean - shift
        between = between - a * d
        bound = (4 * comm.size + 16) * _EPS64 * out[o + 2 * c :]
        zero = xp.zeros_like(between)
        between = xp.where(between > 0, between, zero)
        m2 = xp.where((within == 0) & (between <= bound), zero, within + between)
        mean64, var64 = shift + d, m2 / total
        inv64 = 1.0 / xp.sqrt(var64 + self.eps)

        cdt = F.compute_dtype(x.dtype, xp=xp)
        mean, inv, var = (xp.astype(v, cdt) for v in (mean64, inv64, var64))
        if call.count > 0:
            y = F.normalize(x, mean, inv, w, b, axis=axis, var=var, xp=xp, ops=self._layer_backend.ops)
        else:
            y = xp.empty_like(x)
        if call.update:  # last, after everything succeeded
            nbt = self.num_batches_tracked + 1
            m = 1.0 / nbt if self.momentum is None else self.momentum
            new_mean, new_var = F.updated_running_stats(
                self.running_mean, self.running_var, mean64, var64, count=total, momentum=m, xp=xp
            )
            self.running_mean, self.running_var = _arrays.detach(new_mean), _arrays.detach(new_var)
            self.num_batches_tracked = nbt
        self._save_for_backward(SavedForward(x, mean, inv, w, True, axis, _Synced(total, call.count)))
        return y

    def _shift(self) -> Array:
        """s: the float64 running mean (zeros without running statistics), equal everywhere."""
        xp = self.xp
        if self.running_mean is None:
            return xp.zeros((self.num_features,), dtype=xp.float64, device=self.device)
        return xp.astype(self.running_mean, xp.float64)

    def _pack_forward(self, call: ForwardCall, shift: Array, slots: int) -> Array:
        xp, c = self.xp, self.num_features
        n = call.count
        if n > 0:
            mean, var = self._layer_backend.ops.batch_stats(call.x, axis=call.axis)
            d = xp.astype(mean, xp.float64) - shift
            a = n * d
            parts = [a, xp.astype(var, xp.float64) * n, a * d]
        else:
            parts = [xp.zeros((c,), dtype=xp.float64, device=self.device)] * 3
        head = np.zeros(slots + 1)
        head[slots] = n
        return xp.concat([xp.asarray(head, device=self.device), *parts])

    def _invalid_buffer(self, length: int) -> Array:
        """Zero statistics with this process's flag bit set."""
        host = np.zeros(length)
        rank = self._comm.rank
        host[rank // FLAG_BITS] = float(2 ** (rank % FLAG_BITS))
        return self.xp.asarray(host, device=self.device)

    def _raise_if_rejected(self, error: Exception | None, flags: np.ndarray, what: str) -> None:
        if error is not None:
            raise error
        ranks = _flag_ranks(flags, self._comm.size)
        if ranks:
            who = "process" if len(ranks) == 1 else "processes"
            raise PeerInputError(
                f"SyncBatchNorm: the {what} of {who} {', '.join(map(str, ranks))} (of "
                f"{self._comm.size}) was rejected there, so this call stopped on every process "
                f"and changed nothing; the error raised on rank {ranks[0]} says why",
                ranks,
            )

    # -- backward --------------------------------------------------------------------------

    def backward(self, dy: Array) -> Array:
        """dx from the gradient sums of every process; adds this process's dgamma, dbeta."""
        saved: SavedForward = self._saved_for_backward()
        synced = saved.extra
        if not isinstance(synced, _Synced):  # eval, frozen, a world of one, all batches empty
            return super().backward(dy)
        comm, xp, c = self._comm, self.xp, self.num_features
        slots = _flag_slots(comm.size)
        error: Exception | None = None
        sum_dy = sum_dy_xmu = None
        try:
            dy = _arrays.check_array(self._layer_backend, dy, "dy")
            _arrays.check_like(dy, saved.x)
            assert saved.mean is not None and saved.invstd is not None
            if synced.local > 0:
                sum_dy, sum_dy_xmu = self._layer_backend.ops.backward_reduce(
                    dy, saved.x, saved.mean, axis=saved.axis
                )
            else:
                sum_dy, sum_dy_xmu = (
                    xp.zeros((c,), dtype=saved.mean.dtype, device=self.device) for _ in range(2)
                )
            head = xp.zeros((slots,), dtype=xp.float64, device=self.device)
            buf = xp.concat([head, xp.astype(sum_dy, xp.float64), xp.astype(sum_dy_xmu, xp.float64)])
        except Exception as e:  # as in forward: the others must learn of it
            error = e
            buf = self._invalid_buffer(slots + 2 * c)
        out = comm.allreduce_sum(buf)
        self._raise_if_rejected(error, _arrays.to_host(out[:slots], "all-reduced buffer"), "dy")
        assert saved.mean is not None and saved.invstd is not None
        assert sum_dy is not None and sum_dy_xmu is not None
        cdt = saved.mean.dtype
        total_dy = xp.astype(out[slots : slots + c], cdt)
        total_dy_xmu = xp.astype(out[slots + c :], cdt)
        k_dy, k_xmu, k_const = F.backward_coefficients(
            total_dy, total_dy_xmu, saved.invstd, saved.weight, count=synced.count, xp=xp
        )
        if synced.local > 0:
            dx = self._layer_backend.ops.backward_apply(
                dy, saved.x, saved.mean, k_dy, k_xmu, k_const, axis=saved.axis
            )
        else:
            dx = xp.empty_like(dy)
        if self.weight is not None and self.bias is not None:
            self._accumulate_grad(self.weight, sum_dy_xmu * saved.invstd)
            self._accumulate_grad(self.bias, sum_dy)
        self._release_saved()
        return dx

    # -- state -----------------------------------------------------------------------------

    def _plan_move(self, backend: Any, device: Any) -> tuple[Backend, Any, dict[str, Any]] | None:
        plan = super()._plan_move(backend, device)
        if plan is not None:
            try:
                self._comm.check_backend(plan[0])
            except TypeError as e:
                raise TypeError(f"cannot move SyncBatchNorm: its communicator does not fit: {e}") from None
        return plan

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            f"SyncBatchNorm cannot be pickled or copied: its communicator ({self._comm!r}) belongs "
            "to this process's world and cannot travel. Save state_dict() instead and load it "
            "into a layer built with a communicator where it is used"
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", comm={self._comm!r}"


_NO_GHOSTS = (
    "SyncBatchNorm does not support virtual_batch_size (ghost batches): its statistics are "
    "those of the whole batch of every process"
)

#: The classes convert_sync_batchnorm replaces: plain BatchNorm only, not other variants.
_PLAIN = (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d)


def convert_sync_batchnorm(module: Module, comm: Communicator) -> Module:
    """``module`` with every plain BatchNorm in its tree replaced by a :class:`SyncBatchNorm`.

    Plain means of exactly the class BatchNorm, BatchNorm1d, BatchNorm2d or BatchNorm3d: other
    variants (subclasses) are left as they are. Each replacement keeps the layer's options,
    mode, Parameter objects (an optimizer built on the model keeps tracking them), running
    statistics, ``num_batches_tracked`` and accepted input ranks; a saved forward is not kept.
    Containers are changed in place, as torch's ``convert_sync_batchnorm`` does; the return
    value is the new root when ``module`` itself is a plain BatchNorm, else ``module``.

    Everything is checked before anything changes: ``comm`` must fit every layer's backend
    (TypeError), and a layer with ``virtual_batch_size`` (ghost batches) cannot be converted
    (ValueError).

    Examples
    --------
    >>> import xbn
    >>> from xbn.distributed import LocalCommunicator
    >>> model = xbn.nn.Sequential(xbn.nn.Linear(4, 3, backend="numpy", seed=0),
    ...                           xbn.BatchNorm1d(3, backend="numpy"))
    >>> weight = model[1].weight
    >>> model = xbn.convert_sync_batchnorm(model, LocalCommunicator())
    >>> type(model[1]).__name__, model[1].weight is weight
    ('SyncBatchNorm', True)
    """
    if not isinstance(module, Module):
        raise TypeError(f"module must be an xbn.Module, got {_arrays.describe(module)}")
    if not isinstance(comm, Communicator):
        raise TypeError(f"comm must be an xbn.distributed.Communicator, got {_arrays.describe(comm)}")
    targets = [(name, m) for name, m in module.named_modules() if type(m) in _PLAIN]
    for name, m in targets:
        assert isinstance(m, BatchNorm)
        label = f"{name!r} ({type(m).__name__})" if name else type(m).__name__
        if m.virtual_batch_size is not None:
            raise ValueError(
                f"cannot convert {label}: it uses virtual_batch_size={m.virtual_batch_size} "
                "(ghost batches), which SyncBatchNorm does not support"
            )
        assert m._backend is not None
        try:
            comm.check_backend(m._backend)
        except TypeError as e:
            raise TypeError(f"cannot convert {label}: {e}") from None
    replaced = {id(m): _as_sync(m, comm) for _, m in targets}  # type: ignore[arg-type]
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replaced:
                parent._modules[name] = replaced[id(child)]
    return replaced.get(id(module), module)


def _as_sync(bn: BatchNorm, comm: Communicator) -> SyncBatchNorm:
    """A SyncBatchNorm holding ``bn``'s options, mode, Parameters and buffers (shared, not copied:
    state is replaced, never written in place)."""
    sync = SyncBatchNorm(
        bn.num_features,
        comm=comm,
        axis=bn.axis,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        frozen=bn.frozen,
        backend=bn._backend,
        dtype=bn.dtype,
    )
    for name, p in bn._parameters.items():
        sync._parameters[name] = p
    for name, value in bn._buffers.items():
        sync._buffers[name] = value
    if not bn.track_running_stats:
        sync.num_batches_tracked = bn.num_batches_tracked
    sync.__dict__["training"] = bn.training
    # BatchNorm1d/2d/3d accept only their ranks; the converted layer keeps that contract
    sync.__dict__["_valid_ndims"] = bn._valid_ndims
    return sync
