"""End to end: ``rswap run`` with two named co-processors, each sensed by its own probe and one
enforced by its own apply command, for tasks rswap starts in real cgroups; the host is restored.

The probe is sent each task's processes as the kernel lists them in the task's cgroup, and checks
every pid against ``/proc/<pid>/cgroup`` before it answers (a wrong pid makes it print a line
rswap refuses, and the tick records no sample).
"""
from __future__ import annotations

import json
import os
import re
import stat
import sys

from rswap_ebpf.host.cgroup import detect_mounts

from ..conftest import run_rswap
from .helpers import TIME_SCALE, owned_dirs

# argv: units-per-process.  Prints "<task> <processes in rswap/<task>> x units-per-process".
PROBE = r"""
import sys
per = float(sys.argv[1])
for line in sys.stdin:
    name, *pids = line.split()
    mine = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                text = f.read()
                if f"/rswap/{name}" in text or f"/rswap-batch/{name}" in text:
                    mine.append(pid)
        except FileNotFoundError:
            pass
    print(name, len(mine) * per if len(mine) == len(pids) else "wrong-pids")
"""
# argv: log task units.  Appends "<task> <units> <number of pids on stdin>".
APPLY = r"""
import sys
log, task, units = sys.argv[1:4]
open(log, "a").write(f"{task} {units} {len(sys.stdin.read().split())}\n")
"""
ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+\S+\s+(coproc:\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)")


def _exe(path, body):
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_run_senses_and_enforces_two_coprocs_per_task_and_restores(tmp_path, rswap_env,
                                                                   unique_name):
    probe = _exe(tmp_path / "probe", PROBE)
    log = tmp_path / "fpga0.applied"
    apply = _exe(tmp_path / "apply", APPLY)
    multi, solo = f"multi-{unique_name}", f"solo-{unique_name}"
    seconds = int(60 * TIME_SCALE)
    cfg = tmp_path / "rswap.toml"
    cfg.write_text(f"""
[daemon]
interval = {0.4 * TIME_SCALE}
window = 1
headroom = 0
[resources.coproc.fpga0]
total = 8
probe = {json.dumps([probe, "1"])}
apply = {json.dumps([apply, str(log)])}
[resources.coproc.npu]
total = 16
probe = {json.dumps([probe, "2"])}
[[task]]
name = "{multi}"
priority = "critical"
command = ["sh", "-c", "sleep {seconds} & sleep {seconds} & wait"]
forecaster = "last_value"
coproc = {{ fpga0 = {{ max = 6 }}, npu = {{ min = 1 }} }}
[[task]]
name = "{solo}"
priority = "batch"
command = ["sleep", "{seconds}"]
forecaster = "last_value"
coproc = {{ fpga0 = {{ min = 1 }}, npu = {{ min = 1 }} }}
""")
    out = run_rswap("run", "--config", str(cfg), "--count", "6",
                    env={**rswap_env, "RSWAP_PIN_DIR": f"/sys/fs/bpf/rswap-test-{unique_name}"},
                    timeout=120 * TIME_SCALE)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "wrong-pids" not in out.stdout + out.stderr
    rows = [m.groups() for m in map(ROW.match, out.stdout.splitlines()) if m]
    last = {(task, res): (int(used), int(alloc)) for _, task, res, used, _, alloc, _ in rows}
    # sh and its two sleeps, each counted by the probe in the task's own cgroup; npu counts 2 each.
    assert last[(multi, "coproc:fpga0")][0] == 3 and last[(solo, "coproc:fpga0")][0] == 1, out.stdout
    # npu has no apply command, so nothing caps a task there: a task using all it holds is not
    # taken for capped, and its allocation is its use.
    assert last[(multi, "coproc:npu")] == (6, 6) and last[(solo, "coproc:npu")] == (2, 2), out.stdout
    assert "coproc:fpga0 8 units, coproc:npu 16 units" in out.stdout
    # fpga0's apply command was told every allocation, with the task's pids: the last it heard
    # is what the pool held at the end (within the task's limits); npu has no apply command.
    applied = [line.split() for line in log.read_text().splitlines()]
    final = {task: (int(units), int(pids)) for task, units, pids in applied}
    assert final[multi] == (last[(multi, "coproc:fpga0")][1], 3), (applied, out.stdout)
    assert final[solo] == (last[(solo, "coproc:fpga0")][1], 1), (applied, out.stdout)
    assert 3 <= final[multi][0] <= 6 and final[solo][0] >= 1
    assert "host restored" in out.stdout
    mounts = detect_mounts()
    left = [d for d in owned_dirs(multi, solo, mounts=mounts) if os.path.exists(d)]
    assert not left, left
