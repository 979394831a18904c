"""The GPU benchmark's CPU-side parts: options, shape lists, launch-plan listing and the report
writers (fed synthetic results). Timing itself needs a GPU: ci/gpu_tier.sh runs it."""

from __future__ import annotations

import json

import pytest

from xbn.bench import gpu


def test_list_needs_no_gpu(capsys):
    assert gpu.main(["--list", "--quick"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == len(gpu.QUICK)
    assert "32x56x56x64:-1" in out and "nlc W=4" in out and "ncl W=4" in out


def test_shapes_options():
    args = gpu.build_parser().parse_args(["--shapes", "8x3x5x5", "16x7x7x3:-1"])
    assert gpu._shapes(args) == [((8, 3, 5, 5), 1, "custom"), ((16, 7, 7, 3), -1, "custom")]
    assert len(gpu._shapes(gpu.build_parser().parse_args([]))) == len(gpu.SHAPES)


def test_rotation_defeats_l2():
    l2 = 50 << 20
    for nbytes in (1 << 10, 1 << 20, 10 << 20, 51 << 20, 400 << 20):
        k = gpu.rotation(nbytes, l2)
        assert 2 <= k <= 16
        assert k == 16 or (k - 1) * 2 * nbytes >= 2 * l2


def _synthetic(tmp_path):
    results = []
    for i, (shape, axis, label) in enumerate(gpu.SHAPES[:3]):
        nbytes = 4 * int(__import__("numpy").prod(shape))
        results.append({
            "shape": list(shape), "axis": axis, "label": label,
            "shape_name": gpu.shape_name(shape, axis), "bytes": nbytes, "copies": 2,
            "floor_s": 8 * nbytes / 3e12, "route": "ncl",
            "median_s": {"xbn": 1e-4 * (i + 1), "torch": 1.2e-4 * (i + 1), "generic": 5e-4,
                         "aten": 1.1e-4},
            "kernel_gbs": {"batch_stats": 2800.0, "scale_shift": 2700.0,
                           "backward_reduce": 2900.0, "backward_apply": 2750.0},
            "kernel_sum_s": 0.6e-4 * (i + 1),
            "errors": [] if i else ["RuntimeError: example"],
        })
    meta = {"gpu": {"gpu": "Test GPU", "compute_capability": "90", "sm_count": 132,
                    "l2_bytes": 50 << 20, "driver": "1.0", "cuda_runtime": 13000,
                    "nvrtc": "13.0", "cupy": "14.0", "torch": "2.13", "torch_cuda": "13.0",
                    "cudnn": 91000},
            "copy_bandwidth": 3.0e12, "dtype": "float32", "repeats": 5, "warmup": 1,
            "command": "xbn bench --gpu"}
    return results, meta


def test_markdown_report(tmp_path):
    results, meta = _synthetic(tmp_path)
    path = tmp_path / "gpu.md"
    gpu.write_markdown(path, results, meta)
    text = path.read_text()
    assert "Test GPU" in text and "sm_90" in text and "3000 GB/s" in text
    assert "| 32x64x56x56 | NCHW | 0.100 | 0.120 | 0.110 | 0.500 | 0.83 | 5.00 |" in text
    assert "| 0.060 | 0.040 |" in text
    assert "2900 GB/s (0.97)" in text
    assert "RuntimeError: example" in text
    json.dumps({"meta": meta, "results": results})  # what main() writes must serialize


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    results, meta = _synthetic(tmp_path)
    gpu.write_plot(tmp_path / "gpu.png", results, meta["copy_bandwidth"])
    assert (tmp_path / "gpu.png").stat().st_size > 1000


def test_without_gpu_main_says_why(tmp_path, capsys):
    rc = gpu.main(["--quick", "--out", str(tmp_path)])
    try:
        from xbn import backends

        backends.resolve("cupy")
    except Exception:
        assert rc == 2
        assert "xbn bench --gpu:" in capsys.readouterr().err
    else:  # on a GPU machine this is a real (quick) run
        assert (tmp_path / "gpu.md").exists()
