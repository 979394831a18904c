"""``xbn bench --cpu`` runs end to end and writes its three files (a smoke run: nothing here
looks at the timings, which belong to the benchmark itself)."""

from __future__ import annotations

import importlib.util
import json

from xbn.bench import cpu


def test_quick_run_writes_table_json_and_plot(tmp_path):
    args = ["--quick", "--threads", "1", "--shapes", "16x4x8x8", "8x6x6x4:-1", "--out", str(tmp_path)]
    if importlib.util.find_spec("torch") is None:
        args.append("--no-torch")
    if importlib.util.find_spec("matplotlib") is None:
        args.append("--no-plot")
    assert cpu.main(args) == 0
    data = json.loads((tmp_path / "cpu.json").read_text())
    assert {r["shape_name"] for r in data["results"]} == {"16x4x8x8", "8x6x6x4:-1"}
    for r in data["results"]:
        assert r["median_s"]["xbn"]["train"] > 0 and r["floor_s"]["train"] > 0
    assert data["meta"]["engine"] in ("numpy", "numba")
    table = (tmp_path / "cpu.md").read_text()
    assert "| 16x4x8x8 |" in table and "xbn/floor" in table
    if "--no-plot" not in args:
        assert (tmp_path / "cpu.png").stat().st_size > 0


def test_shape_argument():
    assert cpu._parse_shape("32x56x56x64:-1") == ((32, 56, 56, 64), -1, "NHWC")
    assert cpu._parse_shape("4096x1024") == ((4096, 1024), 1, "NC")
