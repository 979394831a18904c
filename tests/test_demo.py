"""``xbn demo`` and examples/train_with_xbn.py: they run, report every run, and are reproducible."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from xbn import cli

pytest.importorskip("sklearn", reason='the demo needs pip install "xbn[demo]"')
pytest.importorskip("matplotlib", reason='the demo needs pip install "xbn[demo]"')
pytest.importorskip("tqdm", reason='the demo needs pip install "xbn[demo]"')

from xbn import demo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("no BatchNorm, lr 0.05", "BatchNorm, lr 0.05", "no BatchNorm, lr 0.5", "BatchNorm, lr 0.5")
COLUMNS = ("run", "final test acc", "best train loss", "epochs to 95%", "time/epoch")


def run_demo(capsys, out_dir, *extra):
    rc = cli.main(["demo", "--epochs", "2", "--quiet", "--out", str(out_dir), *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def parse_table(out):
    """{run name: [cells]} from the printed table, and the header cells."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run "))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return header, rows


def percent(cell):
    return float(cell.rstrip("%"))


def test_demo_prints_every_run_and_writes_a_png(tmp_path, capsys):
    rc, out, err = run_demo(capsys, tmp_path)
    assert rc == 0, err
    header, rows = parse_table(out)
    assert tuple(header) == COLUMNS
    assert tuple(rows) == RUNS
    for cells in rows.values():
        assert len(cells) == len(COLUMNS) - 1
        assert re.fullmatch(r"\d+\.\d%", cells[0])
        assert re.fullmatch(r"\d+\.\d{4}", cells[1])
        assert re.fullmatch(r"\d+|never", cells[2])
        assert re.fullmatch(r"\d+\.\d ms", cells[3])
    png = tmp_path / demo.PLOT_NAME
    assert f"wrote loss and accuracy curves to {png}" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 500 and height > 300
    assert data[-8:-4] == b"IEND"
    assert err == ""  # --quiet: no progress bars


def test_demo_is_deterministic_for_a_seed(tmp_path, capsys):
    def numbers(seed):
        rc, out, _ = run_demo(capsys, tmp_path, "--seed", str(seed))
        assert rc == 0
        _, rows = parse_table(out)
        return {name: cells[:3] for name, cells in rows.items()}  # all but the timing

    first = numbers(0)
    assert numbers(0) == first
    assert numbers(1) != first


def test_batchnorm_trains_at_a_high_learning_rate_where_the_plain_network_does_not(tmp_path, capsys):
    rc, out, _ = run_demo(capsys, tmp_path)
    assert rc == 0
    _, rows = parse_table(out)
    with_bn, without = percent(rows["BatchNorm, lr 0.5"][0]), percent(rows["no BatchNorm, lr 0.5"][0])
    assert with_bn > without + 20, out
    # Faster at the normal learning rate too: BN's first epochs reach higher test accuracy.
    assert percent(rows["BatchNorm, lr 0.05"][0]) > percent(rows["no BatchNorm, lr 0.05"][0]), out


def test_demo_shows_progress_bars_unless_quiet(tmp_path, capsys):
    rc = cli.main(["demo", "--epochs", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 0
    for name in RUNS:
        assert name in err


@pytest.mark.parametrize("missing", ["sklearn", "matplotlib", "tqdm"])
def test_demo_without_its_extras_says_how_to_install_them(monkeypatch, tmp_path, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes "import <missing>" fail
    rc = cli.main(["demo", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert 'pip install "xbn[demo]"' in err and missing in err
    assert not (tmp_path / demo.PLOT_NAME).exists()


def test_demo_rejects_bad_options(tmp_path, capsys):
    rc, _, err = run_demo(capsys, tmp_path, "--backend", "no-such-backend")
    assert rc == 2 and "unknown backend" in err
    rc, _, err = run_demo(capsys, tmp_path, "--batch-size", "1")
    assert rc == 2 and "--batch-size" in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--epochs", "0"])
    assert exc.value.code == 2


def test_demo_gives_the_same_numbers_on_every_backend(backend, tmp_path, capsys):
    """The training code is Array API only: each backend reproduces NumPy's table."""
    rc, ref, _ = run_demo(capsys, tmp_path, "--epochs", "1")
    assert rc == 0
    rc, out, err = run_demo(capsys, tmp_path, "--epochs", "1", "--backend", backend.name)
    assert rc == 0, err
    assert f"backend {backend.name}" in out
    _, ref_rows = parse_table(ref)
    _, rows = parse_table(out)
    assert rows.keys() == ref_rows.keys()
    for name in rows:
        assert percent(rows[name][0]) == pytest.approx(percent(ref_rows[name][0]), abs=1.0), name
        assert float(rows[name][1]) == pytest.approx(float(ref_rows[name][1]), rel=1e-2), name


def test_a_diverging_run_is_reported_not_raised(tmp_path, capsys):
    rc, out, err = run_demo(capsys, tmp_path, "--epochs", "1", "--high-lr", "50")
    assert rc == 0, err
    _, rows = parse_table(out)
    assert rows["no BatchNorm, lr 50"][0].startswith("diverged")
    assert rows["no BatchNorm, lr 50"][2] == "never"


def test_example_training_loop_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_with_xbn.py"), "--steps", "30"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "step    30" in proc.stdout
    assert re.search(r"test accuracy \d+\.\d%", proc.stdout)
