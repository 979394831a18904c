"""``xbn info`` and ``xbn parity``: they run, report, and fail when a backend is wrong."""

from __future__ import annotations

import json
import subprocess
import sys

import xbn
from xbn import backends, cli, parity


def test_info_lists_versions_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"xbn {xbn.__version__}" in out and "numpy" in out
    assert "array_api_strict" in out and "'auto' resolves to:" in out


def test_parity_passes_on_cpu_backends_and_writes_json(tmp_path, capsys):
    out_json = tmp_path / "parity.json"
    rc = cli.main(["parity", "--backend", "numpy", "--backend", "array_api_strict", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "0 failed" in out
    data = json.loads(out_json.read_text())
    cases = data["results"]
    assert {c["backend"] for c in cases} == {"numpy", "array_api_strict"}
    assert {c["mode"] for c in cases} == set(parity.MODES)
    assert {c["layout"] for c in cases} == set(parity.LAYOUTS)
    assert {"float64", "float32", "float16"} <= {c["dtype"] for c in cases}
    assert all(c["passed"] for c in cases)


def test_parity_fails_when_a_fast_path_is_off_by_a_little(monkeypatch, capsys):
    monkeypatch.delenv("XBN_FORCE_GENERIC", raising=False)

    def off_by_1e4(x, scale, shift, /, *, axis, xp=None):
        return xbn.functional.scale_shift(x, scale * (1 + 1e-4), shift, axis=axis, xp=xp)

    backends.registered_kernels("numpy")
    monkeypatch.setitem(
        backends._KERNELS, "numpy", {**backends._KERNELS.get("numpy", {}), "scale_shift": off_by_1e4}
    )
    rc = cli.main(["parity", "--backend", "numpy", "--layout", "NC", "--mode", "train"])
    out = capsys.readouterr().out
    assert rc == 1
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("numpy")}
    assert rows["float64"].rstrip().endswith("FAIL") and rows["float32"].rstrip().endswith("FAIL")
    assert rows["float16"].rstrip().endswith("ok")  # 1e-4 is inside float16's tolerance


def test_parity_reports_a_crash_as_a_failed_case(monkeypatch):
    monkeypatch.delenv("XBN_FORCE_GENERIC", raising=False)

    def broken(x, /, *, axis, xp=None):
        raise RuntimeError("kernel exploded")

    backends.registered_kernels("numpy")
    monkeypatch.setitem(backends._KERNELS, "numpy", {"batch_stats": broken})
    results, _ = parity.run_matrix(["numpy"], dtypes=["float32"], layouts=["NC"], modes=["train"])
    assert len(results) == 1 and not results[0].passed
    assert "kernel exploded" in results[0].error


def test_console_script_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "xbn", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "backends" in proc.stdout
