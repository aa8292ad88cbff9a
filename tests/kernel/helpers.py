"""Helpers for kernel tests: busy loops, /proc CPU time, private cgroups that always go away."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

from rswap_ebpf.enforce.cgroup import detect_mounts
from rswap_ebpf.enforce.journal import remove_cgroup_dir

CLK_TCK = os.sysconf("SC_CLK_TCK")
BUSY = [sys.executable, "-c", "import time\nend=time.monotonic()+60\nwhile time.monotonic()<end: pass"]


def proc_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` from /proc/<pid>/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@contextmanager
def busy_process(cgroup_dirs: list[str] | None = None):
    """A busy loop (stops by itself after 60 s), placed in ``cgroup_dirs`` before it runs."""
    procs = [os.path.join(d, "cgroup.procs") for d in cgroup_dirs or []]

    def enter():
        for p in procs:
            with open(p, "w") as f:
                f.write(str(os.getpid()))

    p = subprocess.Popen(BUSY, preexec_fn=enter)
    try:
        yield p
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


@contextmanager
def scratch_cgroup(name: str):
    """``name`` made in every hierarchy rswap uses; removed afterwards whatever happens."""
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
