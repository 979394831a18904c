"""The GPU benchmark's CPU-side parts: reference configurations, byte counts, the choice of K
and of the rounds, the measurement loop (driven by a host clock), the rows of summary.json and
the report. Timing itself needs a GPU: ci/gpu_tier.sh runs it."""

from __future__ import annotations

import itertools
import json
import math
import time

import numpy as np
import pytest

from xbn.bench import gpu


def test_reference_configurations_measure_dram():
    large = [c for c in gpu.REFERENCE if c.label == "large"]
    assert {c.layout for c in large} == {"NCHW", "NHWC", "NC"}
    assert {c.dtype for c in large} == {"float32", "float16"}
    for c in large:
        assert c.nbytes >= 200e6  # > 3 x a 60 MB L2, in float16 too (N doubled)
        assert gpu.rotation(c.nbytes, 60 << 20) * c.nbytes > 2 * (60 << 20)
    labels = {c.label: c for c in gpu.REFERENCE}
    assert labels["odd spatial"].shape == (128, 2048, 7, 7)
    assert labels["launch-bound"].shape == (64, 16, 8, 8)
    assert gpu.REFERENCE[0].label == "large"  # the most telling first: a short run drops the end
    # Every configuration fits an 80 GB GPU with room to spare.
    assert max(gpu.memory_needed(c, gpu.rotation(c.nbytes, 50 << 20)) for c in gpu.REFERENCE) < 8e9


def test_channels_last_reference_is_the_nchw_shape_transposed():
    for dtype in ("float32", "float16"):
        nchw = next(c for c in gpu.REFERENCE if (c.layout, c.label, c.dtype) == ("NCHW", "large", dtype))
        nhwc = next(c for c in gpu.REFERENCE if (c.layout, c.dtype) == ("NHWC", dtype))
        n, c, h, w = nchw.shape
        assert nhwc.shape == (n, h, w, c) and nhwc.axis == -1 and nhwc.channels == c


def test_rotation_defeats_l2():
    l2 = 50 << 20
    for nbytes in (1 << 10, 1 << 20, 10 << 20, 51 << 20, 205 << 20, 400 << 20):
        k = gpu.rotation(nbytes, l2)
        assert 2 <= k <= 16
        # between two uses of one buffer, the other copies' x alone is >= 2 x L2
        assert k == 16 or (k - 1) * nbytes >= 2 * l2


def test_bytes_per_op():
    assert gpu.OP_BYTES["stats"] == 1 and gpu.OP_BYTES["scale_shift"] == 2
    assert gpu.OP_BYTES["backward_reduce"] == 2 and gpu.OP_BYTES["backward_apply"] == 3
    # a step moves what its passes move: forward = stats + scale_shift, backward = reduce + apply
    assert gpu.OP_BYTES["forward"] == gpu.OP_BYTES["stats"] + gpu.OP_BYTES["scale_shift"]
    assert gpu.OP_BYTES["backward"] == gpu.OP_BYTES["backward_reduce"] + gpu.OP_BYTES["backward_apply"]
    assert gpu.OP_BYTES["train_step"] == gpu.OP_BYTES["forward"] + gpu.OP_BYTES["backward"]
    assert set(gpu.OP_BYTES) == set(gpu.OPS) == set(gpu.TORCH_OPS)


def test_torch_counterparts_of_the_single_passes():
    assert gpu.TORCH_OPS["stats"] == "torch.batch_norm_stats"
    assert gpu.TORCH_OPS["scale_shift"] == "torch.batch_norm_elemt"
    assert gpu.TORCH_OPS["backward_reduce"] == "torch.batch_norm_backward_reduce"
    assert gpu.TORCH_OPS["backward_apply"] == "torch.batch_norm_backward_elemt"
    torch = pytest.importorskip("torch")
    for op in (
        "batch_norm_stats",
        "batch_norm_elemt",
        "batch_norm_backward_reduce",
        "batch_norm_backward_elemt",
        "native_batch_norm",
        "native_batch_norm_backward",
    ):
        assert hasattr(torch.ops.aten, op)


@pytest.mark.parametrize(
    "per_call, k",
    [
        (1e-2, 1),
        (2e-3, 1),
        (1e-3, 2),
        (0.3e-3, 7),
        (20e-6, 100),
        (1e-7, gpu.K_MAX),
        (0.0, gpu.K_MAX),
        (float("nan"), gpu.K_MAX),
    ],
)
def test_choose_k_fills_a_window(per_call, k):
    assert gpu.choose_k(per_call) == k
    if per_call > 0 and k < gpu.K_MAX:
        assert k * per_call >= gpu.MIN_WINDOW_S * (1 - 1e-9)


def test_plan_repeats_is_bounded_and_fits_the_budget():
    assert gpu.plan_repeats(1e-3, 10.0) == gpu.R_MAX
    assert gpu.plan_repeats(10.0, 1.0) == gpu.R_MIN
    for round_s in (1e-3, 0.05, 0.2):
        r = gpu.plan_repeats(round_s, 1.0)
        assert gpu.R_MIN <= r <= gpu.R_MAX
        assert r == gpu.R_MIN or r * round_s <= 1.0 + 1e-9


def test_op_budget_shares_the_time_left():
    assert gpu.op_budget(None, 5) == gpu.DEFAULT_OP_BUDGET_S
    assert gpu.op_budget(100.0, 50) == pytest.approx(gpu.PLAN_SHARE * 2.0)
    assert gpu.op_budget(-5.0, 3) == 0.0
    # Each op plans on a share of what is actually left: even if every op spends exactly its
    # budget, the last ones still get time and the total stays inside the budget.
    left, ops = 40.0, 64
    spent, budgets = 0.0, []
    for i in range(ops):
        budgets.append(gpu.op_budget(left - spent, ops - i))
        spent += budgets[-1]
    assert spent < left
    assert min(budgets) > 0.05 * left / ops


def _busy(seconds: float):
    def call(i: int) -> None:
        t = time.perf_counter() + seconds
        while time.perf_counter() < t:
            pass

    return call


def test_measure_batches_k_calls_per_window_with_a_host_clock():
    seen = []

    def call(i):
        seen.append(i)
        _busy(2e-4)(i)

    result = gpu.measure(
        {
            "slow": gpu.Case(call, gpu.HostTimer(), copies=3),
            "fast": gpu.Case(_busy(2e-5), gpu.HostTimer(), copies=3),
        },
        budget_s=0.05,
    )
    slow, fast = result["slow"], result["fast"]
    assert slow["k"] * slow["median_s"] >= gpu.MIN_WINDOW_S * 0.9  # windows of >= 1 ms
    assert fast["k"] > slow["k"]
    assert gpu.R_MIN <= slow["rounds"] == len(slow["samples"]) <= gpu.R_MAX
    assert 1.5e-4 < slow["median_s"] < 2e-3
    assert set(seen) == {0, 1, 2}  # input sets rotate
    assert all(b == (a + 1) % 3 for a, b in itertools.pairwise(seen))


def test_measure_records_an_implementation_that_fails_and_keeps_the_others():
    def broken(i):
        raise RuntimeError("no such op here")

    result = gpu.measure(
        {"xbn": gpu.Case(_busy(1e-4), gpu.HostTimer(), 2), "torch": gpu.Case(broken, gpu.HostTimer(), 2)},
        budget_s=0.01,
    )
    assert "median_s" in result["xbn"]
    assert result["torch"] == {"error": "RuntimeError: no such op here"}


def test_bench_row_ratios():
    cfg = gpu.Config((65536, 1024), 1, "NC", "float32", "large")
    row = gpu.bench_row(cfg, "train_step", {"xbn": 4e-4, "torch": 5e-4, "generic": 4e-3}, 3.0e12)
    assert row["name"] == "train_step" and row["shape"] == [65536, 1024]
    assert row["layout"] == "NC" and row["dtype"] == "float32"
    assert row["us"] == 400.0
    assert row["fraction_of_copy"] == pytest.approx(8 * cfg.nbytes / 4e-4 / 3.0e12, rel=1e-3)
    assert row["vs_torch"] == 0.8 and row["vs_generic"] == 10.0
    missing = gpu.bench_row(cfg, "stats", {"xbn": 1e-4}, None, error=None)
    assert missing["vs_torch"] is None and missing["vs_generic"] is None
    assert missing["fraction_of_copy"] is None
    failed = gpu.bench_row(cfg, "stats", {}, 3e12, error="RuntimeError: x")
    assert failed["us"] is None and failed["error"] == "RuntimeError: x"
    json.dumps([row, missing, failed])


def test_plan_text_and_the_plan_option_need_no_gpu(capsys):
    assert gpu.main(["--plan", "--budget-s", "37"]) == 0
    out = capsys.readouterr().out
    assert "512x56x56x64 NHWC float16" in out and "planned within 37 s" in out
    assert len([ln for ln in out.splitlines() if " MB " in ln]) == len(gpu.REFERENCE)
    text = gpu.plan_text(gpu.REFERENCE[:1], memory_bytes=1 << 30)
    assert "does not fit" in text


def test_shapes_options():
    parser = gpu.build_parser()

    def configs(*argv):
        return gpu.checked_configs(parser, parser.parse_args([*argv, "--plan"]))

    assert configs("--shapes", "8x3x5x5", "16x7x7x3:-1", "--dtype", "float16") == [
        gpu.Config((8, 3, 5, 5), 1, "NCHW", "float16", "custom"),
        gpu.Config((16, 7, 7, 3), -1, "NHWC", "float16", "custom"),
    ]
    assert configs() == gpu.REFERENCE
    assert len(configs("--quick")) == len(gpu.QUICK)


@pytest.mark.parametrize(
    "argv",
    [
        ["--shapes", "4xAx5"],
        ["--shapes", "8x4:5"],
        ["--shapes", "8x0x4"],
        ["--shapes", "7"],
        ["--budget-s", "-1"],
        ["--budget-s", "inf"],
        ["--outputs", "json,pdf"],
    ],
)
def test_bad_options_are_refused_before_anything_runs(argv, capsys):
    with pytest.raises(SystemExit) as e:
        gpu.main([*argv, "--plan"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"argument {argv[0]}" in captured.err


def test_an_output_folder_that_cannot_be_written_is_refused(tmp_path, capsys):
    plain = tmp_path / "a-file"
    plain.write_text("")
    for option in ("--out", "--summary"):
        with pytest.raises(SystemExit):
            gpu.main([option, str(plain / "sub" / "summary.json")])
        assert f"argument {option}: cannot write" in capsys.readouterr().err
    assert gpu.main(["--plan", "--out", str(plain / "sub")]) == 0  # --plan writes nothing


def _rows():
    rows = []
    for i, cfg in enumerate(gpu.REFERENCE[:2]):
        for op in gpu.OPS:
            rows.append(
                gpu.bench_row(
                    cfg,
                    op,
                    {"xbn": 1e-4 * (i + 1), "torch": 1.2e-4, "generic": 5e-4},
                    3.0e12,
                    k={"xbn": 20},
                    rounds=9,
                    error=None,
                    errors=None,
                )
            )
    rows.append(gpu.bench_row(gpu.REFERENCE[2], "stats", {}, 3e12, error="skipped: time budget spent"))
    return rows


def test_markdown_report():
    meta = {
        "gpu": {
            "gpu": "Test GPU",
            "compute_capability": "90",
            "sm_count": 132,
            "l2_bytes": 50 << 20,
            "driver": "1.0",
            "cuda_runtime": 13000,
            "cupy": "14.0",
            "torch": "2.11",
            "torch_cuda": "13.0",
        },
        "copy_bandwidth_GBps": 3000.0,
        "skipped": ["64x16x8x8 NCHW float32: time budget spent"],
        "command": "xbn bench --gpu",
    }
    text = gpu.markdown(_rows(), meta)
    assert "Test GPU" in text and "sm_90" in text and "3000 GB/s" in text
    assert "| 256x64x56x56 | NCHW | float32 | train_step | 100.0 | 120.0 | 500.0 |" in text
    assert "skipped: time budget spent" in text and "64x16x8x8 NCHW float32" in text


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    gpu.write_plot(tmp_path / "gpu.png", _rows())
    assert (tmp_path / "gpu.png").stat().st_size > 1000


def test_without_gpu_main_says_why(tmp_path, capsys):
    try:
        from xbn import backends

        backends.resolve("cupy")
    except Exception:
        assert gpu.main(["--quick", "--out", str(tmp_path)]) == 2
        assert "xbn bench --gpu:" in capsys.readouterr().err
    else:  # a GPU machine: ci/gpu_tier.sh runs the benchmark itself
        pytest.skip("a GPU is usable here: the benchmark runs in ci/gpu_tier.sh")


def test_fraction_of_copy_is_bytes_over_time_over_bandwidth():
    cfg = gpu.REFERENCE[0]
    for op, n in gpu.OP_BYTES.items():
        row = gpu.bench_row(cfg, op, {"xbn": 2e-4}, 4e12)
        assert math.isclose(row["fraction_of_copy"], n * cfg.nbytes / 2e-4 / 4e12, rel_tol=1e-3)
    assert np.dtype(gpu.REFERENCE[3].dtype).itemsize == 2


def test_run_config_plumbing_on_the_host(monkeypatch):
    """run_config end to end with NumPy standing in for CuPy and a host clock for the events:
    every op of both xbn implementations runs, through the registry and the layer, and each
    gives a row. (Only the plumbing: the numbers mean nothing here.)"""
    import dataclasses
    import sys
    from types import SimpleNamespace

    from xbn import backends

    def random_state(seed):
        rng = np.random.default_rng(seed)
        return SimpleNamespace(standard_normal=lambda shape, dtype: rng.standard_normal(shape, dtype=dtype))

    shim = SimpleNamespace(
        float32=np.float32,
        float64=np.float64,
        ones=np.ones,
        zeros=np.zeros,
        full=np.full,
        sqrt=np.sqrt,
        random=SimpleNamespace(RandomState=random_state),
        cuda=SimpleNamespace(runtime=SimpleNamespace(memGetInfo=lambda: (8 << 30, 8 << 30))),
        get_default_memory_pool=lambda: SimpleNamespace(free_bytes=lambda: 0, free_all_blocks=lambda: None),
    )
    real_resolve = backends.resolve

    def resolve(name, generic=False):
        b = real_resolve("numpy", generic=generic)
        if generic:
            return b
        # NumPy registers fewer fast paths than CuPy: claim them all, as CuPy does
        return dataclasses.replace(b, ops=dataclasses.replace(b.ops, fast=tuple(backends.OP_NAMES)))

    monkeypatch.setitem(sys.modules, "cupy", shim)
    monkeypatch.setattr(backends, "resolve", resolve)
    monkeypatch.setattr(gpu, "CupyTimer", gpu.HostTimer)
    monkeypatch.setattr(gpu, "K_MAX", 4)
    monkeypatch.setattr(gpu, "R_MAX", 3)
    for cfg in (
        gpu.Config((8, 3, 5, 5), 1, "NCHW", "float32", "custom"),
        gpu.Config((6, 5, 4, 3), -1, "NHWC", "float16", "custom"),
    ):
        rows, raw = gpu.run_config(
            cfg,
            l2_bytes=1 << 20,
            with_torch=False,
            with_generic=True,
            deadline=None,
            ops_left=len(gpu.OPS),
            bandwidth=1e10,
        )
        assert [r["name"] for r in rows] == list(gpu.OPS)
        for r in rows:
            assert r["error"] is None, r
            assert r["us"] > 0 and r["vs_generic"] > 0 and r["vs_torch"] is None
            assert r["k"]["xbn"] >= 1 and r["rounds"] == gpu.R_MIN
        assert raw["copies"] == gpu.rotation(cfg.nbytes, 1 << 20)
    # Short of memory: every row says so, nothing is allocated.
    shim.cuda.runtime.memGetInfo = lambda: (1 << 10, 8 << 30)
    rows, _ = gpu.run_config(
        gpu.REFERENCE[0],
        l2_bytes=50 << 20,
        with_torch=False,
        with_generic=True,
        deadline=None,
        ops_left=8,
        bandwidth=1e12,
    )
    assert all(r["error"].startswith("skipped: needs") for r in rows)


@pytest.mark.parametrize(
    "cfg",
    [
        gpu.Config((4, 3, 5, 5), 1, "NCHW", "float32", "t"),
        gpu.Config((4, 5, 5, 3), -1, "NHWC", "float32", "t"),
        gpu.Config((16, 7), 1, "NC", "float64", "t"),
    ],
    ids=lambda c: c.layout,
)
def test_torch_calls_on_the_cpu(cfg):
    """torch's side on NumPy buffers (DLPack, as on the GPU): the layer ops run on the CPU too;
    the four passes of torch's SyncBatchNorm exist only for CUDA, and fail at dispatch, after
    their arguments matched the schema (a wrong argument would be a TypeError)."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(cfg.shape).astype(cfg.dtype) for _ in range(2)]
    dys = [rng.standard_normal(cfg.shape).astype(cfg.dtype) for _ in range(2)]
    calls = gpu._torch_calls(cfg, xs, dys)
    assert set(calls) == set(gpu.OPS)
    for op in ("train_step", "forward", "backward", "eval_forward"):
        calls[op](1)
    for op in ("stats", "scale_shift", "backward_reduce", "backward_apply"):
        with pytest.raises(NotImplementedError, match=f"aten::{gpu.TORCH_OPS[op].split('.')[1]}.*'CPU'"):
            calls[op](0)
