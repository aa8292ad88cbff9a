"""Shared fixtures and the rule that kernel tests may not silently skip.

Tests that need root and the real kernel carry ``@pytest.mark.kernel`` (or live under
``tests/kernel/``); they skip with a reason when not root.  With ``RSWAP_REQUIRE_KERNEL=1`` (set by
``tools/test``, hence by ``.ci/run``) a skipped kernel test fails the session instead.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

ROOT = os.geteuid() == 0
_kernel_skips: list[str] = []


#: How much slower than this host a test runs: tools/vm_test sets it in an emulated guest.
TIME_SCALE = float(os.environ.get("RSWAP_TEST_TIME_SCALE") or 1)


def _stretched_timeout_s(config) -> float | None:
    """The ini's per-test timeout stretched by RSWAP_TEST_TIME_SCALE, when that is what applies.

    ``--timeout`` and ``PYTEST_TIMEOUT`` are taken as given (None here): whoever sets them has
    already said how long a test may take where it runs.
    """
    if TIME_SCALE == 1 or not config.pluginmanager.hasplugin("timeout"):
        return None
    if config.getoption("timeout", None) is not None or os.environ.get("PYTEST_TIMEOUT"):
        return None
    ini = config.getini("timeout")
    return float(ini) * TIME_SCALE if ini else None


def pytest_report_header(config):
    stretched = _stretched_timeout_s(config)
    if stretched is not None:
        return f"per-test timeout: {stretched:g}s (the ini's, x RSWAP_TEST_TIME_SCALE={TIME_SCALE:g})"
    return None


def pytest_collection_modifyitems(config, items):
    rerun = config.pluginmanager.hasplugin("rerunfailures")
    stretched = _stretched_timeout_s(config)
    for item in items:
        if stretched is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(stretched))
        if "/tests/kernel/" in str(item.fspath):
            item.add_marker(pytest.mark.kernel)
            # Kernel tests measure real rates and ticks on a shared 2-core VM: one retry absorbs
            # a scheduling hiccup; a real failure fails every attempt (all are reported).  A test
            # that ran out of time is not run again: it would only wait as long a second time.
            if rerun:
                item.add_marker(pytest.mark.flaky(reruns=1, reruns_delay=1,
                                                  rerun_except="Timeout .* from pytest-timeout"))
        if item.get_closest_marker("kernel") and not ROOT:
            item.add_marker(pytest.mark.skip(reason="needs root (kernel test)"))


def pytest_runtest_logreport(report):
    if report.skipped and "kernel" in report.keywords:
        _kernel_skips.append(f"{report.nodeid}: {report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr}")


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("RSWAP_REQUIRE_KERNEL") == "1" and _kernel_skips:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr:
            tr.write_line(f"\nRSWAP_REQUIRE_KERNEL=1 but {len(_kernel_skips)} kernel test(s) skipped:", red=True)
            for s in _kernel_skips:
                tr.write_line(f"  {s}", red=True)
        session.exitstatus = 1


@pytest.fixture
def rswap_env(tmp_path, monkeypatch):
    """Private state and run directories for one test (journal, lock, status file)."""
    state = tmp_path / "state"
    run = tmp_path / "run"
    monkeypatch.setenv("RSWAP_STATE_DIR", str(state))
    monkeypatch.setenv("RSWAP_RUN_DIR", str(run))
    return {"state": str(state), "run": str(run), "RSWAP_STATE_DIR": str(state),
            "RSWAP_RUN_DIR": str(run)}


@pytest.fixture
def unique_name():
    return f"t{uuid.uuid4().hex[:8]}"


def rswap_cmd() -> list[str]:
    """The installed console script when present, else ``python -m rswap_ebpf.cli.main``."""
    exe = shutil.which("rswap", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "rswap_ebpf.cli.main"]


def run_rswap(*args, env=None, timeout=120, **kw) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run(rswap_cmd() + list(args), capture_output=True, text=True,
                          timeout=timeout, env=full_env, **kw)
