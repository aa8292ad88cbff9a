"""The overflow hook: a command or an HTTP endpoint hears the shortfall as JSON, without blocking."""
from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from rswap_ebpf.errors import ConfigError
from rswap_ebpf.runtime.overflow import OverflowHook
from rswap_ebpf.model.resources import ResourcePool, ResourceType
from rswap_ebpf.model.limits import Limits, Priority
from rswap_ebpf.swap.manager import ManagedTask, Shortfall, SwapManager

CPU = ResourceType.PROCESSOR_CYCLES


def _wait_for(pred, timeout=10):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.02)
    return pred()


def test_command_gets_the_shortfall_of_a_short_pool_on_stdin(tmp_path):
    out = tmp_path / "doc.json"
    hook = OverflowHook([sys.executable, "-c",
                         f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())"],
                        priority_of=lambda t: {"web": "critical", "batch": "batch"}[t])
    try:
        pool = ResourcePool()
        pool.register_resource(CPU, 1000)
        m = SwapManager(pool, headroom=0.0, overflow_hook=hook)
        m.add_task(ManagedTask("web", Priority.CRITICAL, {CPU: Limits(0, None)}))
        m.add_task(ManagedTask("batch", Priority.BATCH, {CPU: Limits(100, None)}))
        m.proactive_allocation({"web": {CPU: 1500}, "batch": {CPU: 500}})
        assert _wait_for(out.exists)
        hook.flush()
        doc = json.loads(out.read_text())
    finally:
        hook.close()
    assert doc["event"] == "tick"
    short = {s["task"]: s for s in doc["shortfalls"]}
    assert short["web"] == {"task": "web", "priority": "critical", "resource": "cpu",
                            "unit": "millicores", "wanted": 1500, "granted": 900, "missing": 600}
    assert short["batch"]["granted"] == 100


def test_http_endpoint_gets_a_post_and_repeats_are_rate_limited():
    bodies = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            n = int(self.headers["Content-Length"])
            bodies.append((self.headers["Content-Type"], json.loads(self.rfile.read(n))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    hook = OverflowHook(url=f"http://127.0.0.1:{srv.server_port}/scale", interval_s=3600)
    try:
        sf = [Shortfall("web", CPU, 2000, 1500)]
        hook(sf)
        assert _wait_for(lambda: len(bodies) == 1)
        hook(sf)  # the same shortage again: not repeated within interval_s
        hook([Shortfall("web", CPU, 2500, 1500), Shortfall("db", CPU, 300, 100)])  # changed
        assert _wait_for(lambda: len(bodies) == 2)
        hook.flush()
        time.sleep(0.2)
        assert len(bodies) == 2
        assert bodies[0][0] == "application/json"
        assert {s["task"] for s in bodies[1][1]["shortfalls"]} == {"web", "db"}
    finally:
        hook.close()
        srv.shutdown()
        srv.server_close()


def test_a_slow_or_failing_hook_never_blocks_the_caller(tmp_path):
    hook = OverflowHook([sys.executable, "-c", "import time, sys; time.sleep(1); sys.exit(3)"],
                        timeout_s=5)
    try:
        t0 = time.monotonic()
        for i in range(20):
            hook.submit("admission", [Shortfall(f"t{i}", CPU, 10, 0)])
        assert time.monotonic() - t0 < 0.5
        assert _wait_for(lambda: hook.failures >= 1)
    finally:
        hook.close()
    assert hook.failures <= 3  # older reports were coalesced, not queued 20 deep


@pytest.mark.parametrize("kw", [{}, {"url": "ftp://x"}, {"url": "file:///etc/passwd"}])
def test_bad_hook_configuration_names_the_field(kw):
    with pytest.raises(ConfigError, match="daemon.overflow"):
        OverflowHook(**kw)
