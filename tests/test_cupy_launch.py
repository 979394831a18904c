"""The CUDA kernels' launch configuration, on the CPU: layouts, fallbacks, vector widths, grids,
workspace, 32-bit index safety, and a model of each kernel's index walk that must visit every
element exactly once. (tests/test_kernels_host.py runs the kernels themselves on the CPU;
tests/test_kernels_cupy.py on a GPU.)"""

from __future__ import annotations

import importlib
import inspect
import itertools
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from xbn import backends, functional
from xbn.kernels import _launch as L
from xbn.kernels import _source

ROOT = Path(__file__).resolve().parent.parent

# Shapes with the edge cases the kernels must survive: C = 1, C = 3, S = 1, S = 7, primes,
# large C with tiny spatial, tiny C with large spatial, middle and last channel axes.
SHAPES = [
    ((2, 1, 5, 5), 1),
    ((7, 3, 1, 1), 1),
    ((4, 3, 7), 1),
    ((13, 3, 7, 1), 1),
    ((5, 11, 13), 1),
    ((3, 2048, 1, 1), 1),
    ((2, 1024, 2, 2), 1),
    ((2, 3, 224, 224), 1),
    ((1, 2, 100003), 1),
    ((17, 5), 1),
    ((4096, 1024), 1),
    ((64, 7, 7, 3), 3),
    ((64, 7, 7, 3), -1),
    ((8, 5, 9, 4), 2),
    ((1, 1), 1),
    ((2, 1), 0),
    ((9,), 0),
    ((31, 4, 1), 1),
    ((6, 8, 3), 2),
]


# -- layouts and fallbacks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "axis", "expected"),
    [
        ((8, 64, 56, 56), 1, L.Layout("ncl", 8, 64, 3136)),
        ((8, 56, 56, 64), 3, L.Layout("nlc", 8 * 56 * 56, 64, 1)),
        ((8, 56, 56, 64), -1, L.Layout("nlc", 8 * 56 * 56, 64, 1)),
        ((4096, 1024), 1, L.Layout("nlc", 4096, 1024, 1)),
        ((32, 16, 10), 1, L.Layout("ncl", 32, 16, 10)),
        ((2, 3, 4, 5, 6), 1, L.Layout("ncl", 2, 3, 120)),
        ((8, 64, 1, 1), 1, L.Layout("nlc", 8, 64, 1)),  # S == 1 is channels-last
        ((8, 1, 5, 5), 1, L.Layout("ncl", 1, 1, 200)),  # C == 1: one long channel
        ((8, 1), 1, L.Layout("ncl", 1, 1, 8)),
        ((8, 5, 9, 4), 2, L.Layout("ncl", 40, 9, 4)),  # a middle axis of a contiguous array
        ((9, 4), 0, L.Layout("ncl", 1, 9, 4)),
        ((7,), 0, L.Layout("nlc", 1, 7, 1)),
    ],
)
def test_layout(shape, axis, expected):
    assert L.plan_layout(shape, axis, c_contiguous=True) == expected


@pytest.mark.parametrize(
    ("shape", "axis", "contiguous", "reason"),
    [
        ((8, 64, 5, 5), 1, False, "not C-contiguous"),
        ((0, 64, 5, 5), 1, True, "empty input"),
        ((8, 64, 0), 1, True, "empty input"),
        ((), 0, True, "0-d input has no channel axis"),
        ((4, 5), 2, True, "axis 2 out of range for 2-D input"),
        ((4, 5), -3, True, "axis -3 out of range for 2-D input"),
        ((2**16, 2**15), 1, True, "2147483648 elements: more than the kernels' 32-bit indexing allows"),
    ],
)
def test_fallback(shape, axis, contiguous, reason):
    got = L.plan_layout(shape, axis, c_contiguous=contiguous)
    assert isinstance(got, L.Fallback)
    assert got.reason == reason


def test_index_limit_boundary():
    n = L.INDEX_LIMIT - 1
    assert isinstance(L.plan_layout((n, 1), 0, c_contiguous=True), L.Layout)
    assert isinstance(L.plan_layout((n + 1, 1), 0, c_contiguous=True), L.Fallback)


def test_dtypes():
    assert L.dtype_key("float32") == "f32" and L.accumulator_dtype("float32") == "float32"
    assert L.dtype_key("float64") == "f64" and L.accumulator_dtype("float64") == "float64"
    assert L.dtype_key("float16") == "f16" and L.accumulator_dtype("float16") == "float32"
    assert L.dtype_key("bfloat16") == "bf16" and L.accumulator_dtype("bfloat16") == "float32"
    for name in ("int32", "complex64", "bool", "uint16"):
        assert L.dtype_key(name) is None and L.accumulator_dtype(name) is None
    assert set(_source.DTYPE_KEYS) == {k for k, _ in L.DTYPES.values()}


# -- vector width ------------------------------------------------------------------------------


@pytest.mark.parametrize(("itemsize", "wide", "half"), [(4, 4, 2), (8, 2, 1), (2, 8, 4)])
def test_vector_width(itemsize, wide, half):
    ncl = L.Layout("ncl", 4, 3, wide * 5)
    assert L.vector_width(ncl, itemsize, (0, 256, 4096)) == wide
    assert L.vector_width(ncl, itemsize, (0, 256 + itemsize)) == 1  # a misaligned pointer
    assert L.vector_width(ncl, itemsize, (8,)) == half  # 8-byte aligned only
    assert L.vector_width(ncl, itemsize, (0, 24)) == half
    odd = L.Layout("ncl", 4, 3, wide * 5 + 1)
    assert L.vector_width(odd, itemsize, (0,)) == 1  # S odd
    if half > 1:  # S % W != 0, S % (W/2) == 0
        assert L.vector_width(L.Layout("ncl", 4, 3, wide * 5 + half), itemsize, (0,)) == half
    nlc = L.Layout("nlc", 100, wide * 3, 1)
    assert L.vector_width(nlc, itemsize, (0,)) == wide
    assert L.vector_width(L.Layout("nlc", 100, wide * 3 + 1, 1), itemsize, (0,)) == 1  # C odd
    assert L.vector_width(ncl, itemsize) == wide  # no pointers: aligned


def test_vector_width_of_common_shapes():
    fp16_14x14 = L.plan_layout((128, 256, 14, 14), 1, c_contiguous=True)
    assert L.vector_width(fp16_14x14, 2) == 4  # 8-byte loads
    assert L.vector_width(fp16_14x14, 4) == 4  # float4
    assert L.vector_width(L.plan_layout((128, 512, 7, 7), 1, c_contiguous=True), 2) == 1


def _widths(layout: L.Layout, itemsize: int) -> set[int]:
    run = layout.inner if layout.kind == "ncl" else layout.channels
    return {1} | {n // itemsize for n in L.VECTOR_BYTES if n // itemsize > 1 and run % (n // itemsize) == 0}


# -- launch plans ------------------------------------------------------------------------------


def _layouts():
    for shape, axis in SHAPES:
        layout = L.plan_layout(shape, axis, c_contiguous=True)
        assert isinstance(layout, L.Layout), (shape, axis)
        yield shape, layout


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@pytest.mark.parametrize("op", L.OPS)
@pytest.mark.parametrize("itemsize", [2, 4, 8])
@pytest.mark.parametrize("sm_count", [1, 8, 132])
def test_plan_invariants(op, itemsize, sm_count):
    for _shape, layout in _layouts():
        for vec in _widths(layout, itemsize):
            p = L.plan(op, layout, vec, sm_count=sm_count, threads_per_sm=1024)
            gx, gy, gz = p.grid
            bx, by, bz = p.block
            assert gz == 1 and bz == 1
            assert 1 <= bx * by <= L.MAX_THREADS
            assert 1 <= gx <= L.MAX_GRID_X and 1 <= gy <= L.MAX_GRID_Y
            assert p.parts == gy
            assert p.kernel == f"xbn_{op}_{layout.kind}_v{vec}"
            if layout.kind == "ncl":
                n, c, sv, chunk = p.args
                assert (n, c) == (layout.outer, layout.channels) and sv * vec == layout.inner
                assert bx % 32 == 0 and _is_pow2(bx) and _is_pow2(by)  # whole warps (shuffles)
                assert gx * by >= c and (gx - 1) * by < c  # no block without channels
                if by > 1:  # channels packed only where one needs no more than a group per thread
                    assert op == "inference" and gy == 1 and bx * L.UNROLL >= n * sv
                    assert gx >= min(sm_count, c)
                extent = n * sv
            else:
                rows, cvs, chunk = p.args
                assert rows == layout.outer and cvs * vec == layout.channels
                assert _is_pow2(bx) and _is_pow2(by) and bx <= 32  # TY a power of 2 (tree)
                assert gx * bx >= cvs and (gx - 1) * bx < cvs  # no block without channels
                extent = rows
            # Every slice non-empty, together exactly the extent.
            assert chunk * gy >= extent and chunk * (gy - 1) < extent
            if op in L.REDUCTIONS and gy > 1:
                assert p.workspace == layout.channels * gy and p.counters == gx
                wave = sm_count * max(1, min(L.BLOCKS_PER_SM, 1024 // (bx * by)))
                assert gx * gy <= wave, "a split reduction must fit in one wave"
                assert 1 <= p.merge_per_thread <= L.UNROLL, "at most UNROLL partials a thread"
            else:
                assert p.workspace == 0 and p.counters == 0 and p.merge_per_thread == 0


def test_plan_fills_the_gpu_for_small_c_and_splits_nothing_for_large_c():
    sm = 132
    small_c = L.plan(
        "backward_reduce", L.Layout("ncl", 32, 3, 224 * 224), 4, sm_count=sm, threads_per_sm=1024
    )
    assert small_c.grid[0] * small_c.grid[1] > sm * 3  # most of one wave of 4 blocks/SM
    large_c = L.plan("backward_reduce", L.Layout("ncl", 128, 2048, 49), 1, sm_count=sm, threads_per_sm=1024)
    assert large_c.parts == 1 and large_c.workspace == 0
    cl = L.plan("stats", L.Layout("nlc", 4096, 1024, 1), 4, sm_count=sm, threads_per_sm=1024)
    # 16 channel vectors a block, not 32: the last block merges at most UNROLL partials a thread
    assert cl.block == (16, 16, 1) and cl.grid[0] == 16 and cl.parts > 1
    assert cl.grid[0] * cl.grid[1] <= sm * 4
    tiny = L.plan("stats", L.Layout("ncl", 2, 100000, 3), 1, sm_count=sm, threads_per_sm=1024)
    assert tiny.block == (32, 1, 1) and tiny.parts == 1  # six values a channel: one warp
    tiny = L.plan("inference", L.Layout("ncl", 2, 100000, 3), 1, sm_count=sm, threads_per_sm=1024)
    assert tiny.block == (32, 8, 1) and tiny.grid == (12500, 1, 1)  # eight channels a block


def _reference_configs():
    """Every GPU reference configuration and every CPU reference shape (float32 and float16)."""
    from xbn.bench import REFERENCE_SHAPES
    from xbn.bench.gpu import REFERENCE

    configs = [(c.shape, c.axis, c.dtype) for c in REFERENCE]
    for shape, axis, _ in REFERENCE_SHAPES:
        configs += [(shape, axis, "float32"), (shape, axis, "float16")]
    return configs


def _blocks_without_merge_bound(layout: L.Layout, vec: int, sm_count: int, tps: int) -> int:
    """Blocks of a reduction as planned before the merge bound: the widest channels-last block,
    as many parts as a wave or the data allow."""
    if layout.kind == "ncl":
        mv = layout.outer * layout.inner // vec
        threads = min(L.MAX_THREADS, max(32, L.next_pow2(-(-mv // L.UNROLL))))
        wave = sm_count * max(1, min(L.BLOCKS_PER_SM, tps // threads))
        return layout.channels * max(1, min(wave // layout.channels, -(-mv // (threads * L.UNROLL))))
    cvs = layout.channels // vec
    tx = min(32, L.next_pow2(cvs))
    ty = min(L.MAX_THREADS // tx, max(L.next_pow2(-(-layout.outer // L.UNROLL)), max(1, 32 // tx)))
    gx = -(-cvs // tx)
    wave = sm_count * max(1, min(L.BLOCKS_PER_SM, tps // (tx * ty)))
    return gx * max(1, min(wave // gx, -(-layout.outer // (ty * L.UNROLL))))


@pytest.mark.parametrize(
    ("shape", "axis", "dtype"),
    _reference_configs(),
    ids=[f"{'x'.join(map(str, s))}-ax{a}-{d}" for s, a, d in _reference_configs()],
)
def test_merge_of_every_reference_shape_is_at_most_unroll_partials_a_thread(shape, axis, dtype):
    """A split reduction's last block merges at most UNROLL partials per thread (channels-last,
    up to 66 before, one L2 round trip after another), and keeps at least 90% of the blocks it
    had: on an H100/H200 (132 SMs) and an A100 (108 SMs), at the occupancies the kernels have
    (6 or 8 blocks of 256 threads an SM), and on a small GPU. With the vector width aligned
    arrays get; a misaligned (scalar) channels-last view may merge in more rounds instead."""
    layout = L.plan_layout(shape, axis, c_contiguous=True)
    itemsize = 2 if dtype == "float16" else 4
    for sm_count, tps in ((132, 2048), (132, 1536), (108, 2048), (108, 1536), (8, 512)):
        for vec in _widths(layout, itemsize):
            for op in L.REDUCTIONS:
                p = L.plan(op, layout, vec, sm_count=sm_count, threads_per_sm=tps)
                if vec == L.vector_width(layout, itemsize) or layout.kind == "ncl":
                    assert p.merge_per_thread <= L.UNROLL, (p, sm_count)
                before = _blocks_without_merge_bound(layout, vec, sm_count, tps)
                rows = p.block[1] if layout.kind == "ncl" else 1  # channels a block holds
                assert p.grid[0] * p.grid[1] * rows >= 0.9 * before, (p, before)
                if layout.kind == "nlc":  # a row segment of at least a sector
                    assert p.block[0] * vec >= min(L.MIN_ROW_ELEMENTS, layout.channels), p


def test_merge_bound_narrows_channels_last_blocks():
    """256x56x56x64 float32 on an H100: the channels-last reduction used one column of
    16x16-thread blocks split 1055 ways (66 partials per merging thread); now four columns of
    4x64 threads split 256 ways, four partials each, the same number of blocks within 3%."""
    layout = L.plan_layout((256, 56, 56, 64), -1, c_contiguous=True)
    p = L.plan("stats", layout, 4, sm_count=132, threads_per_sm=2048)
    assert (p.block, p.grid, p.merge_per_thread) == ((4, 64, 1), (4, 256, 1), 4)
    tall = L.plan(
        "backward_reduce",
        L.plan_layout((65536, 1024), 1, c_contiguous=True),
        4,
        sm_count=132,
        threads_per_sm=2048,
    )
    assert tall.merge_per_thread <= 2 and tall.grid[0] * tall.grid[1] >= 1024
    # elementwise passes keep the widest blocks: they merge nothing
    ew = L.plan("scale_shift", layout, 4, sm_count=132, threads_per_sm=2048)
    assert ew.block == (16, 16, 1)


def test_unsplit_plans_for_graph_capture():
    layout = L.plan_layout((2, 3, 224, 224), 1, c_contiguous=True)
    split = L.plan("stats_fused", layout, 4, sm_count=132)
    whole = L.plan("stats_fused", layout, 4, sm_count=132, split=False)
    assert split.parts > 1 and split.workspace and split.counters
    assert (whole.parts, whole.workspace, whole.counters, whole.grid) == (1, 0, 0, (3, 1, 1))
    assert whole.args[3] == 2 * 224 * 224 // 4  # the whole channel
    nlc = L.plan(
        "backward_reduce", L.plan_layout((4096, 8), 1, c_contiguous=True), 4, sm_count=132, split=False
    )
    assert (nlc.parts, nlc.workspace, nlc.counters) == (1, 0, 0)
    # elementwise plans do not change
    assert L.plan("scale_shift", layout, 4, sm_count=132, split=False) == L.plan(
        "scale_shift", layout, 4, sm_count=132
    )


@pytest.mark.parametrize(
    ("shape", "rows"),
    [
        ((8, 2048, 7, 7), 2),  # 392 values a channel: 128 threads each, two channels a block
        ((1, 2048, 7, 7), 8),  # 49 values: a warp each, eight a block
        ((8, 256, 7, 7), 1),  # two a block would leave SMs without one
        ((128, 2048, 7, 7), 1),  # a channel fills its block
    ],
)
def test_small_channels_share_inference_blocks(shape, rows):
    """An eval batch of a late layer (N*H*W < 1024) is many small channels: the inference kernel
    takes several a block; the other families keep a block a channel (their kernels would pay
    8 registers for the row index)."""
    layout = L.plan_layout(shape, 1, c_contiguous=True)
    p = L.plan("inference", layout, 1, sm_count=132, threads_per_sm=2048)
    assert p.block[1] == rows and p.grid[0] == -(-layout.channels // rows), p
    assert p.block[0] * rows <= L.MAX_THREADS
    for op in L.OPS:
        if op != "inference":
            q = L.plan(op, layout, 1, sm_count=132, threads_per_sm=2048)
            assert q.block[1] == 1 and q.grid[0] == layout.channels, (op, q)


def test_plan_elementwise_caps_grid_y():
    p = L.plan("scale_shift", L.Layout("ncl", 1, 1, L.INDEX_LIMIT - 1), 1, sm_count=132)
    assert L.MAX_GRID_Y - 2 <= p.grid[1] <= L.MAX_GRID_Y
    assert p.args[3] * p.grid[1] >= L.INDEX_LIMIT - 1


def test_plan_rejects_bad_requests():
    with pytest.raises(ValueError, match="unknown kernel family"):
        L.plan("normalize", L.Layout("ncl", 1, 1, 4), 1, sm_count=1)
    with pytest.raises(ValueError, match="does not divide"):
        L.plan("stats", L.Layout("ncl", 1, 2, 6), 4, sm_count=1)
    with pytest.raises(ValueError, match="is not 1, 2, 4 or 8"):
        L.plan("stats", L.Layout("ncl", 1, 2, 6), 3, sm_count=1)
    with pytest.raises(ValueError, match="does not divide"):
        L.plan("stats", L.Layout("nlc", 5, 6, 1), 4, sm_count=1)


def test_int32_headroom():
    """The largest index any thread forms (its last group overshoots the end by up to UNROLL
    blocks) stays below 2**31 for the largest accepted array."""
    n = L.INDEX_LIMIT - 1
    for op in L.OPS:
        for layout in (
            L.Layout("ncl", 1, 1, n),
            L.Layout("ncl", n // 7, 7, 1 + 0),
            L.Layout("nlc", n // 3, 3, 1),
        ):
            if layout.kind == "ncl" and layout.inner == 1:
                continue
            p = L.plan(op, layout, 1, sm_count=132)
            if layout.kind == "ncl":
                _, c, sv, chunk = p.args
                overshoot = p.grid[1] * chunk + L.UNROLL * p.block[0] + p.block[0]
            else:
                rows, cvs, chunk = p.args
                overshoot = (p.grid[1] * chunk + L.UNROLL * p.block[1]) * cvs
            assert overshoot < 2**31, (op, layout, p)


def test_arguments_order_matches_kernel_signatures():
    """ARGUMENTS lists exactly the kernel parameters before the plan's ints."""
    for op in L.OPS:
        text = _source.kernel_source(L.SOURCE_OF[op])
        for kind, ints in (
            ("ncl", ("n_outer", "channels", "sv", "chunk")),
            ("nlc", ("rows", "cvs", "chunk_rows")),
        ):
            marker = f"xbn_{op}_{kind}_##SUFFIX("
            start = text.replace("\\\n", " ").index(marker)
            body = text.replace("\\\n", " ")[start + len(marker) :]
            params = body[: body.index(")")]
            names = [p.strip().split()[-1].lstrip("*") for p in params.split(",")]
            expected = [_kernel_param(op, n) for n in L.ARGUMENTS[op]] + list(ints)
            assert names == expected, (op, kind, names)


def _kernel_param(op: str, name: str) -> str:
    # The kernels name the partials after what they hold.
    renames = {
        "stats": {"ws_a": "ws_mean", "ws_b": "ws_m2", "mean": "mean_out", "var": "var_out"},
        "backward_reduce": {
            "ws_a": "ws_dy",
            "ws_b": "ws_dy_xmu",
            "sum_dy": "sum_dy_out",
            "sum_dy_xmu": "sum_dy_xmu_out",
        },
        "stats_fused": {"ws_a": "ws_mean", "ws_b": "ws_m2"},
        "backward_reduce_fused": {"ws_a": "ws_dy", "ws_b": "ws_dy_xmu"},
    }
    return renames.get(op, {}).get(name, name)


# -- a model of each kernel's index walk --------------------------------------------------------


def _ncl_walk(p: L.LaunchPlan) -> np.ndarray:
    """Vector indices each thread of an ncl kernel touches, as the .cu loops compute them
    (xbn_ncl_walk: carry instead of divide). Returns the visit count of every vector."""
    n_outer, c_count, sv, chunk = p.args
    threads, rows = p.block[0], p.block[1]
    visits = np.zeros(n_outer * c_count * sv, dtype=np.int64)
    mv = n_outer * sv
    for bx, part, y in itertools.product(range(p.grid[0]), range(p.grid[1]), range(rows)):
        c = bx * rows + y  # a channel per row of the block
        if c >= c_count:
            continue
        begin = part * chunk
        end = min(begin + chunk, mv)
        step_n, step_s = divmod(threads, sv)
        for t in range(threads):
            m = begin + t
            n, s = divmod(m, sv)
            while m < end:
                for _ in range(L.UNROLL):
                    if m < end:
                        off = n * c_count * sv + s + c * sv
                        assert 0 <= off < visits.size
                        visits[off] += 1
                    m += threads
                    n += step_n
                    s += step_s
                    if s >= sv:
                        s -= sv
                        n += 1
    return visits


def _nlc_walk(p: L.LaunchPlan) -> np.ndarray:
    rows, cvs, chunk = p.args
    tx, ty = p.block[0], p.block[1]
    visits = np.zeros(rows * cvs, dtype=np.int64)
    for bx, part in itertools.product(range(p.grid[0]), range(p.grid[1])):
        r0, r1 = part * chunk, min(part * chunk + chunk, rows)
        for x, y in itertools.product(range(tx), range(ty)):
            cv = bx * tx + x
            if cv >= cvs:
                continue
            r = r0 + y
            while r < r1:
                for u in range(L.UNROLL):
                    rr = r + u * ty
                    if rr < r1:
                        visits[rr * cvs + cv] += 1
                r += L.UNROLL * ty
    return visits


@pytest.mark.parametrize("op", ["stats", "scale_shift", "backward_reduce"])
def test_index_walk_visits_every_element_once(op):
    rng = random.Random(0)
    shapes = [s for s in SHAPES if np.prod(s[0]) <= 20_000]
    for _ in range(20):
        nd = rng.randint(2, 4)
        shape = tuple(rng.choice([1, 2, 3, 5, 7, 8, 13, 16, 31, 64]) for _ in range(nd))
        if np.prod(shape) <= 20_000:
            shapes.append((shape, rng.randrange(nd)))
    for shape, axis in shapes:
        layout = L.plan_layout(shape, axis, c_contiguous=True)
        for itemsize in (2, 4):
            for vec in _widths(layout, itemsize):
                for sm in (1, 8, 132):
                    p = L.plan(op, layout, vec, sm_count=sm, threads_per_sm=512)
                    visits = _ncl_walk(p) if layout.kind == "ncl" else _nlc_walk(p)
                    assert visits.size * vec == layout.numel
                    assert np.all(visits == 1), (shape, axis, vec, p)


# -- sources and the registered fast paths ------------------------------------------------------


@pytest.mark.parametrize(("key", "itemsize"), [("f32", 4), ("f64", 8), ("f16", 2), ("bf16", 2)])
def test_sources_define_every_planned_kernel(key, itemsize):
    defined = set()
    for name in _source.SOURCES:
        defined |= set(_source.kernel_names(name, key))
        text = _source.kernel_source(name)
        assert "#include" not in text.replace("#include <", "")  # local headers inlined
        assert "XBN_COMMON_CUH" in text
    widths = {1} | {n // itemsize for n in L.VECTOR_BYTES if n // itemsize > 1}
    assert set(L.WIDTHS[key]) == widths
    planned = {f"xbn_{op}_{k}_v{w}" for op in L.OPS for k in ("ncl", "nlc") for w in widths}
    assert planned == defined
    for op, source in L.SOURCE_OF.items():
        assert source in _source.SOURCES
        assert f"xbn_{op}_ncl_v1" in _source.kernel_names(source, key)


def test_width_macro_matches_widths_table():
    """XBN_FOR_EACH_WIDTH in the header instantiates exactly WIDTHS per item size."""
    import re

    header = _source.kernel_source("bn_stats.cu")
    found = dict(re.findall(r"#(?:el)?if XBN_ITEMSIZE == (\d)\n#define XBN_FOR_EACH_WIDTH\(M\) (.*)", header))
    other = re.search(r"#else\n#define XBN_FOR_EACH_WIDTH\(M\) (.*)", header).group(1)

    def widths(text):
        return tuple(int(w) for w in re.findall(r"M\(v\d, (\d)\)", text))

    assert widths(found["8"]) == L.WIDTHS["f64"]
    assert widths(found["4"]) == L.WIDTHS["f32"]
    assert widths(other) == L.WIDTHS["f16"] == L.WIDTHS["bf16"]


def test_epilogue_flags_match_the_header():
    """The fused kernels' flag bits: the same values in _launch.py and xbn_common.cuh."""
    import re

    header = _source.kernel_source("bn_stats.cu")
    defined = {
        m.group(1): int(m.group(2)) for m in re.finditer(r"#define XBN_(HAS_\w+|PARAMS_F64) (\d+)", header)
    }
    assert defined == {
        "HAS_WEIGHT": L.FLAG_HAS_WEIGHT,
        "HAS_BIAS": L.FLAG_HAS_BIAS,
        "HAS_RUNNING": L.FLAG_HAS_RUNNING,
        "PARAMS_F64": L.FLAG_PARAMS_F64,
    }
    bits = [L.FLAG_HAS_WEIGHT, L.FLAG_HAS_BIAS, L.FLAG_HAS_RUNNING, L.FLAG_PARAMS_F64]
    assert sorted(bits) == [1, 2, 4, 8]


def test_compile_options():
    for key in _source.DTYPE_KEYS:
        assert f"-DXBN_DTYPE_{key.upper()}" in _source.compile_options(key)
    with pytest.raises(ValueError):
        _source.compile_options("f8")


def test_cupy_module_imports_and_registers_without_cupy():
    mod = importlib.import_module("xbn.kernels.cupy")
    kernels = backends.registered_kernels("cupy")
    # the four passes and the two whole steps (fused per-channel work)
    assert set(kernels) == set(backends.OP_NAMES)
    for op, fn in kernels.items():
        assert fn is getattr(mod, op)
        # exactly the generic function's signature, xp= included
        assert inspect.signature(fn) == inspect.signature(getattr(functional, op)), op


def test_route():
    from xbn.kernels import cupy as kc

    assert kc.route((32, 64, 56, 56), "float32", axis=1) == "ncl"
    assert kc.route((32, 56, 56, 64), "bfloat16", axis=-1) == "nlc"
    assert kc.route((32, 64), "float64", axis=1) == "nlc"
    assert kc.route((32, 64, 5), "float16", axis=1, c_contiguous=False) == "generic: not C-contiguous"
    assert kc.route((32, 64), "int32", axis=1).startswith("generic: dtype")


# -- ci/check_kernels.py's log parsing -----------------------------------------------------------


def _check_kernels():
    sys.path.insert(0, str(ROOT / "ci"))
    try:
        return importlib.import_module("check_kernels")
    finally:
        sys.path.remove(str(ROOT / "ci"))


def test_check_kernels_parses_ptxas_reports():
    ck = _check_kernels()
    log = (
        "ptxas info    : 0 bytes gmem\n"
        "ptxas info    : Compiling entry function 'xbn_a' for 'sm_90'\n"
        "ptxas info    : Function properties for xbn_a\n"
        "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 48 registers, used 1 barriers, 9217 bytes smem\n"
        "ptxas info    : Compiling entry function 'xbn_b' for 'sm_90'\n"
        "ptxas info    : Function properties for xbn_b\n"
        "ptxas         .     1168 bytes stack frame, 1084 bytes spill stores, 1220 bytes spill loads\n"
        "ptxas info    : Used 32 registers, used 0 barriers, 1168 bytes cumulative stack size\n"
    )
    got = ck.parse_ptxas(log)
    assert got["xbn_a"] == {
        "registers": 48,
        "barriers": 1,
        "smem": 9217,
        "stack": 0,
        "spill_stores": 0,
        "spill_loads": 0,
    }
    assert got["xbn_b"]["spill_stores"] == 1084 and got["xbn_b"]["stack"] == 1168
    assert ck.problems_in_log(log) == []
    assert ck.problems_in_log("ptxas warning : Registers are spilled\nfine\n") == [
        "ptxas warning : Registers are spilled"
    ]
    assert len(ck.problems_in_log('k.cu(3): error #177-D: variable "x" was declared')) == 1
    assert ck.planned_kernels("f16") == {
        f"xbn_{op}_{k}_v{w}" for op in L.OPS for k in ("ncl", "nlc") for w in (1, 4, 8)
    }
    assert ck.planned_kernels("f64") == {
        f"xbn_{op}_{k}_v{w}" for op in L.OPS for k in ("ncl", "nlc") for w in (1, 2)
    }
