"""Backend tiers: every test that takes the ``backend`` fixture runs once per selected backend.

Select with ``pytest --backend NAME`` (repeatable; ``all`` = every known backend) or the
environment variable ``XBN_TEST_BACKENDS`` (comma-separated). Default: numpy. A selected
backend that cannot run here is skipped with the reason, never silently.
"""

from __future__ import annotations

import os

import pytest

from xbn import backends

ALL = backends.KNOWN_BACKENDS

#: array-api-strict is pinned to one standard version, so a test never leans on a newer one.
STRICT_API_VERSION = "2024.12"

try:
    import array_api_strict

    array_api_strict.set_array_api_strict_flags(api_version=STRICT_API_VERSION)
except ImportError:
    pass


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        action="append",
        default=None,
        help=f"backend to run layer tests on; repeatable; 'all' = {', '.join(ALL)}",
    )


def selected_backends(config: pytest.Config) -> list[str]:
    names = config.getoption("--backend") or []
    if not names:
        env = os.environ.get("XBN_TEST_BACKENDS", "")
        names = [n for n in env.split(",") if n.strip()] or ["numpy"]
    out: list[str] = []
    for n in names:
        for name in ALL if n.strip() == "all" else (n.strip(),):
            if name not in ALL:
                raise pytest.UsageError(f"unknown backend {name!r}; expected one of {ALL} or 'all'")
            if name not in out:
                out.append(name)
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", selected_backends(metafunc.config), indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> backends.Backend:
    """The resolved :class:`xbn.backends.Backend` for this tier (skips with the reason if unusable)."""
    try:
        return backends.resolve(request.param)
    except backends.BackendUnavailableError as e:
        pytest.skip(f"backend {request.param!r} unavailable: {e}")
