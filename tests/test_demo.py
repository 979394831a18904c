"""``xbn demo`` and examples/train_with_xbn.py: they run, report every run, and are reproducible."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import xbn
from xbn import cli
from xbn.backends import resolve

pytest.importorskip("sklearn", reason='the demo needs pip install "xbn[demo]"')
pytest.importorskip("matplotlib", reason='the demo needs pip install "xbn[demo]"')
pytest.importorskip("tqdm", reason='the demo needs pip install "xbn[demo]"')

from xbn import demo

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("no BatchNorm, lr 0.05", "BatchNorm, lr 0.05", "no BatchNorm, lr 0.5", "BatchNorm, lr 0.5")
CNN_RUNS = ("no BatchNorm, lr 0.05", "BatchNorm, lr 0.05", "no BatchNorm, lr 1", "BatchNorm, lr 1")
CHANCE = 10.0  # percent: ten balanced classes
needs_fold = pytest.mark.skipif(
    not hasattr(xbn, "fold_batchnorm"), reason="xbn.fold_batchnorm is not in this build"
)
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
    for line in lines[start + 2 :]:
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


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_demo_gives_the_same_numbers_on_every_backend(backend, tmp_path, capsys, model):
    """The training code is Array API only: each backend reproduces NumPy's table."""
    rc, ref, _ = run_demo(capsys, tmp_path, "--epochs", "1", "--model", model)
    assert rc == 0
    rc, out, err = run_demo(capsys, tmp_path, "--epochs", "1", "--model", model, "--backend", backend.name)
    assert rc == 0, err
    assert f"backend {backend.name}" in out
    _, ref_rows = parse_table(ref)
    _, rows = parse_table(out)
    assert rows.keys() == ref_rows.keys()
    # After one epoch at lr 1 the BatchNorm convnet's eval accuracy is on its steep early slope,
    # where float32 sums added in another order (torch's BLAS) move it by a point (10.9% with
    # NumPy, 10.7-12.0% elsewhere); the losses agree to 0.2%.
    points = 1.0 if model == "mlp" else 2.5
    for name in rows:
        assert percent(rows[name][0]) == pytest.approx(percent(ref_rows[name][0]), abs=points), name
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
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "step    30" in proc.stdout
    assert re.search(r"test accuracy \d+\.\d%", proc.stdout)


# -- the convnet -----------------------------------------------------------------------------


def test_cnn_demo_learns_on_every_tier(backend, tmp_path, capsys):
    """Two epochs: the BatchNorm2d runs are far above chance at both learning rates (62% each
    with NumPy; the bound is half of that, not tuned to a backend)."""
    from xbn.kernels import numpy as engine

    threads = engine.get_num_threads()
    rc, out, err = run_demo(capsys, tmp_path, "--model", "cnn", "--backend", backend.name)
    assert rc == 0, err
    assert engine.get_num_threads() == threads  # the demo's one-thread setting is undone
    assert "CNN 1x8x8 conv3x3(16)-conv3x3(32)-avgpool-10" in out and "2 epochs" in out
    header, rows = parse_table(out)
    assert tuple(header) == COLUMNS and tuple(rows) == CNN_RUNS
    for name in ("BatchNorm, lr 0.05", "BatchNorm, lr 1"):
        assert percent(rows[name][0]) > 3 * CHANCE, out
    assert (tmp_path / demo.PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_writes_its_timings_as_json(tmp_path, capsys):
    path = tmp_path / "results" / "cnn.json"  # the parent is created
    rc, out, err = run_demo(capsys, tmp_path, "--model", "cnn", "--json", str(path))
    assert rc == 0, err
    assert f"wrote results and seconds per epoch to {path}" in out
    doc = json.loads(path.read_text())
    assert (doc["model"], doc["backend"], doc["device"], doc["epochs"]) == ("cnn", "numpy", "cpu", 2)
    assert [r["name"] for r in doc["runs"]] == list(CNN_RUNS)
    _, rows = parse_table(out)
    for r in doc["runs"]:
        assert len(r["epoch_seconds"]) == 2 and all(t > 0 for t in r["epoch_seconds"])
        assert r["median_epoch_seconds"] == r["epoch_seconds"][1]  # the first epoch is warm-up
        assert f"{r['final_test_acc']:.1%}" == rows[r["name"]][0]
        assert r["diverged_at"] is None
    seconds = sorted(r["epoch_seconds"][1] for r in doc["runs"])
    assert doc["median_epoch_seconds"] == pytest.approx((seconds[1] + seconds[2]) / 2)


@needs_fold
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_demo_folds_batchnorm_for_inference_with_equal_accuracy(tmp_path, capsys, model):
    path = tmp_path / "r.json"
    rc, out, err = run_demo(capsys, tmp_path, "--model", model, "--json", str(path))
    assert rc == 0, err
    assert "BatchNorm folded into the layer before it for inference (xbn.fold_batchnorm):" in out
    for r in json.loads(path.read_text())["runs"]:
        f = r["folded"]
        if not r["batchnorm"]:
            assert f is None
            continue
        assert f["test_acc"] == pytest.approx(r["final_test_acc"])
        # the same function up to float32 rounding: at most one of 450 test images may flip
        assert abs(f["folded_test_acc"] - f["test_acc"]) <= 1 / 450 + 1e-7
        assert f["eval_seconds"] > 0 and f["folded_eval_seconds"] > 0
        line = next(line for line in out.splitlines() if line.startswith(r["name"] + ": test accuracy"))
        assert f"{f['test_acc']:.1%} -> {f['folded_test_acc']:.1%}" in line


def test_training_reads_back_only_scalars(monkeypatch):
    """Arrays stay on the device: on an array-api-strict device other than the CPU any copy of
    an array to NumPy raises, and the scalars read back are counted: the loss and accuracy once
    per epoch, and the label check of softmax_cross_entropy once per batch."""
    import array_api_strict

    backend = resolve("array_api_strict", "device1")
    datasets, model_selection, _, _ = demo._import_extras()
    data = demo.load_data(datasets, model_selection, backend, images=True)
    net = demo.build_model("cnn", True, backend=backend, seed=0)
    reads = []
    cls = type(array_api_strict.asarray(0))
    for method in ("__bool__", "__float__", "__int__", "__index__", "__complex__"):
        original = getattr(cls, method)

        def counted(self, _original=original, _method=method):
            reads.append((_method, tuple(self.shape)))
            return _original(self)

        monkeypatch.setattr(cls, method, counted)
    hist = demo.train(net, data, name="n", batchnorm=True, lr=0.05, epochs=2, batch_size=64, seed=0)
    assert len(hist.test_acc) == 2
    steps = data.n_train // 64
    assert all(shape == () for _, shape in reads), reads
    floats = [m for m, _ in reads].count("__float__")
    assert floats == 2 * 2  # loss and accuracy, per epoch
    assert len(reads) - floats <= 2 * steps  # at most the label check, per batch


# -- outputs and arguments: checked before any training ---------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(demo, "train", fail)


def test_unwritable_out_fails_before_training(tmp_path, capsys, no_training):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc, out, err = run_demo(capsys, blocker / "plots")  # a directory cannot live inside a file
    assert rc == 2
    assert err.startswith(f"xbn demo: cannot write to --out {str(blocker / 'plots')!r}: ")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "run " not in out  # no table: nothing trained


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_out_fails_before_training(tmp_path, capsys, no_training):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc, _, err = run_demo(capsys, locked)
    finally:
        locked.chmod(0o700)
    assert rc == 2 and err.startswith("xbn demo: cannot write to --out") and err.count("\n") == 1


def test_bad_json_path_fails_before_training(tmp_path, capsys, no_training):
    rc, _, err = run_demo(capsys, tmp_path, "--json", str(tmp_path))
    assert rc == 2 and "is a directory" in err and err.count("\n") == 1
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc, _, err = run_demo(capsys, tmp_path, "--json", str(blocker / "r.json"))
    assert rc == 2 and err.startswith("xbn demo: cannot write --json") and err.count("\n") == 1


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--seed", "-1", "must be >= 0"),
        ("--lr", "inf", "must be a finite number > 0"),
        ("--lr", "nan", "must be a finite number > 0"),
        ("--high-lr", "0", "must be a finite number > 0"),
        ("--target", "101", "must be in (0, 100]"),
        ("--epochs", "two", "invalid int value"),
        ("--model", "resnet", "invalid choice"),
    ],
)
def test_bad_arguments_give_a_short_message(tmp_path, capsys, no_training, option, value, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--out", str(tmp_path), option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    # argparse's usage (a few lines), then one line naming the option and the problem
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"xbn demo: error: argument {option}") and message in err


def test_command_line_errors_have_no_traceback(tmp_path):
    """The installed command: one line on stderr and a non-zero exit, for a bad --out too."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for args in (["--out", str(blocker / "x")], ["--batch-size", "100000"], ["--backend", "nope"]):
        proc = subprocess.run(
            [sys.executable, "-m", "xbn", "demo", "--quiet", "--epochs", "1", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
        )
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("xbn demo: ") and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert proc.stdout == ""


@needs_fold
def test_example_cnn_runs():
    pytest.importorskip("torch", reason="the example's last check loads the state_dicts into torch")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cnn_digits.py"), "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"epoch  1  loss \d+\.\d{4}  test accuracy \d+\.\d%", proc.stdout)
    assert "same predictions as the trained network: True" in proc.stdout
    diffs = [float(d) for d in re.findall(r"max abs difference (\S+)\)", proc.stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-4, proc.stdout
