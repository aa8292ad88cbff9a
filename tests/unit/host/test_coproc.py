"""Co-processor probe/apply protocol (rswap_ebpf/coproc.py) with real probe scripts."""
from __future__ import annotations

import os
import stat
import sys

import pytest

from rswap_ebpf.runtime import config as configmod
from rswap_ebpf.host.coproc.device import Coproc, CoprocSpec, ProbeError, parse_probe_output
from rswap_ebpf.host.registry import DriverContext
from rswap_ebpf.host.coproc.driver import make
from rswap_ebpf.host.cgroup import CgroupMounts, FileApplier, TaskCgroup
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.errors import ConfigError, EnforceError


def script(tmp_path, name, body):
    p = tmp_path / name
    p.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(p)


ECHO_PIDS = """
for line in sys.stdin:
    name, *pids = line.split()
    print(name, len(pids) * 1.5)
"""


def test_probe_gets_tasks_and_pids_on_stdin(tmp_path):
    c = Coproc(CoprocSpec("fpga0", 8, (script(tmp_path, "p", ECHO_PIDS),)))
    assert c.probe({"web": [1, 2], "batch": [3]}) == {"web": 3.0, "batch": 1.5}


@pytest.mark.parametrize("out,why", [
    ("web\n", "expected '<task> <units>'"),
    ("web lots\n", "is not a number"),
    ("web -1\n", ">= 0"),
    ("web nan\n", "finite"),
    ("ghost 1\n", "unknown task 'ghost'"),
    ("web 1\nweb 2\n", "printed twice"),
])
def test_garbage_is_a_clear_error(out, why):
    with pytest.raises(ProbeError) as exc:
        parse_probe_output(out, ["web"], ("probe",))
    assert why in str(exc.value) and "line" in str(exc.value)


def test_comments_blank_lines_and_silent_tasks():
    assert parse_probe_output("# fpga0\n\nweb 2\n", ["web", "batch"]) == {"web": 2.0, "batch": 0.0}


def test_failing_missing_and_slow_probes(tmp_path):
    failing = script(tmp_path, "f", "sys.stderr.write('device busy\\n'); sys.exit(3)")
    with pytest.raises(ProbeError, match="status 3: device busy"):
        Coproc(CoprocSpec("x", 1, (failing,))).probe({})
    with pytest.raises(ProbeError, match="does not exist"):
        Coproc(CoprocSpec("x", 1, (str(tmp_path / "nope"),))).probe({})
    slow = script(tmp_path, "s", "import time; time.sleep(5)")
    with pytest.raises(ProbeError, match="no answer within"):
        Coproc(CoprocSpec("x", 1, (slow,), timeout_s=0.3)).probe({})


def test_apply_gets_task_units_and_pids(tmp_path):
    log = tmp_path / "applied"
    apply = script(tmp_path, "a", f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + "
                                  "' | ' + sys.stdin.read())")
    c = Coproc(CoprocSpec("x", 4, (script(tmp_path, "p", ECHO_PIDS),), (apply,)))
    c.apply("web", 3, [10, 11])
    assert log.read_text() == "web 3 | 10 11\n"
    bad = Coproc(CoprocSpec("x", 4, ("true",), (script(tmp_path, "b", "sys.exit(1)"),)))
    with pytest.raises(EnforceError, match="status 1"):
        bad.apply("web", 1, [])


def _ctx(tmp_path, text):
    cfg = configmod.parse(text)
    j = Journal(str(tmp_path / "journal.jsonl"))
    return DriverContext(CgroupMounts("unified", None), j, FileApplier(j), cfg)


def test_configured_driver_measures_and_reports_probe_failure_as_no_sample(tmp_path):
    probe = script(tmp_path, "p", ECHO_PIDS)
    ctx = _ctx(tmp_path, f"""
[resources.coproc]
name = "fpga0"
total = 8
probe = [{probe!r}]
[[task]]
name = "web"
pids = [{os.getpid()}]
coproc = {{ min = 1 }}
""")
    drv = make(ctx)
    drv.open()
    assert drv.total() == 8
    d = tmp_path / "cg"
    d.mkdir()
    (d / "cgroup.procs").write_text(f"{os.getpid()}\n")
    tasks = {"web": TaskCgroup("web", "web", {"unified": str(d)}, False)}
    assert drv.measure(tasks) == {"web": 1.5}
    os.unlink(probe)
    assert drv.measure(tasks) == {}  # no sample, not a zero
    assert "does not exist" in str(drv.last_error)


def test_config_requires_probe_and_total():
    with pytest.raises(ConfigError, match="resources.coproc.probe"):
        configmod.parse("[resources.coproc]\ntotal = 4\n")
    with pytest.raises(ConfigError, match="resources.coproc.total"):
        configmod.parse('[resources.coproc]\nprobe = ["x"]\n')
    with pytest.raises(ConfigError, match="list of arguments"):
        configmod.parse('[resources.coproc]\ntotal = 4\nprobe = "x --all"\n')
