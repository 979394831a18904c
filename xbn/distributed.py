"""Communicators: the one collective :class:`xbn.SyncBatchNorm` needs, on engines users already run.

A communicator knows this process's ``rank`` in a world of ``size`` processes and sums one 1-D
array over all of them (:meth:`Communicator.allreduce_sum`). Three implementations:

* :class:`LocalCommunicator`: a world of one process, for any backend (the sum is the array).
* :class:`MPICommunicator`: MPI through mpi4py (``MPI.COMM_WORLD`` by default). NumPy arrays go
  to MPI as they are; arrays of other host backends (torch on the CPU, array-api-strict) as a
  NumPy copy; CuPy arrays directly when the MPI library is CUDA-aware, else staged through host
  memory (device to host, all-reduce, host to device).
* :class:`NCCLCommunicator`: NCCL through ``cupy.cuda.nccl``, for CuPy arrays on the
  communicator's GPU, enqueued on CuPy's current stream. One process per GPU;
  :meth:`NCCLCommunicator.from_mpi` creates the NCCL communicator by broadcasting its unique id
  over MPI.

Neither mpi4py nor CuPy is imported until a communicator that needs it is created, so
``import xbn`` works without them.

Every process of the world must make the same sequence of collective calls with buffers of one
length and dtype; a process that skips one leaves the others waiting. That is why
:class:`xbn.SyncBatchNorm` never raises before its collective: it sends a "my input was bad"
flag in the same buffer, and then every process raises.

Examples
--------
>>> import numpy as np
>>> from xbn.distributed import LocalCommunicator
>>> comm = LocalCommunicator()
>>> comm.rank, comm.size
(0, 1)
>>> comm.allreduce_sum(np.array([1.0, 2.0])).tolist()
[1.0, 2.0]
"""

from __future__ import annotations

import abc
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from . import _arrays
from .backends import Backend

Array = Any

__all__ = ["Communicator", "LocalCommunicator", "MPICommunicator", "NCCLCommunicator"]


class Communicator(abc.ABC):
    """Where this process is in a world of processes, and a sum all-reduce of one 1-D array.

    Subclasses implement :attr:`rank`, :attr:`size`, :meth:`allreduce_sum` and
    :meth:`check_backend`. Every process calls :meth:`allreduce_sum` in the same order with a
    buffer of the same length and dtype; each gets the same sum back.
    """

    @property
    @abc.abstractmethod
    def rank(self) -> int:
        """This process's index in the world, 0 <= rank < size."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """The number of processes in the world."""

    @abc.abstractmethod
    def allreduce_sum(self, buf: Array) -> Array:
        """The elementwise sum of ``buf`` over every process, as a new array like ``buf``.

        ``buf``: a 1-D float32 or float64 array that this communicator can reduce (see
        :meth:`check_backend`); it is not modified.
        """

    @abc.abstractmethod
    def check_backend(self, backend: Backend) -> None:
        """Raise TypeError, saying why, if arrays of ``backend`` cannot be reduced here."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


def check_buffer(buf: Any) -> Any:
    """The namespace of ``buf`` after checking it is a 1-D float32 or float64 array."""
    try:
        xp = array_api_compat.array_namespace(buf)
    except TypeError:
        raise TypeError(f"the buffer to all-reduce must be an array, got {_arrays.describe(buf)}") from None
    if buf.ndim != 1:
        raise ValueError(f"the buffer to all-reduce must be 1-D, got shape {tuple(buf.shape)}")
    if buf.dtype not in (xp.float32, xp.float64):
        raise TypeError(f"the buffer to all-reduce must be float32 or float64, got {buf.dtype}")
    return xp


class LocalCommunicator(Communicator):
    """A world of one process: the sum over the world is the array itself (copied).

    Fits every backend. A :class:`xbn.SyncBatchNorm` with it behaves exactly as BatchNorm.

    Examples
    --------
    >>> import numpy as np, xbn
    >>> from xbn.distributed import LocalCommunicator
    >>> bn = xbn.SyncBatchNorm(3, comm=LocalCommunicator(), backend="numpy")
    >>> bn.comm
    LocalCommunicator(rank=0, size=1)
    >>> x = np.ones((4, 3), dtype=np.float32)
    >>> bool(np.array_equal(bn(x), xbn.BatchNorm1d(3, backend="numpy")(x)))
    True
    """

    @property
    def rank(self) -> int:
        return 0

    @property
    def size(self) -> int:
        return 1

    def allreduce_sum(self, buf: Array) -> Array:
        xp = check_buffer(buf)
        return xp.asarray(buf, copy=True)

    def check_backend(self, backend: Backend) -> None:
        return None


def _import_mpi() -> Any:
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as e:  # no mpi4py, or no MPI library for it
        raise ImportError(
            "MPI communication needs mpi4py and an MPI library: pip install 'xbn[mpi]' mpich, "
            f"or mpi4py built against the cluster's MPI ({type(e).__name__}: {e})"
        ) from e
    return MPI


def _is_cupy(buf: Any) -> bool:
    return bool(array_api_compat.is_cupy_array(buf))


class MPICommunicator(Communicator):
    """MPI's all-reduce (``MPI.SUM``) through mpi4py, on ``comm`` (``MPI.COMM_WORLD`` by default).

    Parameters
    ----------
    comm
        An ``mpi4py.MPI.Intracomm``; None for ``MPI.COMM_WORLD``.
    cuda_aware
        Whether the MPI library reads and writes GPU memory itself. None asks it
        (``MPI.Query_cuda_support()`` where mpi4py has it, else False). When False, CuPy arrays
        are staged through host memory: a device-to-host copy (which waits for CuPy's current
        stream), the all-reduce, and a host-to-device copy.

    Every backend fits: NumPy arrays are handed to MPI as they are, other host arrays (torch
    on the CPU, array-api-strict) as NumPy copies, device arrays other than CuPy's staged
    through the host.

    Examples
    --------
    Run under ``mpiexec -n 2 python script.py``; each process gets the sum of both arrays::

        from xbn.distributed import MPICommunicator
        comm = MPICommunicator()
        total = comm.allreduce_sum(np.full(3, comm.rank + 1.0))   # [3., 3., 3.]
    """

    def __init__(self, comm: Any = None, *, cuda_aware: bool | None = None) -> None:
        if cuda_aware is not None:
            cuda_aware = _arrays.check_bool("cuda_aware", cuda_aware)
        MPI = _import_mpi()
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(
                f"comm must be an mpi4py.MPI.Intracomm (such as MPI.COMM_WORLD) or None, "
                f"got {_arrays.describe(comm)}"
            )
        if comm == MPI.COMM_NULL:
            raise ValueError("comm is MPI.COMM_NULL: this process is not part of that communicator")
        if cuda_aware is None:
            query = getattr(MPI, "Query_cuda_support", None)
            cuda_aware = bool(query()) if callable(query) else False
        self._mpi = MPI
        self._comm = comm
        self._rank = int(comm.Get_rank())
        self._size = int(comm.Get_size())
        self._cuda_aware = cuda_aware

    @property
    def comm(self) -> Any:
        """The wrapped ``mpi4py.MPI.Intracomm``."""
        return self._comm

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def cuda_aware(self) -> bool:
        """Whether CuPy arrays go to MPI directly (else through host memory)."""
        return self._cuda_aware

    def check_backend(self, backend: Backend) -> None:
        return None

    def allreduce_sum(self, buf: Array) -> Array:
        xp = check_buffer(buf)
        if _is_cupy(buf):
            import cupy

            if self._cuda_aware:
                send = cupy.ascontiguousarray(buf)
                out = cupy.empty_like(send)
                # MPI does not order itself after CuPy's stream: the buffer must be complete
                cupy.cuda.get_current_stream().synchronize()
                self._comm.Allreduce(send, out, op=self._mpi.SUM)
                return out
        if isinstance(buf, np.ndarray):
            host = np.ascontiguousarray(buf)
        else:
            host = np.ascontiguousarray(_arrays.to_host(buf, "buffer"))
        out_host = np.empty_like(host)
        self._comm.Allreduce(host, out_host, op=self._mpi.SUM)
        if isinstance(buf, np.ndarray):
            return out_host
        return xp.asarray(out_host, device=_arrays.device(buf))

    def __repr__(self) -> str:
        aware = ", cuda_aware=True" if self._cuda_aware else ""
        return f"MPICommunicator(rank={self._rank}, size={self._size}{aware})"


def _import_nccl() -> tuple[ModuleType, ModuleType]:
    """(cupy, cupy.cuda.nccl), or ImportError saying what is missing."""
    try:
        import cupy
        from cupy.cuda import nccl
    except ImportError as e:
        raise ImportError("NCCLCommunicator needs CuPy: pip install 'xbn[cuda12]' or 'xbn[cuda13]'") from e
    if not getattr(nccl, "available", True):
        raise ImportError(
            "CuPy cannot load the NCCL library: pip install nvidia-nccl-cu12 or nvidia-nccl-cu13 "
            "(matching CuPy's CUDA version)"
        )
    return cupy, nccl


class NCCLCommunicator(Communicator):
    """NCCL's all-reduce (``ncclSum``) of CuPy arrays on one GPU, on CuPy's current stream.

    Parameters
    ----------
    nccl_comm
        A ``cupy.cuda.nccl.NcclCommunicator`` made for one GPU of one process (``rank_id()``,
        ``size()`` and ``device_id()`` are read once, here).

    One process drives one GPU: select the device (``cupy.cuda.Device(local_rank).use()``)
    before creating the NCCL communicator, and build the layers on that device. The all-reduce
    is enqueued on the current stream and returns without waiting; work on that stream sees
    its result. Layers on another backend or another device do not fit (TypeError).

    Examples
    --------
    Under ``mpiexec -n 4`` on a node with four GPUs::

        import cupy
        from mpi4py import MPI
        cupy.cuda.Device(MPI.COMM_WORLD.Get_rank() % 4).use()
        comm = NCCLCommunicator.from_mpi()
        bn = xbn.SyncBatchNorm(64, comm=comm, backend="cupy")
    """

    def __init__(self, nccl_comm: Any) -> None:
        methods = ("allReduce", "rank_id", "size", "device_id")
        missing = [m for m in methods if not callable(getattr(nccl_comm, m, None))]
        if missing:
            raise TypeError(
                "nccl_comm must be a cupy.cuda.nccl.NcclCommunicator (with "
                f"{', '.join(methods)}), got {_arrays.describe(nccl_comm)}"
            )
        cupy, nccl = _import_nccl()
        self._cupy, self._nccl = cupy, nccl
        self._comm = nccl_comm
        self._rank = int(nccl_comm.rank_id())
        self._size = int(nccl_comm.size())
        self._device = int(nccl_comm.device_id())
        self._dtypes = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}

    @classmethod
    def from_mpi(cls, mpi_comm: Any = None) -> NCCLCommunicator:
        """An NCCL communicator over the processes of ``mpi_comm`` (``MPI.COMM_WORLD`` if None).

        Rank 0 creates NCCL's unique id and broadcasts it over MPI; every process then joins with
        its MPI rank, on CuPy's current device. A collective call: every process of
        ``mpi_comm`` must make it.
        """
        MPI = _import_mpi()
        if mpi_comm is None:
            mpi_comm = MPI.COMM_WORLD
        if isinstance(mpi_comm, MPICommunicator):
            mpi_comm = mpi_comm.comm
        if not isinstance(mpi_comm, MPI.Intracomm):
            raise TypeError(
                f"mpi_comm must be an mpi4py.MPI.Intracomm, an MPICommunicator or None, "
                f"got {_arrays.describe(mpi_comm)}"
            )
        _, nccl = _import_nccl()
        rank, size = int(mpi_comm.Get_rank()), int(mpi_comm.Get_size())
        uid = nccl.get_unique_id() if rank == 0 else None
        uid = mpi_comm.bcast(uid, root=0)
        return cls(nccl.NcclCommunicator(size, uid, rank))

    @property
    def nccl_comm(self) -> Any:
        """The wrapped ``cupy.cuda.nccl.NcclCommunicator``."""
        return self._comm

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self._size

    @property
    def device_id(self) -> int:
        """The GPU the NCCL communicator was made for."""
        return self._device

    def check_backend(self, backend: Backend) -> None:
        dev = getattr(backend.device, "id", backend.device)
        if backend.name != "cupy" or dev != self._device:
            raise TypeError(
                f"NCCLCommunicator reduces CuPy arrays on CUDA device {self._device}, but the layer "
                f"lives on backend {backend.name!r}, device {backend.device!r}; use backend='cupy' "
                f"on device {self._device}, or an MPICommunicator"
            )

    def allreduce_sum(self, buf: Array) -> Array:
        check_buffer(buf)
        if not _is_cupy(buf):
            raise TypeError(f"NCCLCommunicator reduces CuPy arrays, got {_arrays.describe(buf)}")
        dev = int(buf.device.id)
        if dev != self._device:
            raise TypeError(
                f"the buffer is on CUDA device {dev}, the NCCL communicator on device {self._device}"
            )
        cupy = self._cupy
        with cupy.cuda.Device(self._device):
            send = cupy.ascontiguousarray(buf)
            out = cupy.empty_like(send)
            stream = cupy.cuda.get_current_stream()
            self._comm.allReduce(
                send.data.ptr,
                out.data.ptr,
                send.size,
                self._dtypes[send.dtype],
                self._nccl.NCCL_SUM,
                stream.ptr,
            )
        return out

    def __repr__(self) -> str:
        return f"NCCLCommunicator(rank={self._rank}, size={self._size}, device={self._device})"
