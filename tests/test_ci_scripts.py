"""The GPU tier's scripts on a machine without a GPU: ci/gpu_tier.sh's plan, budgets, step
runner and summary.json; ci/gpu_prepare.sh's requirements; the tier's bookkeeping (pytest's
summary line, compute-sanitizer's verdict); ci/check_kernels.py and the bookkeeping without
array-api-compat; ci/sanitize_kernels.py's reference and launch recorder.

(``ci/gpu_tier.sh --dry-run`` itself runs in .ci/run, after ci/gpu_prepare.sh.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from xbn.bench import gpu

ROOT = Path(__file__).resolve().parent.parent
TIER = ROOT / "ci" / "gpu_tier.sh"
PREPARE = ROOT / "ci" / "gpu_prepare.sh"
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(
    BASH is None or shutil.which("timeout") is None, reason="needs bash and coreutils timeout"
)


def _run(cmd, env=None, timeout=120):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


# -- ci/gpu_tier.sh --------------------------------------------------------------------------


@needs_bash
@pytest.mark.parametrize("script", [TIER, PREPARE], ids=lambda p: p.name)
def test_scripts_parse(script):
    assert _run([BASH, "-n", str(script)]).returncode == 0


@needs_bash
def test_plan_fits_300_seconds_and_eight_files():
    proc = _run([BASH, str(TIER), "--plan"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    total = re.fullmatch(r"planned total: (\d+) s", lines[-1])
    assert total, lines[-1]
    steps = {m.group(1): int(m.group(2)) for ln in lines if (m := re.match(r"\s+(\w+)\s+(\d+) s\s", ln))}
    order = list(steps)
    assert order[:4] == ["deps", "env", "pytest", "parity"]  # in order of value
    assert order.index("memcheck") < order.index("racecheck") < order.index("synccheck")
    assert sum(steps.values()) == int(total.group(1)) <= 300
    assert min(steps.values()) > 5  # each budget leaves room for SIGINT, then SIGKILL 5 s later
    files = re.search(r"files in OUTDIR: (.*) \((\d+) of at most 8\)", proc.stdout)
    assert files and len(files.group(1).split()) == int(files.group(2)) <= 8
    assert "summary.json" in files.group(1).split()


@needs_bash
def test_budgets_can_be_changed_and_bad_ones_are_refused():
    proc = _run([BASH, str(TIER), "--plan"], env={"XBN_TIER_BUDGETS": "bench=60", "XBN_TIER_ONLY": "bench"})
    assert proc.returncode == 0
    assert proc.stdout.strip().endswith("planned total: 68 s")  # deps always runs: 8 + 60
    for bad in ("bench=2", "nosuch=10", "bench"):
        proc = _run([BASH, str(TIER), "--plan"], env={"XBN_TIER_BUDGETS": bad})
        assert proc.returncode == 2 and "XBN_TIER_BUDGETS" in proc.stderr


def _fake_python(tmp_path: Path, hang_on: str) -> Path:
    """An interpreter that runs this one, except that ``python -m xbn <hang_on>`` hangs."""
    fake = tmp_path / "python"
    fake.write_text(
        f'#!/bin/sh\nif [ "$1 $2 $3" = "-m xbn {hang_on}" ]; then exec sleep 60; fi\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake


@needs_bash
def test_a_step_is_stopped_at_its_budget_and_the_summary_says_so(tmp_path):
    """The real step runner: deps (nothing to install here), then parity, made to hang, is
    interrupted at its budget; the other steps are recorded as not selected; summary.json
    is complete and OUTDIR holds only the bundled logs."""
    out = tmp_path / "tier"
    proc = _run(
        [BASH, str(TIER), str(out)],
        timeout=90,
        env={
            "PYTHON": str(_fake_python(tmp_path, "parity")),
            "XBN_TIER_ONLY": "parity",
            "XBN_TIER_BUDGETS": "parity=8",
            "COMPUTE_SANITIZER": "",
            "XBN_COMMIT": "abc123",
        },
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert steps["deps"]["rc"] == 0
    assert steps["parity"]["rc"] == 124 and steps["parity"]["timed_out"] is True
    assert 2 <= summary["timing_s"]["parity"] <= 8  # SIGINT at 8 - 5 s
    assert steps["pytest"]["not_run"].startswith("not selected")
    assert set(steps["sanitizer"]) == {"memcheck", "racecheck", "synccheck", "initcheck"}
    assert all(v.startswith("skipped: ") for v in steps["sanitizer"].values())
    assert summary["ok"] is False and summary["problems"] == ["parity: exit status 124 (timed out)"]
    assert summary["commit"] == "abc123" and summary["planned_s"] == 8 + 8
    for key in ("gpu", "driver", "cuda", "cupy", "torch", "date", "copy_bandwidth_GBps", "bench"):
        assert key in summary
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()) and len(files) <= 8
    assert "summary.json" in files and "tests.log" in files
    assert "===== parity: exit 124" in (out / "tests.log").read_text()


# -- ci/gpu_prepare.sh -----------------------------------------------------------------------


@needs_bash
def test_prepare_asks_pip_for_the_gpu_machines_wheels_at_pyprojects_versions(tmp_path):
    """pip replaced by a recorder: the requirements come from pyproject.toml and the download
    targets the GPU machine's Python 3.12, wheels only, without dependencies."""
    calls = tmp_path / "pip-args"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1 $2 $3" = "-m pip download" ]; then echo "$@" > "{calls}";'
        ' while [ $# -gt 0 ]; do [ "$1" = -d ] && touch "$2/array_api_compat-9-py3-none-any.whl";'
        " shift; done;"
        " exit 0; fi\n"
        f'exec "{sys.executable}" "$@"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    wheels = tmp_path / "wheels"
    proc = _run([BASH, str(PREPARE)], env={"PYTHON": str(fake), "XBN_WHEELS": str(wheels)})
    assert proc.returncode == 0, proc.stderr
    args = calls.read_text().split()
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name in ("array-api-compat", "array-api-strict"):
        req = next(a for a in args if a.startswith(name))
        assert f'"{req}' in pyproject.replace(" ", "")
    for flag in ("--no-deps", "--only-binary=:all:"):
        assert flag in args
    assert args[args.index("--python-version") + 1] == "3.12"
    assert "x86_64" in args[args.index("--platform") + 1]
    assert "ci/gpu_tier.sh" in proc.stdout and "--no-index" in proc.stdout


# -- without array-api-compat --------------------------------------------------------------


_BLOCK = "import sys; sys.modules['array_api_compat'] = None; sys.modules['array_api_strict'] = None\n"


def test_check_kernels_needs_no_array_api_compat():
    code = _BLOCK + (
        "import runpy\n"
        "ck = runpy.run_path('ci/check_kernels.py', run_name='check_kernels')\n"
        "src = ck['_source']\n"
        "assert all('__global__' in src.kernel_source(s) for s in src.SOURCES)\n"
        "assert 'xbn_stats_ncl_v1' in ck['planned_kernels']('f32')\n"
        "assert 'xbn.backends' not in sys.modules and 'xbn.functional' not in sys.modules\n"
        "print('ok')\n"
    )
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@needs_bash
def test_tier_bookkeeping_needs_no_array_api_compat(tmp_path):
    """The tier() function of ci/gpu_tier.sh, as the script defines it, with array-api-compat
    unimportable: summary.json is started, a pytest step recorded, a verdict given."""
    log = tmp_path / "pytest.log"
    log.write_text("....\n3 passed, 1 skipped in 2.00s\n")
    block = tmp_path / "sitecustomize.py"
    block.write_text(_BLOCK)
    script = (
        f'PY="{sys.executable}"\n'
        '"$PY" -c "import array_api_compat" 2> /dev/null && { echo "not blocked"; exit 9; }\n'
        f'source <(sed -n "/^tier() {{/,/^}}/p" "{TIER}")\n'
        f'tier init --out "{tmp_path}" --planned-s 10 --plan deps=8,env=2\n'
        f'tier record --out "{tmp_path}" --step pytest --kind pytest --rc 0 --seconds 2 --log "{log}"\n'
        f'tier verdict --out "{tmp_path}" --elapsed 3\n'
    )
    proc = _run([BASH, "-c", script], env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"]["pytest"] == {"rc": 0, "passed": 3, "failed": 0, "skipped": 1, "errors": 0}
    assert summary["ok"] is True and summary["elapsed_s"] == 3 and summary["plan_s"] == {"deps": 8, "env": 2}


# -- the bookkeeping's parsers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("....\n12 passed in 3.21s\n", {"passed": 12, "failed": 0, "skipped": 0, "errors": 0}),
        (
            "===== 2 failed, 480 passed, 12 skipped, 528 deselected, 3 warnings in 52.31s =====\n",
            {"passed": 480, "failed": 2, "skipped": 12, "errors": 0, "deselected": 528, "warnings": 3},
        ),
        (
            "!!! KeyboardInterrupt !!!\n(to show a full traceback ...)\n"
            "3 passed, 2 skipped, 1 error in 15.30s\n",
            {"passed": 3, "failed": 0, "skipped": 2, "errors": 1},
        ),
        (
            "1 xfailed, 1 xpassed, 4 errors in 0.5s",
            {"passed": 0, "failed": 0, "skipped": 0, "errors": 4, "xfailed": 1, "xpassed": 1},
        ),
        ("collected 0 items\n\nno tests ran in 0.01s\n", None),
        ("", None),
    ],
)
def test_parse_pytest_summary(text, expected):
    assert gpu.parse_pytest_summary(text) == expected


def test_kernel_tests_skipped():
    log = (
        "SKIPPED [1] tests/test_kernels_cupy.py:61: this CuPy has no bfloat16 arrays\n"
        "SKIPPED [2] tests/test_kernels_cupy.py:24: the CUDA kernels need a GPU: no device\n"
    )
    assert gpu.kernel_tests_skipped(log) == "the CUDA kernels need a GPU: no device"
    assert gpu.kernel_tests_skipped(log.splitlines()[0]) is None


DONE = "sanitize_kernels: done: ran 400 launches of 88 kernels; 0 failures\n"


@pytest.mark.parametrize(
    ("text", "rc", "expected"),
    [
        (DONE + "========= ERROR SUMMARY: 0 errors\n", 0, "clean"),
        (
            "========= COMPUTE-SANITIZER\n"
            + DONE
            + "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n",
            0,
            "clean",
        ),
        (
            "========= Invalid __global__ read of size 4 bytes\n=========     at xbn_stats_ncl_v4+0x1d0\n"
            + DONE
            + "========= ERROR SUMMARY: 2 errors\n",
            1,
            "errors: 2",
        ),
        (
            "========= Error: Race reported between Write access at xbn_stats_nlc_v1+0x90\n"
            + DONE
            + "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n",
            1,
            "errors: 1",
        ),
        ("========= Uninitialized __global__ memory read of size 4 bytes\n", 1, "errors: 1"),
        (
            "========= Error: Device not supported. Please refer to the documentation\n"
            "========= ERROR SUMMARY: 0 errors\n",
            1,
            "skipped: Error: Device not supported. Please refer to the documentation",
        ),
        (
            "========= Internal Sanitizer Error: The Sanitizer failed to initialize the debugger backend\n",
            1,
            "skipped: Internal Sanitizer Error: The Sanitizer failed to initialize the debugger backend",
        ),
        (
            "cupy_backends.cuda.api.runtime.CUDARuntimeError: "
            "cudaErrorNotPermitted: operation not permitted\n",
            1,
            "skipped: cudaErrorNotPermitted: operation not permitted",
        ),
        ("exercising...\n", 124, "failed: no verdict within 20 s"),
        (
            "Traceback (most recent call last):\nValueError: boom\n========= ERROR SUMMARY: 0 errors\n",
            1,
            "failed: exit 1 before the script's end: ========= ERROR SUMMARY: 0 errors",
        ),
        (
            "FAIL float16 (4, 3, 7) mean\n" + DONE + "========= ERROR SUMMARY: 0 errors\n",
            1,
            "failed: exit 1, 0 sanitizer errors: the script's own checks failed (see the log)",
        ),
        (DONE, 0, "failed: no sanitizer summary in the output"),
    ],
)
def test_classify_sanitizer(text, rc, expected):
    assert gpu.classify_sanitizer(text, rc, budget_s=20) == expected


def test_verdict_and_summary_updates(tmp_path):
    path = tmp_path / "summary.json"
    gpu.update_summary(path, gpu="H200", steps={"env": {"rc": 0}}, timing_s={"env": 3})
    gpu.update_summary(path, steps={"pytest": {"rc": 1, "failed": 2, "errors": 0}}, timing_s={"pytest": 40})
    gpu.update_summary(path, steps={"sanitizer": {"memcheck": "clean"}})
    gpu.update_summary(path, steps={"sanitizer": {"racecheck": "errors: 3"}})
    data = gpu.read_summary(path)
    assert data["timing_s"] == {"env": 3, "pytest": 40}
    assert data["steps"]["sanitizer"] == {"memcheck": "clean", "racecheck": "errors: 3"}
    assert gpu.verdict(data) == [
        "pytest: exit status 1",
        "pytest: 2 failed, 0 errors",
        "sanitizer racecheck: errors: 3",
    ]
    assert not list(tmp_path.glob("*.tmp"))
    data["bench"] = [
        {"name": "stats", "error": "RuntimeError: x"},
        {"name": "stats", "error": "skipped: budget"},
    ]
    data["steps"] = {
        "pytest": {"rc": None, "not_run": "not selected"},
        "sanitizer": {"memcheck": "skipped: not found", "racecheck": "failed: timed out"},
    }
    assert gpu.verdict(data) == ["sanitizer racecheck: failed: timed out", "bench: 1 rows with errors"]


# -- ci/sanitize_kernels.py ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sanitize():
    sys.path.insert(0, str(ROOT / "ci"))
    try:
        import sanitize_kernels

        yield sanitize_kernels
    finally:
        sys.path.remove(str(ROOT / "ci"))


def _host_cupy():
    """Just what exercise() uses of CuPy, on NumPy."""
    device = types.SimpleNamespace(synchronize=lambda: None)
    return types.SimpleNamespace(
        asarray=np.asarray,
        asnumpy=np.asarray,
        ones=np.ones,
        float64=np.float64,
        cuda=types.SimpleNamespace(Device=lambda: device),
    )


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_sanitize_reference_agrees_with_the_generic_path(sanitize, dtype):
    """exercise() checks every op against its float64 reference: on the generic NumPy path it
    finds nothing on the representative shapes, so a failure on the GPU is the kernels'."""
    from xbn import backends
    from xbn.kernels import _launch

    ops = backends.resolve("numpy", generic=True).ops
    rng = np.random.default_rng(0)
    for index, (shape, axis) in enumerate(sanitize.REPRESENTATIVE):
        assert (
            sanitize.exercise(_host_cupy(), ops, _launch, dtype, np.dtype(dtype), shape, axis, index, rng)
            == []
        )


def test_sanitize_reference_catches_a_wrong_result(sanitize):
    from xbn import backends
    from xbn.kernels import _launch

    good = backends.resolve("numpy", generic=True).ops

    class Wrong:
        def __getattr__(self, name):
            return getattr(good, name)

        def backward_apply(self, *args, **kwargs):
            return good.backward_apply(*args, **kwargs) * 1.01

    failures = sanitize.exercise(
        _host_cupy(),
        Wrong(),
        _launch,
        "float32",
        np.dtype("float32"),
        (4, 3, 7),
        1,
        0,
        np.random.default_rng(0),
    )
    assert len(failures) == 1 and "dx apply" in failures[0]


def test_sanitize_recorder_sees_every_launch_through_rawmodule(sanitize):
    launched = []

    class Kernel:
        kernel = types.SimpleNamespace(ptr=7)

        def __init__(self, name):
            self.name = name

        def __call__(self, grid, block, args):
            launched.append(self.name)

    class RawModule:
        def __init__(self, code, options=()):
            self.options = options

        def get_function(self, name):
            return Kernel(name)

    cupy = types.SimpleNamespace(RawModule=RawModule)
    rec = sanitize.Recorder(cupy)
    module = cupy.RawModule(code="...", options=("--std=c++17", "-DXBN_DTYPE_F16"))
    fn = module.get_function("xbn_stats_fused_nlc_v8")
    assert fn.kernel.ptr == 7  # everything else reaches the real function
    fn((4, 16, 1), (32, 8, 1), ())
    module.get_function("xbn_scale_shift_ncl_v1")((3, 1, 1), (32, 1, 1), ())
    module.get_function("xbn_backward_reduce_ncl_v1")((3, 1, 1), (32, 1, 1), ())
    assert launched == ["xbn_stats_fused_nlc_v8", "xbn_scale_shift_ncl_v1", "xbn_backward_reduce_ncl_v1"]
    assert rec.ran() == {
        ("f16", "stats_fused", "nlc"),
        ("f16", "scale_shift", "ncl"),
        ("f16", "backward_reduce", "ncl"),
    }
    assert rec.split(("stats_fused", "backward_reduce")) == {("f16", "stats_fused", "nlc")}


def test_sanitize_list_needs_no_gpu(sanitize, capsys):
    assert sanitize.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "16384x16" in out and "split" in out and out.strip().endswith("every op of the registry on each")
