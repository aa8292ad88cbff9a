"""Helpers for kernel tests: busy loops, /proc CPU time, private cgroups that always go away."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

from rswap_ebpf.host.cgroup import OWNED_SUBTREES, V2_CONTROLLERS, detect_mounts
from rswap_ebpf.host.cpu.writer import cpu_writer
from rswap_ebpf.host.journal import remove_cgroup_dir

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Wall-clock stretch for tests paced against real time: 1 on real hardware; tools/vm_test sets
#: RSWAP_TEST_TIME_SCALE in a software-emulated (TCG) guest, where everything runs several times
#: slower.  Tests multiply their intervals, workload durations and deadlines by it, not bounds.
TIME_SCALE = float(os.environ.get("RSWAP_TEST_TIME_SCALE") or 1)
BUSY = [sys.executable, "-c", "import time\nend=time.monotonic()+60\nwhile time.monotonic()<end: pass"]


def proc_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` from /proc/<pid>/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@contextmanager
def busy_process(cgroup_dirs: list[str] | None = None, cmd: list[str] = BUSY):
    """A busy loop (or ``cmd``; stops by itself after 60 s), placed in ``cgroup_dirs`` before
    it runs."""
    procs = [os.path.join(d, "cgroup.procs") for d in cgroup_dirs or []]

    def enter():
        for p in procs:
            with open(p, "w") as f:
                f.write(str(os.getpid()))

    p = subprocess.Popen(cmd, preexec_fn=enter)
    try:
        yield p
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


@contextmanager
def root_controllers():
    """On a unified host, cpu/io/memory enabled at the root while the test runs.

    An operator's cgroup that carries a CPU or IO limit lives under a parent that enables the
    controller; Debian 12's systemd enables only memory and pids at the root.  What this turned on
    is turned off again afterwards (unless something below still uses it: EBUSY).
    """
    mounts = detect_mounts()
    enabled: list[str] = []
    ctl = os.path.join(mounts.unified or "", "cgroup.subtree_control")
    if mounts.mode == "unified":
        with open(ctl) as f:
            on = set(f.read().split())
        enabled = sorted((mounts.v2_controllers() & set(V2_CONTROLLERS)) - on)
        for c in enabled:
            with open(ctl, "w") as f:
                f.write(f"+{c}")
    try:
        yield
    finally:
        for c in enabled:
            try:
                with open(ctl, "w") as f:
                    f.write(f"-{c}")
            except OSError as err:
                if err.errno != errno.EBUSY:
                    raise


def set_cpu_limit(dirs: dict[str, str], quota_us: int, shares: int) -> dict[str, str]:
    """Give a scratch cgroup a CFS quota and a weight by hand, the way its host's cpu controller
    takes them (v1 ``cpu.cfs_quota_us``/``cpu.shares``, v2 ``cpu.max``/``cpu.weight``).

    Returns ``{path: text the kernel now shows}``; the first item is the quota.
    """
    writer = cpu_writer(detect_mounts())
    if writer.version == "v1":
        d = dirs["cpu"]
        files = {"cpu.cfs_quota_us": str(quota_us), "cpu.shares": str(shares)}
    else:
        d = dirs["unified"]
        period = open(os.path.join(d, "cpu.max")).read().split()[1]
        files = {"cpu.max": f"{quota_us} {period}", "cpu.weight": str(max(1, shares * 100 // 1024))}
    out = {}
    for name, value in files.items():
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.write(value)
        with open(path) as f:
            out[path] = f.read().strip()
    return out


@contextmanager
def scratch_cgroup(name: str):
    """``name`` made in every hierarchy rswap uses; removed afterwards whatever happens.

    On a unified host the root enables cpu/io/memory meanwhile (:func:`root_controllers`), so the
    directory has ``cpu.max`` and ``io.max`` like an operator's cgroup would.
    """
    with root_controllers(), _scratch_dirs(name) as dirs:
        yield dirs


@contextmanager
def _scratch_dirs(name: str):
    mounts = detect_mounts()
    dirs = {h: os.path.join(m, name) for h, m in mounts.hierarchies.items()}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    try:
        yield dirs
    finally:
        for d in dirs.values():
            for _ in range(20):
                try:
                    remove_cgroup_dir(d)
                    break
                except OSError:
                    time.sleep(0.1)


def owned_dirs(*names: str, mounts=None) -> list[str]:
    """Every directory rswap could make for these task names: ``rswap/<name>`` and
    ``rswap-batch/<name>`` (batch tasks), in every hierarchy."""
    mounts = mounts or detect_mounts()
    return [os.path.join(m, sub, n) for m in mounts.hierarchies.values()
            for sub in OWNED_SUBTREES for n in names]
