#!/usr/bin/env python3
"""Compile every CUDA kernel of xbn with NVRTC for sm_80 and sm_90, without a GPU.

For each source in xbn/kernels (xbn.kernels._source.SOURCES), each dtype instantiation
(-DXBN_DTYPE_F32/F64/F16/BF16) and each architecture, the exact text the CuPy wrappers compile
is compiled to a cubin (so ptxas runs) with the options CuPy adds at run time plus
``-Werror=all-warnings --ptxas-options=-v``. The ptxas report gives registers, shared memory,
stack frame and spills per kernel. Exit status 1 on any compile error, any warning, any spill
or stack frame (local memory), or an entry point the launch planner names but the source lacks.
The kernels are every family of xbn.kernels._launch.OPS, the fused reductions of the whole-step
ops included; each fused kernel's registers are also listed beside its plain twin's (the cost
of the per-channel epilogue in the last block).

Needs ``pip install "cupy-cuda13x>=14" "nvidia-cuda-nvrtc==13.*"``. Only CuPy's low-level
``cupy.cuda.nvrtc`` bindings are used: CuPy's compile helpers ask the driver for a device.
libnvrtc is preloaded from the nvidia-cuda-nvrtc wheel (or $CUDA_PATH) when it can be found,
so the check does not depend on how CuPy itself searches for it. The xbn package itself is not
imported (only xbn/kernels/_launch.py and _source.py are), so array-api-compat is not needed.

Usage: python ci/check_kernels.py [--arch sm_80 --arch sm_90] [--json FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _kernel_helpers() -> tuple[ModuleType, ModuleType]:
    """xbn.kernels._launch and xbn.kernels._source (plain Python), without running
    xbn/__init__.py: the package imports array-api-compat, which this check has no use for and
    a machine that only compiles kernels may lack.

    Where ``xbn`` is not imported yet, ``xbn`` and ``xbn.kernels`` are entered in sys.modules as
    bare package shells (their spec and search path, their __init__ not run), so the two
    modules import by their real names: relative imports and importlib.resources (the sources
    are package data of xbn.kernels) work as in the installed package.
    """
    if "xbn" not in sys.modules:
        for name, folder in (("xbn", ROOT / "xbn"), ("xbn.kernels", ROOT / "xbn" / "kernels")):
            spec = importlib.util.spec_from_file_location(
                name, folder / "__init__.py", submodule_search_locations=[str(folder)]
            )
            assert spec is not None
            sys.modules[name] = importlib.util.module_from_spec(spec)
    return importlib.import_module("xbn.kernels._launch"), importlib.import_module("xbn.kernels._source")


_launch, _source = _kernel_helpers()

ARCHS = ("sm_80", "sm_90")
# What cupy.RawModule adds to the options of xbn.kernels._source.compile_options at run time.
CUPY_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")
CHECK_OPTIONS = ("-Werror=all-warnings", "--ptxas-options=-v")


def _nvrtc_candidates() -> list[str]:
    """libnvrtc shared objects from the pip wheels on sys.path, then from $CUDA_PATH."""
    dirs: list[str] = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib", "nvidia/cu12/lib"):
            d = os.path.join(entry or ".", sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    for var in ("CUDA_PATH", "CUDA_HOME"):
        root = os.environ.get(var)
        if root:
            dirs += [os.path.join(root, "lib64"), os.path.join(root, "lib")]
    found = []
    for d in dirs:
        found += sorted(glob.glob(os.path.join(d, "libnvrtc.so*")), key=len)
    return found


def load_nvrtc():
    """Import cupy.cuda.nvrtc with a usable libnvrtc; return (module, version, where from)."""
    loaded_from = "CuPy's own search"
    for lib in _nvrtc_candidates():
        if "builtins" in os.path.basename(lib):
            continue
        directory = os.path.dirname(lib)
        try:
            # libnvrtc dlopens its builtins library by name: load that first, from the same wheel.
            for builtins in sorted(glob.glob(os.path.join(directory, "libnvrtc-builtins.so*"))):
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            loaded_from = lib
            break
        except OSError:
            continue
    try:
        from cupy.cuda import nvrtc
    except ImportError as e:
        raise SystemExit(
            f"check_kernels: cannot import cupy.cuda.nvrtc ({e}); "
            'pip install "cupy-cuda13x>=14" "nvidia-cuda-nvrtc==13.*"'
        ) from e
    try:
        version = nvrtc.getVersion()
    except Exception as e:  # the bindings load libnvrtc lazily: this is where a missing one shows
        raise SystemExit(
            f"check_kernels: libnvrtc not usable ({e}); tried {_nvrtc_candidates() or 'nothing'}; "
            'pip install "nvidia-cuda-nvrtc==13.*" or set CUDA_PATH'
        ) from e
    return nvrtc, version, loaded_from


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """Per entry point: registers, barriers, smem, stack, spill_stores, spill_loads."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            out[current] = {
                "registers": -1,
                "barriers": 0,
                "smem": 0,
                "stack": 0,
                "spill_stores": 0,
                "spill_loads": 0,
            }
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            out[current].update(
                stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3))
            )
            continue
        m = _USED.search(line)
        if m:
            out[current].update(
                registers=int(m.group(1)), barriers=int(m.group(2) or 0), smem=int(m.group(3) or 0)
            )
    return out


def problems_in_log(log: str) -> list[str]:
    """Lines of a compile log that are warnings or errors (ptxas 'info' lines are not)."""
    bad = []
    for line in log.splitlines():
        low = line.lower()
        if "warning" in low or "error" in low:
            bad.append(line.strip())
    return bad


def planned_kernels(key: str) -> set[str]:
    """Every entry point the launch planner can name for dtype ``key``: each family, layout and
    vector width vector_width() can return for that dtype's item size."""
    itemsize = {"f32": 4, "f64": 8, "f16": 2, "bf16": 2}[key]
    widths = {1} | {n // itemsize for n in _launch.VECTOR_BYTES if n // itemsize > 1}
    return {f"xbn_{op}_{kind}_v{w}" for op in _launch.OPS for kind in ("ncl", "nlc") for w in widths}


def compile_one(nvrtc, source: str, key: str, arch: str):
    text = _source.kernel_source(source)
    options = list(_source.compile_options(key)) + [f"-arch={arch}", *CUPY_OPTIONS, *CHECK_OPTIONS]
    prog = nvrtc.createProgram(text, source, [], [])
    error = None
    try:
        nvrtc.compileProgram(prog, options)
    except Exception as e:  # NVRTCError: the log below says why
        error = str(e)
    log = nvrtc.getProgramLog(prog).replace("\x00", "")
    cubin = 0
    if error is None:
        try:
            cubin = len(nvrtc.getCUBIN(prog))
        except Exception as e:
            error = f"no cubin: {e}"
    nvrtc.destroyProgram(prog)
    return error, log, cubin, options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="sm_XX (repeatable); default sm_80, sm_90")
    parser.add_argument("--json", type=Path, help="write the register/spill report here")
    args = parser.parse_args(argv)
    archs = tuple(args.arch or ARCHS)

    nvrtc, version, where = load_nvrtc()
    print(f"NVRTC {version[0]}.{version[1]} ({where})")
    failures: list[str] = []
    report: list[dict[str, object]] = []
    defined: dict[str, set[str]] = {key: set() for key in _source.DTYPE_KEYS}

    for source in _source.SOURCES:
        for key in _source.DTYPE_KEYS:
            expected = set(_source.kernel_names(source, key))
            defined[key] |= expected
            for arch in archs:
                error, log, cubin, _options = compile_one(nvrtc, source, key, arch)
                tag = f"{source} [{key}, {arch}]"
                if error is not None:
                    failures.append(f"{tag}: compile failed: {error}\n{log}")
                    print(f"FAIL {tag}: {error}\n{log}")
                    continue
                for line in problems_in_log(log):
                    failures.append(f"{tag}: {line}")
                stats = parse_ptxas(log)
                missing = expected - set(stats)
                if missing:
                    failures.append(f"{tag}: ptxas reported no entry for {sorted(missing)}")
                for name in sorted(stats):
                    s = stats[name]
                    flag = ""
                    if s["spill_stores"] or s["spill_loads"]:
                        flag = "  SPILL"
                        failures.append(
                            f"{tag} {name}: spills {s['spill_stores']} bytes stores, "
                            f"{s['spill_loads']} bytes loads"
                        )
                    if s["stack"]:
                        flag += "  STACK"
                        failures.append(f"{tag} {name}: {s['stack']} bytes stack frame (local memory)")
                    print(
                        f"{arch}  {key:4s}  {name:30s}  {s['registers']:3d} regs  "
                        f"{s['smem']:6d} B smem  {s['stack']} B stack  "
                        f"{s['spill_stores']}/{s['spill_loads']} B spill st/ld{flag}"
                    )
                    report.append({"source": source, "dtype": key, "arch": arch, "kernel": name, **s})
                if cubin <= 0:
                    failures.append(f"{tag}: empty cubin")

    for key in _source.DTYPE_KEYS:
        unknown = planned_kernels(key) - defined[key]
        if unknown:
            failures.append(f"[{key}] the launch planner names kernels no source defines: {sorted(unknown)}")

    fused = [r for r in report if "_fused_" in str(r["kernel"])]
    if fused:
        plain = {(r["dtype"], r["arch"], r["kernel"]): r["registers"] for r in report}
        print("\nfused epilogue, registers vs the plain twin:")
        for r in fused:
            twin = plain.get((r["dtype"], r["arch"], str(r["kernel"]).replace("_fused_", "_")))
            print(
                f"{r['arch']}  {r['dtype']:4s}  {r['kernel']:36s}  {r['registers']:3d} regs  "
                f"(plain {twin}, {r['registers'] - (twin or 0):+d})"
            )

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "nvrtc": list(version),
                    "archs": list(archs),
                    "options": list(CUPY_OPTIONS + CHECK_OPTIONS),
                    "kernels": report,
                },
                indent=1,
            )
        )
    if failures:
        print(f"\ncheck_kernels: {len(failures)} problem(s):", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    combos = len(_source.SOURCES) * len(_source.DTYPE_KEYS) * len(archs)
    print(
        f"\ncheck_kernels: OK: {combos} compilations, {len(report)} kernel builds, "
        "no warnings, no spills, no stack frames"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
