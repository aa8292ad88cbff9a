"""The overflow hook: how rswap asks a cloud or cluster autoscaler for more when the pool is short.

Configured as ``daemon.overflow_command`` (argv; the JSON document on its stdin) or
``daemon.overflow_url`` (an http(s) endpoint; the document POSTed as ``application/json``).
The document::

    {"host": "web-3", "time": 1700000000.0, "event": "tick" | "admission",
     "shortfalls": [{"task": "web", "priority": "critical", "resource": "cpu",
                     "unit": "millicores", "wanted": 1800, "granted": 1200, "missing": 600}]}

Calls run on a background thread, one at a time, with a timeout, so a slow autoscaler never delays
a tick; while one runs, the newest report waits and older ones are dropped.  A tick report is sent
when the set of short (task, resource) pairs changes, or at most every ``interval_s`` while it
persists; an admission report (a task that could not start) is always sent.
"""
from __future__ import annotations

import json
import logging
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rswap_ebpf.errors import ConfigError
from rswap_ebpf.swap.manager import Shortfall

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShortfallReport:
    event: str
    shortfalls: tuple[Shortfall, ...]
    priorities: dict

    def document(self) -> dict:
        return {"host": socket.gethostname(), "time": time.time(), "event": self.event,
                "shortfalls": [{"task": s.task, "priority": self.priorities.get(s.task),
                                "resource": s.resource.key, "unit": s.resource.unit,
                                "wanted": s.wanted, "granted": s.granted, "missing": s.missing}
                               for s in self.shortfalls]}


def check_url(url: str, field_name: str = "daemon.overflow_url") -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(field_name, f"{url!r} is not an http:// or https:// URL")
    return url


class OverflowHook:
    """Callable the swap manager gives its shortfalls to (``SwapManager.overflow_hook``)."""

    def __init__(self, command: Sequence[str] = (), url: str = "", timeout_s: float = 5.0,
                 interval_s: float = 60.0, priority_of: Callable[[str], str | None] | None = None):
        if not command and not url:
            raise ConfigError("daemon.overflow_command", "give a command or a URL")
        self.command = tuple(command)
        self.url = check_url(url) if url else ""
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self.priority_of = priority_of or (lambda task: None)
        self._last_key: frozenset | None = None
        self._last_at = 0.0
        self._pending: ShortfallReport | None = None
        self._cv = threading.Condition()
        self._closed = False
        self.sent = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._worker, name="rswap-overflow", daemon=True)
        self._thread.start()

    def __call__(self, shortfalls: list[Shortfall]) -> None:
        """Per tick: report when what is short changed, or every ``interval_s`` while it lasts."""
        key = frozenset((s.task, s.resource) for s in shortfalls)
        now = time.monotonic()
        if key == self._last_key and now - self._last_at < self.interval_s:
            return
        self._last_key, self._last_at = key, now
        if shortfalls:
            self.submit("tick", shortfalls)

    def submit(self, event: str, shortfalls: Sequence[Shortfall],
               priorities: dict[str, str] | None = None) -> None:
        prios = {s.task: (priorities or {}).get(s.task) or self.priority_of(s.task)
                 for s in shortfalls}
        with self._cv:
            self._pending = ShortfallReport(event, tuple(shortfalls), prios)
            self._cv.notify()

    def _worker(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._closed:
                    self._cv.wait()
                if self._pending is None:
                    return
                report, self._pending = self._pending, None
            try:
                self._send(json.dumps(report.document()).encode())
                self.sent += 1
            except Exception as err:  # the operator's hook: say so, keep going
                self.failures += 1
                log.warning("overflow hook failed: %s", err)
            with self._cv:
                self._cv.notify_all()

    def _send(self, body: bytes) -> None:
        if self.command:
            r = subprocess.run(list(self.command), input=body, capture_output=True,
                               timeout=self.timeout_s)
            if r.returncode != 0:
                raise RuntimeError(f"{self.command[0]} exited {r.returncode}: "
                                   f"{r.stderr.decode(errors='replace').strip()[:200]}")
        if self.url:
            req = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                resp.read(65536)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until nothing is pending (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending is not None and time.monotonic() < deadline:
                self._cv.wait(0.05)

    def close(self) -> None:
        self.flush(self.timeout_s)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(self.timeout_s + 1)
