"""A stand-in for the parts of CuPy that xbn/kernels/cupy.py touches, backed by NumPy, whose
RawModule launches the kernels in the CPU emulator (host_kernels). It lets the wrappers'
own logic (argument assembly, workspace and placeholders, out=, fallbacks, vector widths from
real pointers, per-stream counters) run end to end without a GPU.

Fresh "device memory" (empty) is filled with NaN (and 0x5A5A5A5A for integers), as stale GPU
memory would hold garbage: an output the kernels fail to write shows up.

Streams: each thread has a current stream (``cuda.get_current_stream()``), the legacy default
stream (pointer 0) unless ``per_thread_default_stream`` is set, in which case every thread's
default stream is a stream of its own with the one pointer 2, as CuPy's with
CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1. ``capture()`` marks the current stream as being captured
into a graph. Every launch is recorded in ``launches`` and, with the pointers of its array
arguments (in order), in ``launch_pointers``; ``before_launch`` (if set) is called with the
kernel's name before a launch runs, and may raise.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np

import host_kernels as hk

SM_COUNT = 8
BLOCKS_PER_SM = 2  # occupancy the fake driver reports for 256-thread blocks

float16, float32, float64 = np.float16, np.float32, np.float64
int32, uint32 = np.int32, np.uint32
nan = np.nan
dtype = np.dtype
launches: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = []
launch_pointers: list[tuple[str, tuple[int, ...]]] = []
before_launch: Callable[[str], None] | None = None
per_thread_default_stream = False
seed = 1


class _Pointer:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class Device:
    def __init__(self, id: int = 0) -> None:
        self.id = int(id)
        self.attributes = {"MultiProcessorCount": SM_COUNT, "MaxThreadsPerMultiProcessor": 2048}

    def __eq__(self, other: object) -> bool:  # as CuPy's: the same device id
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return hash(("Device", self.id))

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False


class ndarray(np.ndarray):
    """A NumPy array with CuPy's .data.ptr and .device."""

    @property
    def data(self) -> _Pointer:  # type: ignore[override]
        return _Pointer(self.__array_interface__["data"][0])

    @property
    def device(self) -> Device:  # type: ignore[override]
        return Device(0)


def _alloc(shape: Any, dtype: Any) -> ndarray:
    """Fresh memory aligned to 256 bytes, as cudaMalloc's."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) if np.ndim(shape) else int(shape)
    raw = np.empty(n * dt.itemsize + 256, dtype=np.uint8)
    skip = (-raw.__array_interface__["data"][0]) % 256
    return raw[skip : skip + n * dt.itemsize].view(dt).reshape(shape).view(ndarray)


def asarray(a: Any, dtype: Any = None) -> ndarray:
    src = np.asarray(a, dtype=dtype)
    out = _alloc(src.shape, src.dtype)
    out[...] = src
    return out


def ascontiguousarray(a: Any) -> ndarray:
    return a if a.flags.c_contiguous else asarray(a)


def empty(shape: Any, dtype: Any = np.float32) -> ndarray:
    dt = np.dtype(dtype)
    out = _alloc(shape, dt)
    floating = dt.kind == "f" or dt.name == "bfloat16"  # ml_dtypes' bfloat16 is kind "V"
    out[...] = np.nan if floating else 0x5A5A5A5A
    return out


def zeros(shape: Any, dtype: Any = np.float32) -> ndarray:
    return full(shape, 0, dtype)


def ones(shape: Any, dtype: Any = np.float32) -> ndarray:
    return full(shape, 1, dtype)


def full(shape: Any, value: Any, dtype: Any = np.float32) -> ndarray:
    out = _alloc(shape, dtype)
    out[...] = value
    return out


class _Kernel:
    def __init__(self, key: str, name: str) -> None:
        self.key, self.name = key, name
        self.kernel = SimpleNamespace(ptr=id(self))

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        if before_launch is not None:
            before_launch(self.name)
        launches.append((self.key, self.name, tuple(grid), tuple(block)))
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        launch_pointers.append((self.name, tuple(a.__array_interface__["data"][0] for a in arrays)))
        scalars = [a for a in args if not isinstance(a, np.ndarray)]
        for a in scalars:
            # CuPy passes NumPy scalars by value in their own dtype, Python ones as 64-bit
            assert isinstance(a, (np.int32, np.float64)), (
                f"kernel scalar arguments must be int32 or float64, got {type(a)}"
            )
        ints = [int(a) for a in scalars if isinstance(a, np.int32)]
        doubles = [float(a) for a in scalars if isinstance(a, np.float64)]
        before = [np.array(a, copy=True) for a in arrays]
        after = hk.run_raw(self.key, self.name, grid, block, arrays, ints, doubles=doubles, seed=seed)
        # An array passed twice (placeholders) must only be written through one of its aliases.
        written: dict[int, int] = {}
        for i, (a, old, new) in enumerate(zip(arrays, before, after)):
            if old.tobytes() != new.tobytes():
                base = a.__array_interface__["data"][0]
                assert base not in written, (
                    f"{self.name}: argument {i} aliases written argument {written.get(base)}"
                )
                written[base] = i
                np.copyto(a, new.reshape(a.shape))


class RawModule:
    def __init__(self, code: str, options: tuple[str, ...] = ()) -> None:
        keys = [m.group(1).lower() for o in options if (m := re.fullmatch(r"-DXBN_DTYPE_(\w+)", o))]
        assert len(keys) == 1, options
        self.key = keys[0]
        self.code = code

    def get_function(self, name: str) -> _Kernel:
        assert re.search(rf"\b{re.escape(name.rsplit('_', 1)[0])}_##SUFFIX\b", self.code), name
        return _Kernel(self.key, name)


class Stream:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr
        self.capturing = False

    def is_capturing(self) -> bool:
        return self.capturing


_legacy = Stream(0)
_local = threading.local()


def get_current_stream() -> Stream:
    current = getattr(_local, "stream", None)
    if current is None:
        # every thread's own per-thread default stream, all with cudaStreamPerThread's pointer
        current = Stream(2) if per_thread_default_stream else _legacy
        _local.stream = current
    return current


@contextlib.contextmanager
def capture() -> Iterator[Stream]:
    """The current stream, captured into a graph for the duration."""
    stream = get_current_stream()
    stream.capturing = True
    try:
        yield stream
    finally:
        stream.capturing = False


def reset_streams() -> None:
    _local.__dict__.clear()
    _legacy.capturing = False


cuda = SimpleNamespace(
    Device=Device,
    Stream=Stream,
    get_current_stream=get_current_stream,
    driver=SimpleNamespace(
        occupancyMaxActiveBlocksPerMultiprocessor=lambda ptr, threads, smem: BLOCKS_PER_SM
    ),
)
