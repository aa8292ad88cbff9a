"""The CLI as root: doctor's verdicts on this kernel, dry runs that write nothing."""
from __future__ import annotations

import json
import os
import sys

from ..conftest import run_rswap
from .helpers import TIME_SCALE


def test_doctor_reports_every_feature_and_passes_for_cpu(rswap_env, unique_name):
    env = {**rswap_env, "RSWAP_PIN_DIR": f"/sys/fs/bpf/test-{unique_name}"}
    out = run_rswap("doctor", "--json", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    checks = {c["feature"]: c for c in json.loads(out.stdout)}
    for feature in ("root", "bcc", "bpffs", "sched_switch hook", "BPF program load", "map pinning",
                    "cpu controller"):
        assert checks[feature]["status"] in ("ok", "fallback"), checks[feature]
    # every kernel this runs on (6.x) counts the time a throttled group waited
    assert checks["throttled time"]["status"] == "ok", checks["throttled time"]
    for c in checks.values():
        assert c["status"] in ("ok", "missing", "fallback")
        if c["status"] == "missing":
            assert c["detail"], c  # says why
    assert not os.path.exists(env["RSWAP_PIN_DIR"])


def test_doctor_fails_when_the_config_needs_something_missing(tmp_path, rswap_env, unique_name):
    if os.path.exists("/sys/fs/resctrl/schemata"):
        import pytest

        pytest.skip("this host has resctrl: nothing is missing for a cache task")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[task]]\nname = "x"\ncommand = ["true"]\ncache = { min = 1 }\n')
    env = {**rswap_env, "RSWAP_PIN_DIR": f"/sys/fs/bpf/test-{unique_name}"}
    out = run_rswap("doctor", "--config", str(cfg), env=env)
    assert out.returncode == 1, out.stdout
    assert "missing" in out.stdout and "resctrl" in out.stdout


def test_dry_run_plans_but_writes_no_limit(tmp_path, rswap_env, unique_name):
    import subprocess
    import time

    from rswap_ebpf.host.cgroup import detect_mounts

    from ..conftest import rswap_cmd

    name = f"dry-{unique_name}"
    cfg = tmp_path / "c.toml"
    # Ticks paced for the host: in an emulated VM the spinning task takes seconds to start.
    cfg.write_text(f'[daemon]\ninterval = {0.3 * TIME_SCALE}\n[[task]]\nname = "{name}"\n'
                   f'command = ["{sys.executable}", "-m", "rswap_ebpf.demo", "spin", "--seconds", '
                   f'"{20 * TIME_SCALE:g}"]\ncpu = {{ max = 300 }}\n')
    env = {**os.environ, **rswap_env, "RSWAP_PIN_DIR": f"/sys/fs/bpf/test-{unique_name}"}
    mounts = detect_mounts()
    cpu_root = mounts.v1.get("cpu") or mounts.unified
    cpu_dir = os.path.join(cpu_root, "rswap", name)
    # decided from the mount root: the shared rswap/ parent does not exist yet on a clean host
    limit_file = "cpu.cfs_quota_us" if os.path.exists(os.path.join(cpu_root, "cpu.cfs_quota_us")) else "cpu.max"
    p = subprocess.Popen(rswap_cmd() + ["run", "--dry-run", "--config", str(cfg), "--count", "12"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 20 * TIME_SCALE
        while p.poll() is None and time.monotonic() < deadline:
            try:
                # the status file the daemon publishes each tick: polling it is fast enough to
                # see several ticks (a `rswap status` process per poll was not, in a full run)
                with open(os.path.join(rswap_env["run"], "status.json")) as f:
                    st = json.load(f)
                with open(os.path.join(cpu_dir, limit_file)) as f:
                    seen.append((st.get("tick", 0), st["tasks"][name]["resources"]["cpu"]["allocation"],
                                 f.read().strip()))
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.2)
    finally:
        out, err = p.communicate(timeout=30 * TIME_SCALE)
    assert p.returncode == 0, err
    assert "dry run" in out
    planned = [s for s in seen if s[0] >= 2 and s[1] > 0]
    assert planned, (seen, out[-3000:])  # it planned an allocation ...
    assert all(v in ("-1", "max 100000") for _, _, v in planned), planned  # ... and wrote none
    assert not os.path.exists(cpu_dir)


def test_doctor_leaves_a_running_daemons_pins_alone(rswap_env):
    """A stand-in for a daemon's pins (a map pinned in /sys/fs/bpf/rswap) survives doctor."""
    import glob
    import shutil
    import subprocess

    import pytest

    from rswap_ebpf import paths

    env = {k: v for k, v in os.environ.items() if k != "RSWAP_PIN_DIR"}
    env.update(rswap_env)
    daemon_dir = os.path.join(paths.root("BPFFS_ROOT"), paths.RSWAP_BPF_DIR)
    if os.path.exists(daemon_dir):
        pytest.skip(f"{daemon_dir} exists: a daemon (or a crashed test) owns it")
    if not shutil.which("bpftool"):
        pytest.skip("needs bpftool to pin a stand-in map")
    os.mkdir(daemon_dir, 0o700)
    from rswap_ebpf.host.cpu.collector import MAPS

    names = sorted(MAPS[:2])  # the names the daemon's CPU collector pins, as doctor's does
    try:
        for name in names:
            subprocess.run(["bpftool", "map", "create", os.path.join(daemon_dir, name), "type",
                            "hash", "key", "4", "value", "4", "entries", "4", "name", "standin"],
                           check=True)
        out = run_rswap("doctor", env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "removed after" in out.stdout
        assert sorted(os.listdir(daemon_dir)) == names
        for name in names:  # still the stand-in's maps, not replaced by doctor's
            show = subprocess.run(["bpftool", "map", "show", "pinned",
                                   os.path.join(daemon_dir, name)], capture_output=True, text=True)
            assert show.returncode == 0 and "standin" in show.stdout, show.stderr
        assert glob.glob(os.path.join(paths.root("BPFFS_ROOT"), "rswap-doctor-*")) == []
    finally:
        if os.path.isdir(daemon_dir):
            for name in os.listdir(daemon_dir):
                os.unlink(os.path.join(daemon_dir, name))
            os.rmdir(daemon_dir)
