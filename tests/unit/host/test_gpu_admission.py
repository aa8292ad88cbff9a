"""GPU admission end to end through the daemon, without root: a task starts (configured, task.add,
rswap exec) only when its GPU-memory forecast fits one device's free memory, on that device
(CUDA_VISIBLE_DEVICES=GPU-<UUID>), else it waits or is refused and the overflow hook hears the shortfall.

NVML is tests/fakes/pynvml.py (pynvml's signatures and error classes); cgroups are a temporary
directory tree; the control-socket requests go through the daemon's real dispatcher
(:meth:`Scheduler.dispatch`, what the socket server calls).
"""
from __future__ import annotations

import io
import os
import sys
import time

import pytest

from rswap_ebpf.runtime import config
from rswap_ebpf.server.control import Deferred, Peer
from rswap_ebpf.runtime.daemon import Daemon
from rswap_ebpf.host.gpu.driver import GpuDriver, gpu_need
from rswap_ebpf.host.cgroup import CgroupMounts
from rswap_ebpf.predict.profile import TaskProfiler
from rswap_ebpf.model.resources import ResourceType
from rswap_ebpf.server.scheduler import Scheduler
from rswap_ebpf.host.gpu.nvml import NvmlCollector
from rswap_ebpf.model.limits import Limits
from tests.fakes.pynvml import FakeGpu, FakeNvml

GiB = 2**30
GPU = ResourceType.GPU_MEMORY
#: the fake's UUIDs for NVML devices 0 and 1: devices are named by UUID, never by index
U0, U1 = (f"GPU-00000000-0000-0000-0000-{i:012d}" for i in (0, 1))

# Writes the CUDA variables it was started with, then idles until rswap stops it.
SHOW_ENV = ("import os, sys, time; open(sys.argv[1], 'w').write("
            "os.environ.get('CUDA_VISIBLE_DEVICES', '-') + ' ' + "
            "os.environ.get('CUDA_DEVICE_ORDER', '-')); time.sleep(60)")


def _task(name: str, out, max_gib: int, prio: str = "normal") -> str:
    return f"""
[[task]]
name = "{name}"
priority = "{prio}"
command = ["{sys.executable}", "-c", "{SHOW_ENV}", "{out}"]
forecaster = "last_value"
gpu_memory = {{ max = {max_gib * GiB} }}
"""


class Hook:
    """Stands in for overflow.OverflowHook: records what it is told."""

    def __init__(self):
        self.events = []

    def submit(self, event, shortfalls, priorities=None):
        self.events.append((event, [(s.task, s.resource.key, s.wanted, s.granted)
                                    for s in shortfalls]))

    def close(self):
        pass


def _read_env(path, timeout=10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and open(path).read():
            return open(path).read()
        time.sleep(0.05)
    raise AssertionError(f"{path} never written")


@pytest.fixture
def gpus():
    # g0: 16 GiB, empty; g1: 24 GiB with 10 GiB held by a process rswap does not manage.
    return [FakeGpu(total=16 * GiB), FakeGpu(total=24 * GiB, processes={999999: 10 * GiB})]


def _daemon(tmp_path, text, gpus):
    cgroot = tmp_path / "cgroup"
    cgroot.mkdir(exist_ok=True)
    gpu = GpuDriver(NvmlCollector(FakeNvml(gpus)))
    d = Daemon(config.parse(text), drivers=[gpu], mounts=CgroupMounts("unified", str(cgroot)),
               out=io.StringIO())
    d.overflow = Hook()
    d.scheduler = Scheduler(d, d.overflow)
    return d, gpu


def test_configured_tasks_start_only_where_their_forecast_fits(tmp_path, rswap_env, gpus):
    outs = {n: tmp_path / f"{n}.env" for n in ("a", "b", "c")}
    text = ("[daemon]\ninterval = 0.1\nwindow = 2\n[resources.gpu_memory]\ntotal = \"auto\"\n"
            + _task("a", outs["a"], 12) + _task("b", outs["b"], 12) + _task("c", outs["c"], 14))
    d, gpu = _daemon(tmp_path, text, gpus)
    d.start()
    try:
        # a: the roomiest device is g0 (15.5 GiB free vs 13.5); b: g0 keeps 3.5 GiB for a's
        # reservation, so g1; c (14 GiB) fits nowhere and waits, not started.
        assert _read_env(outs["a"]) == f"{U0} -"
        assert _read_env(outs["b"]) == f"{U1} -"
        st = d.status()
        assert st["tasks"]["a"]["gpu_device"] == U0 and st["tasks"]["b"]["gpu_device"] == U1
        assert "c" not in st["tasks"] and not outs["c"].exists()
        assert "predicted to need 15032385536 bytes" in st["pending"]["c"]
        assert "roomiest GPU has 3758096384 free" in st["pending"]["c"]
        d.tick()
        assert ("admission", [("c", "gpu_memory", 14 * GiB, int(3.5 * GiB))]) in d.overflow.events
        assert "c" in d.status()["pending"]
        # a leaves: its reservation on g0 is released and c starts there on the next tick.
        reply = d.scheduler.dispatch({"op": "task.remove", "name": "a"}, Peer(os.getpid(), 0, 0))
        assert reply["ok"]
        d.tick()
        assert _read_env(outs["c"]) == f"{U0} -"
        st = d.status()
        assert st["pending"] == {} and st["tasks"]["c"]["gpu_device"] == U0
    finally:
        d.stop()


def test_task_add_is_placed_or_refused_with_the_shortfall(tmp_path, rswap_env, gpus):
    d, gpu = _daemon(tmp_path, "[resources.gpu_memory]\ntotal = \"auto\"\n", gpus)
    d.start()
    peer = Peer(os.getpid(), 0, 0)
    out = tmp_path / "big.env"
    cmd = [sys.executable, "-c", SHOW_ENV, str(out)]
    try:
        r = d.scheduler.dispatch({"op": "task.add", "name": "big", "command": cmd,
                                  "gpu_memory": {"max": 15 * GiB}}, peer)
        assert r["ok"], r
        assert _read_env(out) == f"{U0} -"
        assert d.status()["tasks"]["big"]["gpu_device"] == U0
        with pytest.raises(Exception) as exc:
            d.scheduler.dispatch({"op": "task.add", "name": "big2", "command": cmd,
                                  "gpu_memory": {"max": 15 * GiB}}, peer)
        assert "no GPU has room" in str(exc.value) and "roomiest GPU has" in str(exc.value)
        assert "big2" not in d.tasks and "big2" not in d.manager.tasks
        assert d.overflow.events[-1][1][0][:3] == ("big2", "gpu_memory", 15 * GiB)
    finally:
        d.stop()


def test_exec_waits_for_a_gpu_and_gets_its_device(tmp_path, rswap_env, gpus):
    d, gpu = _daemon(tmp_path, "[resources.gpu_memory]\ntotal = \"auto\"\n", gpus)
    d.start()
    peer = Peer(os.getpid(), 0, 0)
    try:
        first = d.scheduler.dispatch({"op": "exec.allocate", "name": "j1", "priority": "critical",
                                      "limits": {"gpu_memory": {"max": 15 * GiB}}}, peer)
        assert first["ok"] and first["gpu_device"] == U0
        assert first["env"] == {"CUDA_VISIBLE_DEVICES": U0}
        assert first["allocation"]["gpu_memory"] == 15 * GiB
        # Even a critical task cannot take GPU memory a running process holds: refused.
        refused = d.scheduler.dispatch({"op": "exec.allocate", "name": "j2", "priority": "critical",
                                        "limits": {"gpu_memory": {"max": 14 * GiB}}}, peer)
        assert not refused["ok"]
        assert "gpu_memory: predicted to need 15032385536 bytes" in refused["error"]
        assert "free on the roomiest GPU" in refused["error"]
        assert refused["shortfall"][0]["resource"] == "gpu_memory"
        waiting = d.scheduler.dispatch({"op": "exec.allocate", "name": "j2", "wait": True,
                                        "limits": {"gpu_memory": {"max": 14 * GiB}}}, peer)
        assert isinstance(waiting, Deferred)
        d.scheduler.serve_queue()
        assert [w.req.name for w in d.scheduler.queue] == ["j2"]
        # The unmanaged process on g1 exits: 23.5 GiB free there, j2 is admitted onto g1.
        gpus[1].processes.clear()
        d.scheduler.serve_queue()
        reply = waiting.reply
        assert reply["ok"] and reply["gpu_device"] == U1, reply
        assert reply["env"]["CUDA_VISIBLE_DEVICES"] == U1
        assert d.status()["tasks"]["j2"]["gpu_device"] == U1
        # A CPU-only request on a GPU host is not placed and not refused over GPU memory.
        cpu_only = d.scheduler.dispatch({"op": "exec.allocate", "name": "j3"}, peer)
        assert cpu_only["ok"] and cpu_only["gpu_device"] is None and cpu_only["env"] == {}
        # Released units go back: j1's reservation on g0 is gone.
        d.scheduler.dispatch({"op": "exec.release", "name": "j1"}, peer)
        assert "j1" not in gpu.placement
    finally:
        d.stop()


def test_need_follows_the_gpu_forecast_once_the_task_was_seen():
    prof = TaskProfiler()
    assert gpu_need(prof, "x", None, 5, 0.2) is None          # asks for no GPU
    assert gpu_need(prof, "x", Limits(1 * GiB, 8 * GiB), 5, 0.2) == (8 * GiB, None)
    assert gpu_need(prof, "x", Limits(1 * GiB), 5, 0.2) == (1 * GiB, None)
    for b in [2 * GiB] * 8 + [5 * GiB] * 2:
        prof.update_prediction("x", GPU, b)
    need, predicted = gpu_need(prof, "x", Limits(0, 8 * GiB), 5, 0.2)
    assert predicted == 5 * GiB                                  # last value peak over window
    assert need == 6 * GiB                                       # + 20 % headroom
    assert gpu_need(prof, "x", Limits(0, 4 * GiB), 5, 0.2)[0] == 4 * GiB
