"""``xbn info``, ``xbn parity`` and ``xbn bench``: they run, report, and fail when a backend is wrong;
a bad argument gets one line on stderr and a non-zero exit, before any work and without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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

    def off_by_1e4(x, *args, **kwargs):  # a training forward whose y is 1e-4 too large
        y, *rest = xbn.functional.batch_norm_forward(x, *args, **kwargs)
        return (y * (1 + 1e-4)).astype(y.dtype), *rest

    backends.registered_kernels("numpy")
    monkeypatch.setitem(
        backends._KERNELS, "numpy", {**backends._KERNELS.get("numpy", {}), "batch_norm_forward": off_by_1e4}
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


# -- bad arguments: one line on stderr, a non-zero exit, no traceback, no work ----------------


def _xbn(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m xbn ARGS`` in ``cwd``: an option that slips through writes there, not into the
    repository (the benchmarks' default --out is relative)."""
    return subprocess.run(
        [sys.executable, "-m", "xbn", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def _error_line(stderr: str) -> str:
    """The one line that says what is wrong (argparse may print its usage above it)."""
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().endswith(errors[0]), stderr
    return errors[0]


def _assert_refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    line = _error_line(proc.stderr)
    assert all(w in line for w in words), line
    assert proc.stdout == ""  # nothing ran: no table, no benchmark line


BAD_ARGUMENTS = [
    (["parity", "--backend", "nosuch"], ["--backend", "nosuch"]),
    (["parity", "--json", "/proc/forbidden/x.json", "--backend", "numpy"], ["--json", "/proc/forbidden"]),
    (["parity", "--seed", "-1"], ["--seed", "-1"]),
    (["parity", "--seed", "abc"], ["--seed", "abc"]),
    (["parity", "--dtype", "float8"], ["--dtype", "float8"]),
    (["parity", "--layout", "HWCN"], ["--layout", "HWCN"]),
    (["parity", "--mode", "fast"], ["--mode", "fast"]),
    (["info", "--verbose"], ["--verbose"]),
    (["bench", "--cpu", "--", "--threads", "0"], ["--threads", "0"]),
    (["bench", "--cpu", "--", "--shapes", "4xAx5"], ["--shapes", "4xAx5"]),
    (["bench", "--cpu", "--", "--repeats", "-1"], ["--repeats", "-1"]),
    (["bench", "--cpu", "--", "--repeats", "0"], ["--repeats", "0"]),
    (["bench", "--cpu", "--", "--engine", "fortran"], ["--engine", "fortran"]),
    (["bench", "--cpu", "--", "--no-torch", "--out", "/proc/forbidden/out"], ["--out", "/proc/forbidden"]),
]


@pytest.mark.parametrize(("args", "words"), BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_a_bad_argument_is_one_line_not_a_traceback(tmp_path, args, words):
    _assert_refused(_xbn(*args, cwd=tmp_path), *words)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing written


def test_parity_json_under_a_file_is_refused_before_the_matrix_runs(tmp_path, monkeypatch, capsys):
    def no_work(*a, **k):
        raise AssertionError("the matrix ran")

    monkeypatch.setattr(parity, "run_case", no_work)
    not_a_folder = tmp_path / "plain-file"
    not_a_folder.write_text("")
    for target in (not_a_folder / "x.json", tmp_path):  # under a file; a folder itself
        assert cli.main(["parity", "--backend", "numpy", "--json", str(target)]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert "--json" in _error_line(captured.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain-file"]


def test_parity_json_interrupted_run_leaves_no_file(tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(parity, "run_matrix", interrupted)
    target = tmp_path / "parity.json"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["parity", "--backend", "numpy", "--json", str(target)])
    assert not target.exists()


def test_parity_json_keeps_an_existing_file_until_the_results_are_in(tmp_path, monkeypatch):
    target = tmp_path / "parity.json"
    target.write_text("earlier results")

    def interrupted(*a, **k):
        assert target.read_text() == "earlier results"
        raise KeyboardInterrupt

    monkeypatch.setattr(parity, "run_matrix", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["parity", "--backend", "numpy", "--json", str(target)])
    assert target.read_text() == "earlier results"


@pytest.mark.parametrize("value", ["nosuch", "NumPy", ""])
def test_parity_rejects_an_unknown_backend_in_process(value, monkeypatch, capsys):
    monkeypatch.setattr(parity, "run_matrix", lambda *a, **k: pytest.fail("the matrix ran"))
    with pytest.raises(SystemExit) as e:
        cli.main(["parity", "--backend", value])
    assert e.value.code == 2
    assert "--backend" in _error_line(capsys.readouterr().err)


def test_parity_on_a_backend_that_cannot_run_here_says_why_in_one_line(capsys):
    reason = backends.available_backends()["cupy"]
    if reason == "ok":
        pytest.skip("CuPy runs here")
    assert cli.main(["parity", "--backend", "cupy"]) == 1
    captured = capsys.readouterr()
    assert f"skipped cupy: {reason}" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("no case ran") and "cupy" in err[0]


def test_parity_names_the_dtype_when_no_backend_has_it(capsys):
    if hasattr(backends.resolve("numpy").xp, "bfloat16"):
        pytest.skip("this NumPy has bfloat16")
    assert cli.main(["parity", "--backend", "numpy", "--dtype", "bfloat16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bfloat16" in err[0]


def test_parity_runs_a_repeated_choice_once(tmp_path):
    out_json = tmp_path / "parity.json"
    args = ["parity", "--backend", "numpy", "--backend", "numpy", "--dtype", "float64", "--dtype", "float64"]
    args += ["--layout", "NC", "--mode", "eval", "--mode", "eval", "--json", str(out_json)]
    assert cli.main(args) == 0
    assert len(json.loads(out_json.read_text())["results"]) == 1


# -- xbn bench --cpu, in process: the measurement must not start ------------------------------


@pytest.fixture
def cpu_bench(monkeypatch):
    from xbn.bench import cpu

    def no_work(*a, **k):
        raise AssertionError("the benchmark started")

    for name in ("_make_cases", "measure", "Copy", "_set_threads"):
        monkeypatch.setattr(cpu, name, no_work)
    # main sets it for numba; keep this process's setting as it was
    monkeypatch.setenv("NUMBA_THREADING_LAYER", os.environ.get("NUMBA_THREADING_LAYER", "workqueue"))
    return cpu


def _cpu_refused(cpu, capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        cpu.main(args)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "engine" not in captured.out  # not even the first line of a run
    return _error_line(captured.err)


BAD_CPU_OPTIONS = [
    (["--threads", "0"], ["--threads", "0"]),
    (["--threads", "1", "-3"], ["--threads", "-3"]),
    (["--threads", "two"], ["--threads", "two"]),
    (["--threads", "1000000"], ["--threads", "1000000"]),
    (["--shapes", "4xAx5"], ["--shapes", "4xAx5"]),
    (["--shapes", "64"], ["--shapes", "2 dimensions"]),
    (["--shapes", "8x0x4"], ["--shapes", "8x0x4"]),
    (["--shapes", "8x4:2"], ["--shapes", "axis 2"]),
    (["--shapes", "8x4:x"], ["--shapes", "8x4:x"]),
    (["--shapes", "1x4x1x1"], ["--shapes", "2 values per channel"]),
    (["--repeats", "-1"], ["--repeats", "-1"]),
    (["--repeats", "0"], ["--repeats", "0"]),
    (["--quick", "--repeats", "7"], ["--quick", "--repeats"]),
    (["--engine", "fortran"], ["--engine"]),
    (["--frobnicate"], ["--frobnicate"]),
]


@pytest.mark.parametrize(("args", "words"), BAD_CPU_OPTIONS, ids=[" ".join(a) for a, _ in BAD_CPU_OPTIONS])
def test_bench_cpu_refuses_a_bad_option(cpu_bench, capsys, tmp_path, args, words):
    line = _cpu_refused(cpu_bench, capsys, [*args, "--no-torch", "--out", str(tmp_path / "out")])
    assert all(w in line for w in words), line
    assert not (tmp_path / "out").exists()


def test_bench_cpu_refuses_a_shape_torch_cannot_compare(cpu_bench, capsys, tmp_path):
    pytest.importorskip("torch")
    line = _cpu_refused(cpu_bench, capsys, ["--shapes", "8x4x6:-1", "--out", str(tmp_path / "out")])
    assert "8x4x6:-1" in line and "--no-torch" in line
    assert not (tmp_path / "out").exists()


def test_bench_cpu_refuses_a_shape_larger_than_memory(cpu_bench, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_bench, "_memory_bytes", lambda: 1 << 20)
    line = _cpu_refused(cpu_bench, capsys, ["--shapes", "64x64x64", "--no-torch", "--out", str(tmp_path)])
    assert "64x64x64" in line and "GiB" in line


def test_bench_cpu_engine_numba_without_numba(cpu_bench, capsys, tmp_path, monkeypatch):
    from xbn.kernels import numpy as kn

    monkeypatch.setattr(kn, "_load_compiled", lambda: None)
    monkeypatch.setattr(kn, "_engine", kn._engine)
    line = _cpu_refused(cpu_bench, capsys, ["--engine", "numba", "--no-torch", "--out", str(tmp_path / "o")])
    assert "--engine numba" in line and "numba" in line
    assert not (tmp_path / "o").exists()


def test_bench_cpu_refuses_an_output_folder_it_cannot_write(cpu_bench, capsys, tmp_path, monkeypatch):
    from xbn.kernels import numpy as kn

    monkeypatch.setattr(kn, "_engine", kn._engine)
    plain = tmp_path / "plain-file"
    plain.write_text("")
    blocked = tmp_path / "blocked"
    (blocked / "cpu.md").mkdir(parents=True)  # a folder where a result file goes
    for out, words in (
        (plain, ["--out", "not a folder"]),
        (plain / "sub", ["--out", "plain-file"]),
        (blocked, ["--out", "cpu.md"]),
    ):
        line = _cpu_refused(cpu_bench, capsys, ["--no-torch", "--out", str(out)])
        assert all(w in line for w in words), line
    assert sorted(p.name for p in blocked.iterdir()) == ["cpu.md"]  # the probes left nothing


# -- xbn bench --gpu: its options are checked without a GPU -----------------------------------

# Checked before CuPy is looked for, so these fail the same way with or without a GPU.
BAD_GPU_OPTIONS = [
    (["--shapes", "4xAx5", "--plan"], ["--shapes", "4xAx5"]),
    (["--shapes", "8x4:5", "--plan"], ["--shapes"]),
    (["--shapes", "8x0x4", "--plan"], ["--shapes"]),
    (["--budget-s", "-1", "--plan"], ["--budget-s"]),
    (["--outputs", "json,pdf", "--plan"], ["--outputs", "pdf"]),
    (["--out", "/proc/forbidden/results"], ["--out"]),
    (["--summary", "/proc/forbidden/summary.json"], ["--summary"]),
]


@pytest.mark.parametrize(("args", "words"), BAD_GPU_OPTIONS, ids=[" ".join(a) for a, _ in BAD_GPU_OPTIONS])
def test_bench_gpu_refuses_a_bad_option_without_a_gpu(tmp_path, args, words):
    _assert_refused(_xbn("bench", "--gpu", "--", *args, cwd=tmp_path), *words)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing written
