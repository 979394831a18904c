"""Launch configuration of the CUDA kernels: plain Python, no CuPy, unit-tested on the CPU.

Everything the CuPy wrappers decide before a launch lives here: which layout an array is seen
in (or why it falls back to the generic path), the vector width, the grid and block shapes,
and the workspace sizes. :mod:`xbn.kernels.cupy` only reads pointers and device properties and
hands them to these functions.

Layouts. A C-contiguous array with channel axis ``a`` is the 3-D view
(outer, C, inner) = (prod(shape[:a]), shape[a], prod(shape[a+1:])). The kernels see it as

* ``"ncl"``, channel-major (N, C, S): grid (C, parts), a block per slice of one channel, its
  threads walking the N planes of S contiguous values; used when S > 1 (NCHW, (N, C, L), NCDHW,
  and any other channel axis of a contiguous array), and for C == 1 as (1, 1, numel);
* ``"nlc"``, channels-last (R, C): grid (ceil(C / W / TX), parts), threads across C (TX) and
  rows (TY), blocks across rows; used when S == 1 (NHWC, (N, C) 2-D).

Examples
--------
>>> from xbn.kernels._launch import plan_layout, plan
>>> plan_layout((8, 64, 56, 56), 1, c_contiguous=True)
Layout(kind='ncl', outer=8, channels=64, inner=3136)
>>> plan_layout((4096, 1024), 1, c_contiguous=True)
Layout(kind='nlc', outer=4096, channels=1024, inner=1)
>>> plan_layout((8, 64, 56, 56), 1, c_contiguous=False).reason
'not C-contiguous'
>>> p = plan("backward_reduce", plan_layout((32, 64, 56, 56), 1, c_contiguous=True), 4,
...          sm_count=132, threads_per_sm=1024)
>>> p.kernel, p.grid, p.block
('xbn_backward_reduce_ncl_v4', (64, 8, 1), (256, 1, 1))
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "MAX_THREADS",
    "UNROLL",
    "VECTOR_BYTES",
    "MAX_GRID_X",
    "MAX_GRID_Y",
    "INDEX_LIMIT",
    "OPS",
    "REDUCTIONS",
    "WIDTHS",
    "DTYPES",
    "Layout",
    "Fallback",
    "LaunchPlan",
    "ARGUMENTS",
    "FLAG_HAS_WEIGHT",
    "FLAG_HAS_BIAS",
    "FLAG_HAS_RUNNING",
    "FLAG_PARAMS_F64",
    "arguments",
    "dtype_key",
    "accumulator_dtype",
    "kernel_name",
    "plan_layout",
    "vector_width",
    "plan",
    "next_pow2",
]

#: Threads per block, at most; the kernels' shared-memory tiles are sized by it (XBN_MAX_THREADS).
MAX_THREADS = 256
#: Independent vector loads per thread before the first use (XBN_UNROLL in the .cu files).
UNROLL = 4
#: Vector loads move 16 bytes (float4, double2, 8 halves) or, failing that, 8 bytes.
VECTOR_BYTES = (16, 8)
MAX_GRID_X = 2**31 - 1
MAX_GRID_Y = 65535
#: The kernels index with 32-bit ints; a thread's last group may run up to UNROLL blocks past
#: the end before its bound check, so arrays stay this far below 2**31 elements.
INDEX_LIMIT = 2**31 - 2**24
#: Threads an SM keeps resident on sm_80 / sm_90 (the default when the device is not asked).
THREADS_PER_SM = 2048
#: Blocks an SM keeps resident at most (sm_80 / sm_90), whatever their size.
BLOCKS_PER_SM = 32

#: Kernel families: one per pass op of :data:`xbn.backends.PASS_OPS` (``stats`` is
#: ``batch_stats``), and the two reductions whose last block goes on with the per-channel work
#: of a whole step (:data:`xbn.backends.STEP_OPS`): ``stats_fused`` (invstd, scale and shift,
#: new running statistics; the first launch of ``batch_norm_forward``) and
#: ``backward_reduce_fused`` (dgamma, dbeta, dx's coefficients; the first launch of
#: ``batch_norm_backward``); and ``inference``, the scale-shift pass that computes its
#: coefficients from the running statistics itself (``batch_norm_inference`` in one launch).
#: A family's name is its kernels' (:func:`kernel_name`) and its launcher's
#: (``xbn.kernels.cupy.launch_<family>``; ``launch_batch_stats`` for ``stats``).
OPS = (
    "stats",
    "backward_reduce",
    "scale_shift",
    "backward_apply",
    "stats_fused",
    "backward_reduce_fused",
    "inference",
)
#: The families with a grid reduction (workspace and counters when parts > 1).
REDUCTIONS = ("stats", "backward_reduce", "stats_fused", "backward_reduce_fused")
#: CUDA source of each family.
SOURCE_OF = {
    "stats": "bn_stats.cu",
    "backward_reduce": "bn_backward_reduce.cu",
    "scale_shift": "bn_elementwise.cu",
    "backward_apply": "bn_elementwise.cu",
    "stats_fused": "bn_stats.cu",
    "backward_reduce_fused": "bn_backward_reduce.cu",
    "inference": "bn_elementwise.cu",
}

#: The leading arguments of each family's kernels, in order (the plan's ints follow them):
#: arrays, except the ints ``has_shift`` (0 when scale_shift has no shift) and ``flags`` (the
#: FLAG_* bits below) and the doubles ``eps``, ``keep`` (1 - momentum), ``momentum`` and
#: ``unbias`` (M / (M - 1)). ``ws_*`` are the grid reduction's partials (``workspace`` slots
#: each; ``ws_n`` int32) and ``counters`` its zeroed uint32 counters; with ``parts == 1`` the
#: kernels never touch either. The parameter vectors (``weight``, ``bias``, ``running_*``,
#: ``new_running_*``) are float32, or float64 with FLAG_PARAMS_F64; the others are acc_t.
ARGUMENTS = {
    "stats": ("x", "mean", "var", "ws_a", "ws_b", "ws_n", "counters"),
    "backward_reduce": ("dy", "x", "mean", "sum_dy", "sum_dy_xmu", "ws_a", "ws_b", "counters"),
    "scale_shift": ("x", "scale", "shift", "has_shift", "y"),
    "backward_apply": ("dy", "x", "mean", "k_dy", "k_xmu", "k_const", "dx"),
    "stats_fused": (
        "x",
        "mean",
        "inv",
        "scale",
        "shift",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "new_running_mean",
        "new_running_var",
        "ws_a",
        "ws_b",
        "ws_n",
        "counters",
        "eps",
        "keep",
        "momentum",
        "unbias",
        "flags",
    ),
    "backward_reduce_fused": (
        "dy",
        "x",
        "mean",
        "inv",
        "weight",
        "dgamma",
        "dbeta",
        "k_dy",
        "k_xmu",
        "k_const",
        "ws_a",
        "ws_b",
        "counters",
        "flags",
    ),
    "inference": ("x", "weight", "bias", "running_mean", "running_var", "y", "eps", "flags"),
}

#: Bits of the fused and inference kernels' ``flags`` (XBN_HAS_WEIGHT ... in xbn_common.cuh).
FLAG_HAS_WEIGHT = 1
FLAG_HAS_BIAS = 2
FLAG_HAS_RUNNING = 4
FLAG_PARAMS_F64 = 8

#: Input dtype name -> (compile key, accumulator dtype name). The key selects -DXBN_DTYPE_<KEY>.
DTYPES = {
    "float32": ("f32", "float32"),
    "float64": ("f64", "float64"),
    "float16": ("f16", "float32"),
    "bfloat16": ("bf16", "float32"),
}


#: Vector widths (elements) each dtype key's kernels are instantiated for: 1, 8 bytes, 16 bytes
#: (XBN_FOR_EACH_WIDTH in xbn_common.cuh); a kernel is named by it: xbn_<op>_<layout>_v<W>.
WIDTHS = {"f32": (1, 2, 4), "f64": (1, 2), "f16": (1, 4, 8), "bf16": (1, 4, 8)}


def dtype_key(name: str) -> str | None:
    """The compile key of an input dtype ("f32", "f64", "f16", "bf16"), None if unsupported."""
    entry = DTYPES.get(str(name))
    return None if entry is None else entry[0]


def accumulator_dtype(name: str) -> str | None:
    """The dtype the kernels accumulate in, and every per-channel vector must have."""
    entry = DTYPES.get(str(name))
    return None if entry is None else entry[1]


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Layout:
    """How a kernel sees an array: ``kind`` "ncl" (outer=N, inner=S) or "nlc" (outer=R, inner=1)."""

    kind: str
    outer: int
    channels: int
    inner: int

    @property
    def numel(self) -> int:
        return self.outer * self.channels * self.inner

    @property
    def count(self) -> int:
        """Values per channel (M)."""
        return self.outer * self.inner


@dataclass(frozen=True)
class Fallback:
    """The kernels do not take this input; the generic :mod:`xbn.functional` path does."""

    reason: str


@dataclass(frozen=True)
class LaunchPlan:
    """One kernel launch: function name, grid, block, the trailing int arguments, workspace."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[int, ...]
    #: Blocks that share a channel's reduction (grid[1]); 1 means no workspace and no counters.
    parts: int
    #: acc_t slots per partial array (C * parts), 0 without a grid reduction.
    workspace: int
    #: Zeroed unsigned counters the launch needs (one per grid column), 0 without.
    counters: int

    @property
    def merge_per_thread(self) -> int:
        """Partials each thread of a reduction's last block merges (0 without a split): the
        block's threads that share a channel (the channel-major block, a column of the
        channels-last one) take the ``parts`` slots in turn."""
        if not self.workspace:
            return 0
        share = self.block[0] if "_ncl_" in self.kernel else self.block[1]
        return _cdiv(self.parts, share)


def kernel_name(op: str, kind: str, vec: int) -> str:
    """The entry point of family ``op`` for layout ``kind`` and vector width ``vec``.

    >>> kernel_name("stats_fused", "nlc", 4)
    'xbn_stats_fused_nlc_v4'
    """
    return f"xbn_{op}_{kind}_v{vec}"


def plan_layout(shape: Iterable[int], axis: int, *, c_contiguous: bool) -> Layout | Fallback:
    """The layout the kernels see ``shape`` in with channel axis ``axis``, or why they do not.

    Only C-contiguous arrays are viewed (strided, Fortran-ordered or transposed inputs go to the
    generic path, which handles any strides). Empty arrays and arrays of INDEX_LIMIT elements or
    more fall back too.
    """
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    if ndim == 0:
        return Fallback("0-d input has no channel axis")
    if not -ndim <= axis < ndim:
        return Fallback(f"axis {axis} out of range for {ndim}-D input")
    axis %= ndim
    numel = 1
    for n in shape:
        numel *= n
    if numel == 0:
        return Fallback("empty input")
    if numel >= INDEX_LIMIT:
        return Fallback(f"{numel} elements: more than the kernels' 32-bit indexing allows")
    if not c_contiguous:
        return Fallback("not C-contiguous")
    outer = 1
    for n in shape[:axis]:
        outer *= n
    inner = 1
    for n in shape[axis + 1 :]:
        inner *= n
    channels = shape[axis]
    if channels == 1:
        return Layout("ncl", 1, 1, numel)
    if inner == 1:
        return Layout("nlc", outer, channels, 1)
    return Layout("ncl", outer, channels, inner)


def vector_width(layout: Layout, itemsize: int, pointers: Iterable[int] = ()) -> int:
    """Elements per load: 16 bytes' worth, else 8 bytes' worth, else 1. A width is taken when
    every pointer is aligned to its bytes and the contiguous run (S for ncl, C for nlc) is a
    multiple of it, so no vector crosses a plane (ncl) or a row (nlc) and every vector address
    stays aligned.

    >>> vector_width(Layout("ncl", 128, 256, 196), 2)     # 14x14 float16: 196 = 4 * 49
    4
    """
    run = layout.inner if layout.kind == "ncl" else layout.channels
    pointers = [int(p) for p in pointers]
    for nbytes in VECTOR_BYTES:
        width = nbytes // int(itemsize)
        if width > 1 and run % width == 0 and all(p % nbytes == 0 for p in pointers):
            return width
    return 1


#: Elements a channels-last reduction block reads at least per row, when it has that many
#: channels: 16 elements are 32 bytes or more, a whole sector of every dtype.
MIN_ROW_ELEMENTS = 16


@functools.lru_cache(maxsize=4096)
def plan(
    op: str,
    layout: Layout,
    vec: int,
    *,
    sm_count: int,
    threads_per_sm: int = THREADS_PER_SM,
    split: bool = True,
) -> LaunchPlan:
    """Grid, block and workspace of kernel family ``op`` for ``layout`` with vector width ``vec``.

    ``threads_per_sm`` is how many threads of this kernel an SM keeps resident (the occupancy
    the device reports for it, at most 2048 on sm_80/sm_90). Reductions aim at exactly one full
    wave: a channel is split into ``parts`` blocks only while C * parts blocks still fit on the
    GPU at once (small C, large N*S), so no second, mostly empty wave doubles the time, and never
    into slices thinner than one unrolled group per thread. Elementwise launches give each thread
    one unrolled group (many small blocks, so a ragged last wave costs little), capped by the
    grid's y limit.

    A split reduction ends in its last block merging the ``parts`` partials of each channel, the
    threads that share a channel taking them in turn: ``parts`` is kept at most UNROLL times
    their number (``merge_per_thread`` <= UNROLL), and the kernels load two partials (or one
    partial's 2W + 1 values) before merging them, so the merge is a few round trips to L2
    rather than a chain as long as the split. Channels-last reductions
    get there by narrowing the block across channels (TX) for more rows (TY), down to
    MIN_ROW_ELEMENTS per row; a scalar-load plan that would still need more rounds keeps its
    blocks and merges in rounds. The channel-major inference kernel (an eval-mode forward, where
    small batches are common) gets several channels a block, one per row of threads, when a
    channel needs fewer than MAX_THREADS threads (small N*S), as long as every SM still gets a
    block: the same per-channel work, in fewer and fuller blocks.

    ``split=False`` plans a reduction without a split (``parts == 1``: no workspace, no
    counters), for launches that must not depend on memory outliving them (graph capture).

    >>> p = plan("stats", Layout("nlc", 32 * 56 * 56, 64, 1), 4, sm_count=132)
    >>> p.block, p.grid, p.merge_per_thread
    ((4, 64, 1), (4, 256, 1), 4)
    >>> plan("inference", Layout("ncl", 8, 2048, 49), 1, sm_count=132).block
    (128, 2, 1)
    """
    if op not in OPS:
        raise ValueError(f"unknown kernel family {op!r}; expected one of {OPS}")
    if vec not in (1, 2, 4, 8):
        raise ValueError(f"vector width {vec} is not 1, 2, 4 or 8")
    reduction = op in REDUCTIONS
    c = layout.channels
    if layout.kind == "ncl":
        if layout.inner % vec:
            raise ValueError(f"vector width {vec} does not divide S={layout.inner}")
        sv = layout.inner // vec
        mv = layout.outer * sv
        threads = min(MAX_THREADS, max(32, next_pow2(_cdiv(mv, UNROLL))))
        group = threads * UNROLL
        # Channels per block (the inference kernel only: the others would pay registers for
        # it): where one channel leaves the block part empty, so a channel is one group per
        # thread and no split.
        rows = 1
        if op == "inference" and threads < MAX_THREADS:
            rows = MAX_THREADS // threads
            while rows > 1 and _cdiv(c, rows) < sm_count:
                rows //= 2
        gx = _cdiv(c, rows)
        if reduction:
            wave = sm_count * max(1, min(BLOCKS_PER_SM, threads_per_sm // (threads * rows)))
            parts = min(wave // gx, _cdiv(mv, group), UNROLL * threads) if split else 1
        else:
            parts = _cdiv(mv, group)
        parts = max(1, min(parts, MAX_GRID_Y))
        chunk = _cdiv(mv, parts)
        parts = _cdiv(mv, chunk)
        if gx > MAX_GRID_X:
            raise ValueError(f"C={c} exceeds the grid's x limit")
        grid = (gx, parts, 1)
        block = (threads, rows, 1)
        args: tuple[int, ...] = (layout.outer, c, sv, chunk)
        columns = gx
    elif layout.kind == "nlc":
        if c % vec:
            raise ValueError(f"vector width {vec} does not divide C={c}")
        cvs = c // vec
        rows = layout.outer
        widest = min(32, next_pow2(cvs))
        narrowest = widest
        if reduction and split:
            narrowest = min(widest, next_pow2(_cdiv(MIN_ROW_ELEMENTS, vec)))
        tx = widest
        while True:
            # Rows per block: as many as fill MAX_THREADS, fewer for short inputs (>= a warp).
            ty_cap = MAX_THREADS // tx
            ty_need = next_pow2(_cdiv(rows, UNROLL))
            ty = min(ty_cap, max(ty_need, max(1, 32 // tx)))
            gx = _cdiv(cvs, tx)
            group = ty * UNROLL
            if not reduction:
                parts = _cdiv(rows, group)
                break
            wave = sm_count * max(1, min(BLOCKS_PER_SM, threads_per_sm // (tx * ty)))
            parts = min(wave // gx, _cdiv(rows, group)) if split else 1
            if parts <= UNROLL * ty:
                break
            if tx <= narrowest:
                # A second round of merge loads costs about what a tenth of the blocks does:
                # cap parts only where that keeps nine tenths of them.
                if 10 * UNROLL * ty >= 9 * parts:
                    parts = UNROLL * ty
                break
            tx //= 2
        parts = max(1, min(parts, MAX_GRID_Y))
        chunk = _cdiv(rows, parts)
        parts = _cdiv(rows, chunk)
        grid = (gx, parts, 1)
        block = (tx, ty, 1)
        args = (rows, cvs, chunk)
        columns = gx
    else:
        raise ValueError(f"unknown layout kind {layout.kind!r}")
    split = reduction and parts > 1
    return LaunchPlan(
        kernel=kernel_name(op, layout.kind, vec),
        grid=grid,
        block=block,
        args=args,
        parts=parts,
        workspace=c * parts if split else 0,
        counters=columns if split else 0,
    )


def arguments(op: str, plan: LaunchPlan, values: dict[str, object]) -> tuple[object, ...]:
    """The kernel's full argument tuple: ``values`` in the order of ARGUMENTS[op], then the
    plan's ints (every int argument of the kernels is a C ``int``).

    >>> p = LaunchPlan("k", (1, 1, 1), (32, 1, 1), (2, 3, 4, 5), 1, 0, 0)
    >>> arguments("scale_shift", p, {"x": "X", "scale": "A", "shift": "B", "has_shift": 1, "y": "Y"})
    ('X', 'A', 'B', 1, 'Y', 2, 3, 4, 5)
    """
    names = ARGUMENTS[op]
    missing = [n for n in names if n not in values]
    extra = [n for n in values if n not in names]
    if missing or extra:
        raise ValueError(f"{op}: missing arguments {missing}, unexpected {extra}")
    return tuple(values[n] for n in names) + tuple(plan.args)
