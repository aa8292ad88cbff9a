"""Several co-processors on one host: each named co-processor ([resources.coproc.<name>]) is a
resource of its own (``ResourceId``, key ``coproc:<name>``) with its own probe, apply command,
pool, profiles, limits and metrics.

The daemon runs for real (its start-up, ticks, control-socket dispatcher and shutdown) over a
temporary cgroup tree, without root; the probes and apply commands are real executables that
follow the protocol in rswap_ebpf/coproc.py.
"""
from __future__ import annotations

import io
import json
import os
import stat
import sys

import pytest

from rswap_ebpf.runtime import config as configmod
from rswap_ebpf.server.control import Peer
from rswap_ebpf.runtime.daemon import Daemon
from rswap_ebpf.cli.doctor import check_coprocs
from rswap_ebpf.host.cgroup import CgroupMounts
from rswap_ebpf.errors import ConfigError, ResourceError
from rswap_ebpf.server.metrics import MetricsExporter
from rswap_ebpf.predict.profile import TaskProfiler
from rswap_ebpf.predict.store import ProfileStore
from rswap_ebpf.offline.replay import replay
from rswap_ebpf.model.resources import (ResourceId, ResourcePool, ResourceType, parse_resource)
from rswap_ebpf.cli.run_table import RunTable
from rswap_ebpf.server.scheduler import Scheduler, parse_limits
from rswap_ebpf.model.limits import Limits
from rswap_ebpf.offline.trace import TraceWriter, read_trace

COPROC = ResourceType.SPECIALIZED_COPROC
FPGA, NPU = ResourceId(COPROC, "fpga0"), ResourceId(COPROC, "npu")

# Prints, for each task it is sent, the units a JSON file of the test's gives it (0 if none);
# fails while a flag file exists.  argv: usage.json fail-flag
PROBE = """
import json, os, sys
usage, flag = sys.argv[1], sys.argv[2]
if os.path.exists(flag):
    sys.stderr.write("card not responding\\n"); sys.exit(4)
table = json.load(open(usage)) if os.path.exists(usage) else {}
for line in sys.stdin:
    name, *pids = line.split()
    print(name, table.get(name, 0))
"""
# Logs each enforcement: "<task> <units> | <pids>".  argv: log task units
APPLY = """
import sys
log, task, units = sys.argv[1], sys.argv[2], sys.argv[3]
open(log, "a").write(f"{task} {units} | {sys.stdin.read().strip()}\\n")
"""


def _exe(tmp_path, name: str, body: str) -> str:
    p = tmp_path / name
    p.write_text(f"#!{sys.executable}\n{body}")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(p)


class Card:
    """One fake co-processor: the file its probe reads usage from, its failure flag, its log."""

    def __init__(self, tmp_path, name: str):
        self.usage = tmp_path / f"{name}.usage.json"
        self.flag = tmp_path / f"{name}.broken"
        self.log = tmp_path / f"{name}.applied"
        self.probe = [_exe(tmp_path, "probe", PROBE), str(self.usage), str(self.flag)]
        self.apply = [_exe(tmp_path, "apply", APPLY), str(self.log)]

    def uses(self, **units: float) -> None:
        self.usage.write_text(json.dumps(units))

    def applied(self) -> list[tuple[str, int]]:
        if not self.log.exists():
            return []
        return [(ln.split()[0], int(ln.split()[1])) for ln in self.log.read_text().splitlines()]


def _config(fpga: Card, npu: Card, extra: str = "") -> str:
    return f"""
[daemon]
interval = 0.1
window = 1
headroom = 0
hold_ticks = 0
max_step_down = 0.99
critical_floor = 0
[resources.coproc.fpga0]
total = 8
probe = {json.dumps(fpga.probe)}
apply = {json.dumps(fpga.apply)}
[resources.coproc.npu]
total = 4
probe = {json.dumps(npu.probe)}
[[task]]
name = "web"
priority = "critical"
command = ["sleep", "60"]
forecaster = "last_value"
coproc = {{ fpga0 = {{ min = 1 }}, npu = {{ max = 3 }} }}
[[task]]
name = "batch"
priority = "batch"
command = ["sleep", "60"]
forecaster = "last_value"
coproc = {{ fpga0 = {{ min = 1 }} }}
{extra}"""


def _daemon(tmp_path, text: str) -> Daemon:
    cgroot = tmp_path / "cgroup"
    cgroot.mkdir(exist_ok=True)
    d = Daemon(configmod.parse(text), mounts=CgroupMounts("unified", str(cgroot)),
               out=io.StringIO())
    d.scheduler = Scheduler(d)
    return d


# -- configuration --------------------------------------------------------------------------
def test_named_coprocs_are_resources_of_their_own(tmp_path):
    cfg = configmod.parse(_config(Card(tmp_path, "fpga0"), Card(tmp_path, "npu"), """
[[task]]
name = "etl"
pids = [1]
"coproc:npu" = { min = 1 }
"""))
    assert cfg.totals == {FPGA: 8, NPU: 4}
    assert cfg.options[FPGA]["name"] == "fpga0" and "apply" in cfg.options[FPGA]
    assert "apply" not in cfg.options[NPU]
    limits = {t.name: t.limits for t in cfg.tasks}
    assert limits["web"] == {FPGA: Limits(1, None), NPU: Limits(0, 3)}
    assert limits["batch"] == {FPGA: Limits(1, None)}
    assert limits["etl"] == {NPU: Limits(1, None)}    # the key form the CLI/socket also use
    assert cfg.resources == {FPGA, NPU}


@pytest.mark.parametrize("text,field,why", [
    ("[resources.coproc]\ntotal = 8\nprobe = ['p']\n[resources.coproc.npu]\ntotal = 1\nprobe = ['q']\n",
     "resources.coproc", "not both: move probe, total into a named table"),
    ("[resources.coproc.npu]\ntotal = 1\n", "resources.coproc.npu.probe", "needs a probe"),
    ("[resources.coproc.npu]\nprobe = ['q']\n", "resources.coproc.npu.total", "total units"),
    ("[resources.coproc.npu]\ntotal = 1\nprobe = ['q']\nname = 'x'\n", "resources.coproc.npu.name",
     "unknown setting"),
    ("[resources.coproc.'a b']\ntotal = 1\nprobe = ['q']\n", "resources.coproc.a b",
     "not a valid co-processor name"),
    ("[resources.coproc.npu]\ntotal = 1\nprobe = ['q']\n"
     "[[task]]\nname = 'w'\npids = [1]\ncoproc = { min = 1 }\n", "task w.coproc",
     "name the co-processor: coproc = { npu = { min = 1 } }"),
    ("[resources.coproc.npu]\ntotal = 1\nprobe = ['q']\n"
     "[[task]]\nname = 'w'\npids = [1]\ncoproc = { tpu = { min = 1 } }\n", "task w.coproc:tpu",
     "no coproc named 'tpu' (registered: npu)"),
    ("[resources.coproc]\ntotal = 1\nprobe = ['q']\n"
     "[[task]]\nname = 'w'\npids = [1]\ncoproc = { npu = { min = 1 } }\n", "task w.coproc:npu",
     "none is named; register [resources.coproc.npu]"),
    ("[resources.coproc.npu]\ntotal = 1\nprobe = ['q']\n"
     "[[task]]\nname = 'w'\npids = [1]\ncoproc = { npu = { min = 1 }, max = 2 }\n",
     "task w.coproc", "not both"),
    ("[resources.coproc.npu]\ntotal = 1\nprobe = ['q']\n[[task]]\nname = 'w'\npids = [1]\n"
     "coproc = { npu = { min = 1 } }\n'coproc:npu' = { max = 1 }\n", "task w.coproc:npu",
     "given twice"),
    ("[[task]]\nname = 'w'\npids = [1]\n'cpu:0' = { min = 1 }\n", "task w.cpu:0",
     "cpu has one resource per host"),
])
def test_bad_coproc_configuration_names_the_field(text, field, why):
    with pytest.raises(ConfigError) as exc:
        configmod.parse(text)
    assert exc.value.field == field and why in exc.value.message, str(exc.value)


# -- the pool ---------------------------------------------------------------------------------
def test_the_pool_keeps_named_coprocs_apart():
    pool = ResourcePool()
    info = pool.register_resource(COPROC, 8, name="fpga0")   # the seed's API with a name
    assert info.resource == FPGA and info.type is COPROC and info.name == "fpga0"
    pool.register_resource(NPU, 4)
    pool.set_allocation(FPGA, "web", 6)
    pool.set_allocation(NPU, "web", 4)
    with pytest.raises(ResourceError, match="coproc:fpga0"):
        pool.set_allocation(FPGA, "batch", 3)                 # 6 + 3 > 8 on this card only
    pool.set_allocation(FPGA, "batch", 2)
    assert pool.available(FPGA) == 0 and pool.available(NPU) == 0
    assert pool.release("web", NPU) == {NPU: 4}                # the other card is untouched
    assert pool.allocation(FPGA, "web") == 6 and pool.available(NPU) == 4
    snaps = pool.get_available_resources()
    assert snaps[FPGA].resource == FPGA and snaps[FPGA].allocations == {"web": 6, "batch": 2}
    pool.check()
    assert parse_resource("coproc:npu") == NPU and parse_resource("coproc") is COPROC
    with pytest.raises(ConfigError, match="io has one resource per host"):
        parse_resource("io:sdb")


# -- the daemon -------------------------------------------------------------------------------
def test_daemon_senses_allocates_and_applies_each_coproc_on_its_own(tmp_path, rswap_env):
    fpga, npu = Card(tmp_path, "fpga0"), Card(tmp_path, "npu")
    fpga.uses(web=2, batch=5)
    npu.uses(web=1)
    d = _daemon(tmp_path, _config(fpga, npu))
    d.start()
    try:
        assert set(d.drivers) == {FPGA, NPU} and d.drivers[FPGA].resource == FPGA
        rep = d.tick()
        assert rep.usage["web"] == {FPGA: 2.0, NPU: 1.0}
        assert rep.usage["batch"] == {FPGA: 5.0, NPU: 0.0}
        # the FPGA caps (apply), judged by use: each is asked more than use / 0.9, so that using
        # what it holds is not read as held back (web 2 -> 3; batch gets what is left, 5 of 6).
        # Nothing caps the NPU (no apply): never held, it is allocated its use as it is.
        assert d.pool.allocation(FPGA, "web") == 3 and d.pool.allocation(FPGA, "batch") == 5
        assert d.pool.allocation(NPU, "web") == 1
        # web's FPGA demand jumps: the critical tier is served first, batch keeps its min of 1;
        # the NPU (another card) is not touched by the FPGA's shortage.
        fpga.uses(web=9, batch=5)
        rep = d.tick()
        assert d.pool.allocation(FPGA, "web") == 7 and d.pool.allocation(FPGA, "batch") == 1
        assert any(s.resource == FPGA and s.source == "batch" and s.target == "web"
                   for s in rep.result.swaps)
        assert d.pool.allocation(NPU, "web") == 1
        d.pool.check()
        # Only the FPGA has an apply command: it enforced every change, in order.
        assert fpga.applied() == [("web", 3), ("batch", 5), ("batch", 1), ("web", 7)]
        assert not npu.log.exists()
        # A card whose probe fails gives no sample (not zeros); the other card goes on.
        fpga.flag.write_text("1")
        npu.uses(web=3)
        rep = d.tick()
        assert FPGA not in rep.usage["web"] and rep.usage["web"][NPU] == 3.0
        assert "card not responding" in str(d.drivers[FPGA].last_error)
        assert d.pool.allocation(NPU, "web") == 3                 # web's npu max is 3
        st = d.status()
        assert set(st["pool"]) == {"coproc:fpga0", "coproc:npu"}
        assert st["pool"]["coproc:npu"] == {"unit": "units", "total": 4, "available": 1,
                                            "allocations": {"web": 3}}
        assert st["tasks"]["web"]["resources"]["coproc:npu"]["usage"] == 3.0
        assert st["tasks"]["web"]["resources"]["coproc:fpga0"]["allocation"] == 7
        table = RunTable(io.StringIO())
        table.start(d)
        table.tick(rep)
        assert "coproc:fpga0" in table.out.getvalue()
        # Metrics: one family per kind and unit, the card as a label.
        exp = MetricsExporter(program_stats=lambda: [])
        exp.update(st, 0.001)
        text = "".join(f"{s.name}{sorted(s.labels.items())} {s.value}\n"
                       for fam in exp.families() for s in fam.samples)
        assert ("rswap_task_coproc_allocation_units[('coproc', 'npu'), ('priority', 'critical'), "
                "('task', 'web')] 3") in text
        assert "rswap_pool_coproc_total_units[('coproc', 'fpga0')] 8" in text
    finally:
        d.stop()
    # The next run (what Daemon start-up does per task) starts from the profiles this one
    # stored under each card's key.
    store = ProfileStore.in_dir(rswap_env["state"])
    try:
        prof = TaskProfiler(store=store)
        assert sorted(prof.restore("web"), key=lambda r: r.key) == [FPGA, NPU]
        assert list(prof.profiles[("web", NPU)].history) == [1.0, 1.0, 3.0]
        assert list(prof.profiles[("web", FPGA)].history) == [2.0, 9.0]
        assert prof.get_predicted_needs("web", 1)[NPU].peak == 3.0
    finally:
        store.close()


def test_socket_requests_name_a_coproc(tmp_path, rswap_env):
    fpga, npu = Card(tmp_path, "fpga0"), Card(tmp_path, "npu")
    d = _daemon(tmp_path, _config(fpga, npu))
    d.start()
    peer = Peer(os.getpid(), 0, 0)
    try:
        r = d.scheduler.dispatch({"op": "task.add", "name": "etl", "priority": "normal",
                                  "command": ["sleep", "60"], "coproc:npu": {"min": 2}}, peer)
        assert r["ok"] and r["allocation"]["coproc:npu"] == 2, r
        assert d.pool.allocation(NPU, "etl") == 2 and d.pool.allocation(FPGA, "etl") == 0
        r = d.scheduler.dispatch({"op": "exec.allocate", "name": "job", "priority": "normal",
                                  "limits": {"coproc": {"fpga0": {"max": 2}}}}, peer)
        assert r["ok"] and r["allocation"]["coproc:fpga0"] == 2, r
        with pytest.raises(ConfigError, match="does not manage coproc:tpu"):
            parse_limits({"coproc:tpu": {"min": 1}}, d.pool.types(), "limits")
        with pytest.raises(ConfigError, match="limits.coproc:fpga0.max: 1 is below min 2"):
            parse_limits({"coproc:fpga0": {"min": 2, "max": 1}}, d.pool.types(), "limits")
    finally:
        d.stop()


# -- traces, replay, doctor -------------------------------------------------------------------
def test_traces_and_replay_keep_each_coproc(tmp_path):
    path = tmp_path / "trace.csv"
    with open(path, "w", newline="") as f:
        w = TraceWriter(f)
        for t in range(30):
            w.write_tick(float(t), [("web", FPGA, 4.0 if t % 6 < 2 else 1.0), ("web", NPU, 2.0),
                                    ("batch", FPGA, 3.0)])
    trace = read_trace(str(path))
    assert trace.resources == [FPGA, NPU]
    assert trace.demand[("web", NPU)] == (2.0,) * 30
    result = replay(trace, policies=("static", "proactive"))
    keys = {(s.task, s.resource) for s in result.by_policy("proactive")}
    assert keys == {("web", FPGA), ("web", NPU), ("batch", FPGA)}


def test_doctor_runs_each_coprocs_probe(tmp_path):
    fpga, npu = Card(tmp_path, "fpga0"), Card(tmp_path, "npu")
    npu.flag.write_text("1")
    checks = {c.feature: c for c in check_coprocs(configmod.parse(_config(fpga, npu)))}
    assert checks["co-processor fpga0"].status == "ok"
    assert checks["co-processor fpga0"].needed_by == (FPGA,)
    bad = checks["co-processor npu"]
    assert bad.status == "missing" and "exited with status 4: card not responding" in bad.detail
    assert bad.needed_by == (NPU,)
