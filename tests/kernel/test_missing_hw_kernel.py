"""On this host (no resctrl, no PMU, no NVIDIA driver) a configuration that asks for cache,
memory bandwidth and GPU memory still runs: those resources are reported missing, with why, and
the CPU resource is sensed and enforced as usual."""
from __future__ import annotations

import os
import sys

import pytest

from rswap_ebpf.runtime import config as configmod
from rswap_ebpf.runtime.daemon import Daemon
from rswap_ebpf.model.resources import ResourceType

from ..conftest import ROOT

pytestmark = pytest.mark.kernel

CONFIG = """
[daemon]
interval = 0.2
window = 2
[resources.cpu]
total = 1000
[resources.cache]
total = "auto"
[resources.membw]
total = 100
[resources.gpu_memory]
total = "auto"
[[task]]
name = "{name}"
priority = "critical"
command = ["{py}", "-m", "rswap_ebpf.demo", "spin", "--workers", "1", "--seconds", "20"]
forecaster = "last_value"
cache = {{ min = 2 }}
"""


def _absent():
    from rswap_ebpf.cli import doctor

    return [c for c in (doctor.check_resctrl(), doctor.check_nvml()) if c.status == "missing"]


@pytest.mark.skipif(ROOT and len(_absent()) < 2, reason="this host has resctrl or a GPU")
def test_missing_hardware_is_reported_and_cpu_keeps_working(rswap_env, unique_name, monkeypatch):
    monkeypatch.setenv("RSWAP_PIN_DIR", f"/sys/fs/bpf/rswap-test-{unique_name}")
    cfg = configmod.parse(CONFIG.format(name=unique_name, py=sys.executable))
    import io

    out = io.StringIO()
    d = Daemon(cfg, out=out)
    try:
        d.start()
        assert set(d.missing) == {ResourceType.CACHE, ResourceType.MEMORY_BANDWIDTH,
                                  ResourceType.GPU_MEMORY}
        assert "resctrl" in d.missing[ResourceType.CACHE]
        assert "NVML" in d.missing[ResourceType.GPU_MEMORY]
        assert set(d.drivers) == {ResourceType.PROCESSOR_CYCLES}
        import time

        for _ in range(4):
            time.sleep(0.2)
            report = d.tick()
        st = d.status()
        assert set(st["missing"]) == {"cache", "membw", "gpu_memory"}
        res = st["tasks"][unique_name]["resources"]
        assert "cache" not in res  # missing, not a zero
        assert res["cpu"]["usage"] > 0 and res["cpu"]["allocation"] > 0
        assert report.usage[unique_name].keys() == {ResourceType.PROCESSOR_CYCLES}
    finally:
        d.stop()
    assert "cache is missing" in out.getvalue()
    assert not os.path.exists(f"/sys/fs/bpf/rswap-test-{unique_name}")
