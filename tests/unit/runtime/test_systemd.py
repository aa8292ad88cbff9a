"""The shipped systemd unit and default configuration.

``systemd-analyze verify --root`` checks the unit offline, against a throwaway root that holds the
distribution's unit files and an ``rswap`` executable where the package installs one; verify exits
0 even for directives it ignores, so its output must also be clean.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from rswap_ebpf.runtime import config
from rswap_ebpf.cli.ops import shipped
from tests.conftest import run_rswap

UNIT_DIRS = ("/usr/lib/systemd/system", "/lib/systemd/system")


def _verify(unit_text: str, tmp_path) -> subprocess.CompletedProcess:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    system_units = next((d for d in UNIT_DIRS if os.path.isfile(os.path.join(d, "sysinit.target"))), None)
    if system_units is None:
        pytest.skip("no systemd unit files (sysinit.target) on this host to verify against")
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    exe = root / "usr/local/bin/rswap"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    unit = root / "etc/systemd/system/rswap.service"
    unit.parent.mkdir(parents=True)
    unit.write_text(unit_text)
    return subprocess.run([analyze, "verify", f"--root={root}", "/etc/systemd/system/rswap.service"],
                          capture_output=True, text=True, timeout=60)


def test_unit_passes_systemd_analyze_verify(tmp_path):
    res = _verify(shipped("rswap.service"), tmp_path)
    assert res.returncode == 0, res.stderr
    assert "rswap.service" not in res.stderr + res.stdout, res.stderr


def test_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a bad directive value shows up in verify's output."""
    broken = shipped("rswap.service").replace("Restart=on-failure", "Restart=sometimes")
    res = _verify(broken, tmp_path)
    assert "restart specifier" in res.stderr


def _directives(text: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^(\w+)=(.*)$", text, re.M))


def test_unit_runs_the_etc_config_and_restores_after_every_stop():
    d = _directives(shipped("rswap.service"))
    assert d["ExecStart"] == "rswap run --config /etc/rswap/rswap.toml"
    assert d["ExecStopPost"] == "rswap restore"
    assert d["Restart"] == "on-failure"
    assert d["RestartPreventExitStatus"] == "2"  # bad config: ConfigError's exit status


def test_default_config_parses_and_manages_cpu():
    cfg = config.parse(shipped("rswap.toml"), "rswap.toml")
    assert cfg.tasks == ()
    assert cfg.daemon == config.DaemonConfig()  # commented values are the defaults
    assert {r.key for r in cfg.resources} == {"cpu"}


def test_default_config_example_tasks_parse_when_uncommented():
    text = shipped("rswap.toml")
    head, marker, example = text.partition("# Example (remove the leading")
    assert marker
    lines = example.splitlines()[1:]
    uncommented = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines)
    cfg = config.parse(head + uncommented, "rswap.toml example")
    assert [(t.name, t.priority.name) for t in cfg.tasks] == [("web", "CRITICAL"), ("reports", "BATCH")]
    assert cfg.tasks[0].cgroup == "system.slice/nginx.service"


def test_default_config_command_prints_the_shipped_files(tmp_path):
    res = run_rswap("default-config")
    assert res.returncode == 0, res.stderr
    assert res.stdout == shipped("rswap.toml")
    res = run_rswap("default-config", "--unit")
    assert res.returncode == 0, res.stderr
    assert "ExecStopPost=rswap restore" in res.stdout
    # The service as shipped refuses to run the config until a task is described: exit 2.
    path = tmp_path / "rswap.toml"
    path.write_text(shipped("rswap.toml"))
    res = run_rswap("run", "--config", str(path), "--count", "1")
    assert res.returncode == 2
    assert "no [[task]]" in res.stderr
