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


def test_each_implementation_runs_in_a_process_of_its_own(tmp_path):
    """numba's thread pool slows torch in a process where it has run: no two implementations,
    and none of them and the driver, share a process."""
    import os

    # torch's process is started the same way as the others, and its import alone takes seconds
    args = [
        "--quick",
        "--rounds",
        "2",
        "--threads",
        "1",
        "--shapes",
        "16x4x8x8",
        "--no-plot",
        "--no-torch",
        "--out",
        str(tmp_path),
    ]
    assert cpu.main(args) == 0
    (r,) = json.loads((tmp_path / "cpu.json").read_text())["results"]
    pids = [p["pid"] for p in r["processes"]]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids
    impls = {p["impl"] for p in r["processes"]}
    assert {"xbn", "naive"} <= impls and len(r["processes"]) == 2 * len(impls)
    assert r["rounds"] == 2 and set(r["median_warm_s"]) == set(r["median_cold_s"]) == set(r["median_s"])
