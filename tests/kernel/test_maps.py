"""``rswap maps``, BPF program statistics and the live exporter, against the real kernel.

Each test pins under its own ``RSWAP_PIN_DIR`` below /sys/fs/bpf and checks what rswap reports
against what ``bpftool`` reads from the kernel.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rswap_ebpf.host import bpfinfo
from rswap_ebpf.host.cpu.collector import MAPS, CpuCollector

from ..conftest import rswap_cmd, run_rswap


@pytest.fixture
def pin_env(rswap_env, unique_name, monkeypatch):
    pin = f"/sys/fs/bpf/test-maps-{unique_name}"
    monkeypatch.setenv("RSWAP_PIN_DIR", pin)
    yield {**rswap_env, "RSWAP_PIN_DIR": pin}
    assert not os.path.exists(pin), "pinned maps left behind"


@pytest.fixture
def collector(pin_env):
    c = CpuCollector().open()
    try:
        yield c
    finally:
        c.close()


def bpftool_json(*args):
    r = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_maps_lists_each_pinned_map_with_a_working_bpftool_command(collector, pin_env):
    res = run_rswap("maps", "--json", env=pin_env)
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    assert sorted(m["name"] for m in listed) == sorted(MAPS)
    for m in listed:
        kernel = bpftool_json("map", "show", "pinned", m["path"])
        assert (m["id"], m["map_type"], m["key_size"], m["value_size"], m["max_entries"]) == (
            kernel["id"], kernel["type"], kernel["bytes_key"], kernel["bytes_value"], kernel["max_entries"])
        cmd = shlex.split(m["dump_command"])
        assert cmd[:4] == ["bpftool", "map", "dump", "pinned"]
        dump = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert dump.returncode == 0, dump.stderr
    text = run_rswap("maps", env=pin_env)
    assert text.returncode == 0 and f"bpftool map dump pinned {pin_env['RSWAP_PIN_DIR']}/rswap_stats" in text.stdout


def test_maps_says_when_nothing_is_pinned(pin_env):
    res = run_rswap("maps", env=pin_env)
    assert res.returncode == 1
    assert "no maps pinned" in res.stdout


def test_program_run_time_matches_bpftool(collector):
    fd = bpfinfo.enable_run_time_stats()
    try:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            time.sleep(0.001)  # context switches: sched_switch runs
        stats = {p.name: p for p in bpfinfo.rswap_program_stats()}
        assert "sched_switch" in stats, stats
        ours = stats["sched_switch"]
        assert ours.run_cnt > 0 and ours.run_time_ns > 0
        kernel = bpftool_json("prog", "show", "id", str(ours.id))
        assert kernel["run_cnt"] >= ours.run_cnt  # read after ours: the counter only grows
        assert kernel["run_time_ns"] >= ours.run_time_ns
    finally:
        os.close(fd)


def test_run_serves_metrics_and_history_while_running(tmp_path, pin_env, unique_name):
    name = f"solo-{unique_name}"
    cfg = tmp_path / "rswap.toml"
    cfg.write_text(f'[daemon]\ninterval = 0.5\n[resources.cpu]\ntotal = 1000\n[[task]]\nname = "{name}"\n'
                   f'command = ["{sys.executable}", "-m", "rswap_ebpf.demo", "spin", "--seconds", "30"]\n')
    history = tmp_path / "history.jsonl"
    p = subprocess.Popen(rswap_cmd() + ["run", "--config", str(cfg), "--count", "40", "--metrics-port", "0",
                                        "--history", str(history)],
                         env={**os.environ, **pin_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
        assert m, line
        url = f"http://127.0.0.1:{m.group(1)}/metrics"
        samples: dict = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    text = resp.read().decode()
            except OSError as err:
                if p.poll() is not None:  # the daemon died: say why, not just "connection reset"
                    pytest.fail(f"rswap run exited {p.returncode} while scraped: {p.stderr.read()[-2000:]}")
                raise err
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for fam in text_string_to_metric_families(text) for s in fam.samples}
            if samples.get(("rswap_tick", ()), 0) >= 4:
                break
            time.sleep(0.5)
        task = (("priority", "normal"), ("task", name))
        assert samples[("rswap_task_cpu_usage_cores", task)] > 0  # a busy loop, measured by BPF
        assert samples[("rswap_pool_cpu_total_cores", ())] == 1.0
        run_time = {k: v for k, v in samples.items() if k[0] == "rswap_bpf_program_run_time_seconds_total"}
        assert any(dict(k[1])["program"] == "sched_switch" and v > 0 for k, v in run_time.items()), run_time
        assert samples[("rswap_tick_duration_seconds_count", ())] >= 4
    finally:
        p.terminate()
        p.communicate(timeout=30)
    assert p.returncode == 0
    lines = history.read_text().splitlines()
    assert len(lines) >= 4 and name in json.loads(lines[-1])["tasks"]
    out = tmp_path / "history.png"
    res = run_rswap("plot", str(history), "--output", str(out))
    assert res.returncode == 0, res.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
