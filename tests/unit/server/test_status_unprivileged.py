"""``rswap status`` and ``rswap top`` as an unprivileged user: no traceback on the root lock."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from tests.conftest import rswap_cmd

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root and setpriv (to run a command as nobody)")

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

STAND_IN = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)  # as the daemon's Lock does
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"%d\\n" % os.getpid())
    print("locked", flush=True)
    time.sleep(120)
""")


def _status(pid: int) -> dict:
    return {"pid": pid, "tick": 4, "time": time.time(), "interval": 1.0, "dry_run": False,
            "pool": {"cpu": {"unit": "millicores", "total": 2000, "available": 500}},
            "tasks": {"web": {"priority": "critical", "exited": None, "resources": {"cpu": {
                "usage": 900.0, "forecast": 1000.0, "allocation": 1500, "model": "auto",
                "mae": 12.0}}}},
            "swaps": [], "shortfalls": []}


@pytest.fixture
def run_dir():
    d = tempfile.mkdtemp(prefix="rswap-run-")
    os.chmod(d, 0o755)  # as /run/rswap: nobody may look in, the lock inside is root's (0600)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def _as_nobody(*args, run_dir):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent",
           "PYTHONDONTWRITEBYTECODE": "1", "RSWAP_RUN_DIR": run_dir,
           "PYTHONPATH": os.getcwd()}
    return subprocess.run(NOBODY + rswap_cmd() + list(args), capture_output=True, text=True,
                          timeout=60, env=env, cwd="/")


def test_status_and_top_as_nobody_answer_from_the_status_file(run_dir):
    lock = os.path.join(run_dir, "rswap.lock")
    daemon = subprocess.Popen([sys.executable, "-c", STAND_IN, lock], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert daemon.stdout.readline().strip() == "locked"
        path = os.path.join(run_dir, "status.json")
        with open(path, "w") as f:
            json.dump(_status(daemon.pid), f)
        os.chmod(path, 0o644)
        for cmd in (("status",), ("top", "0.1", "1", "--no-live")):
            r = _as_nobody(*cmd, run_dir=run_dir)
            assert r.returncode == 0, (cmd, r.stderr)
            assert f"rswap pid {daemon.pid}" in r.stdout and "web" in r.stdout
            assert "Traceback" not in r.stderr
        os.chmod(path, 0o600)  # a status file nobody may read: one line, not a traceback
        for cmd in (("status",), ("top", "0.1", "1")):
            r = _as_nobody(*cmd, run_dir=run_dir)
            assert r.returncode == 1 and "Traceback" not in r.stderr, (cmd, r.stderr)
            assert r.stderr.strip().splitlines() == [
                f"rswap: error: cannot read {path}: permission denied (run as root)"]
    finally:
        daemon.kill()
        daemon.wait()
    os.chmod(path, 0o644)  # the daemon is gone (killed, its status left behind)
    for cmd in (("status",), ("top", "0.1", "1")):
        r = _as_nobody(*cmd, run_dir=run_dir)
        assert r.returncode == 1 and "Traceback" not in r.stderr, (cmd, r.stderr)
        assert "no rswap daemon is running" in r.stderr
