"""The control socket server: permissions, peer credentials, framing, limits, deferred replies."""
from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time

import pytest

from rswap_ebpf.server import control
from rswap_ebpf.server.control import ControlServer, Deferred, raw_request, request
from rswap_ebpf.errors import ConfigError, RswapError


class Recorder:
    def __init__(self):
        self.calls = []
        self.waiting: list[Deferred] = []
        self.cancelled = 0

    def __call__(self, req, peer):
        self.calls.append((req, peer))
        op = req["op"]
        if op == "echo":
            return {"ok": True, "args": req.get("args"), "pid": peer.pid, "uid": peer.uid}
        if op == "bad":
            raise ConfigError("priority", "'urgent' is not a priority")
        if op == "wait":
            d = Deferred(on_cancel=self._cancel)
            self.waiting.append(d)
            return d
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _cancel(self):
        self.cancelled += 1


@pytest.fixture
def server(tmp_path):
    rec = Recorder()
    srv = ControlServer(rec, path=str(tmp_path / "rswap.sock"),
                        allowed_uids=frozenset({os.geteuid()}))
    srv.start()
    try:
        yield srv, rec
    finally:
        srv.close()
    assert not os.path.exists(srv.path)


def _connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def _read_line(s):
    f = _readers.setdefault(s, s.makefile("rb"))
    line = f.readline()
    return json.loads(line) if line else None


_readers: dict = {}


def test_socket_is_0600_and_echoes_requests_with_peer_credentials(server):
    srv, rec = server
    assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(srv.path).st_mode)
    r = request("echo", path=srv.path, args=[1, 2])
    assert r == {"ok": True, "args": [1, 2], "pid": os.getpid(), "uid": os.geteuid()}


def test_malformed_json_and_wrong_shapes_get_error_replies_and_the_connection_survives(server):
    srv, _ = server
    s = _connect(srv.path)
    try:
        s.sendall(b"{not json\n")
        assert "malformed JSON" in _read_line(s)["error"]
        s.sendall(b"[1, 2]\n")
        assert '"op"' in _read_line(s)["error"]
        s.sendall(b'{"op": 3}\n')
        assert _read_line(s)["ok"] is False
        s.sendall(b'{"op": "bad", "id": 7}\n')
        r = _read_line(s)
        assert r == {"ok": False, "error": "priority: 'urgent' is not a priority",
                     "field": "priority", "id": 7}
        s.sendall(b'{"op": "echo", "args": "still here"}\n{"op": "echo", "args": 2}\n')
        assert _read_line(s)["args"] == "still here"
        assert _read_line(s)["args"] == 2
    finally:
        s.close()


def test_oversized_message_is_refused_and_the_connection_closed(server):
    srv, rec = server
    s = _connect(srv.path)
    try:
        s.sendall(b'{"op": "echo", "args": "' + b"x" * (control.MAX_MESSAGE + 10))
        r = _read_line(s)
        assert r["ok"] is False and "longer than" in r["error"]
        assert _readers[s].read(10) == b""  # closed
    finally:
        s.close()
    assert not rec.calls


def test_peer_of_another_uid_is_refused(tmp_path):
    """SO_PEERCRED is checked: a uid outside ``allowed_uids`` gets one error line, nothing runs."""
    rec = Recorder()
    srv = ControlServer(rec, path=str(tmp_path / "s.sock"), allowed_uids=frozenset({4242424}))
    srv.start()
    try:
        r = raw_request({"op": "echo"}, path=srv.path)
        assert r == {"ok": False, "error": "rswap's control socket serves root only"}
        assert not rec.calls
    finally:
        srv.close()


def test_many_silent_clients_do_not_stall_others(server):
    srv, _ = server
    idle = [_connect(srv.path) for _ in range(40)]
    try:
        for s in idle[:20]:
            s.sendall(b'{"op": "echo", "args": "partial')  # never finished
        t0 = time.monotonic()
        for i in range(20):
            assert request("echo", path=srv.path, args=i)["args"] == i
        assert time.monotonic() - t0 < 5
    finally:
        for s in idle:
            s.close()


def test_deferred_reply_arrives_when_resolved_from_another_thread(server):
    srv, rec = server
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", request("wait", path=srv.path, id=9)))
    t.start()
    deadline = time.monotonic() + 5
    while not rec.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert request("echo", path=srv.path, args="others are served meanwhile")["ok"]
    rec.waiting[0].resolve({"ok": True, "granted": 5})
    t.join(5)
    assert out["r"] == {"ok": True, "granted": 5, "id": 9}


def test_client_hanging_up_cancels_its_waiting_request(server):
    srv, rec = server
    s = _connect(srv.path)
    s.sendall(b'{"op": "wait"}\n')
    deadline = time.monotonic() + 5
    while not rec.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    s.close()
    while rec.cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rec.cancelled == 1
    rec.waiting[0].resolve({"ok": True})  # resolving after the hang-up is harmless


def test_client_says_clearly_when_no_daemon_runs(tmp_path):
    with pytest.raises(RswapError, match="no rswap daemon is running"):
        request("status", path=str(tmp_path / "absent.sock"))


def test_answer_timeout_is_raised_but_never_lowered_by_the_environment(monkeypatch):
    monkeypatch.delenv("RSWAP_CONTROL_TIMEOUT", raising=False)
    assert control.answer_timeout() == 10.0 and control.answer_timeout(30) == 30
    monkeypatch.setenv("RSWAP_CONTROL_TIMEOUT", "120")
    assert control.answer_timeout(5) == 120.0 and control.answer_timeout(300) == 300
    monkeypatch.setenv("RSWAP_CONTROL_TIMEOUT", "1")
    assert control.answer_timeout(30) == 30
    for bad in ("soon", "0", "-3", "inf", "nan"):
        monkeypatch.setenv("RSWAP_CONTROL_TIMEOUT", bad)
        with pytest.raises(ConfigError):
            control.answer_timeout()


def test_deeply_nested_json_gets_an_error_reply_not_a_traceback(server, caplog):
    srv, rec = server
    s = _connect(srv.path)
    try:
        s.sendall(b"[" * 60_000 + b"\n")
        r = _read_line(s)
        assert r["ok"] is False and "malformed JSON" in r["error"]
        s.sendall(b'{"op": "echo", "args": "still here"}\n')  # and the connection survives
        assert _read_line(s)["args"] == "still here"
    finally:
        s.close()
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text


def test_a_request_without_newline_then_shutdown_wr_gets_its_reply(server):
    srv, rec = server
    s = _connect(srv.path)
    try:
        s.sendall(b'{"op": "echo", "args": 1}\n{"op": "echo", "args": "last", "id": 3}')
        s.shutdown(socket.SHUT_WR)
        assert _read_line(s)["args"] == 1
        assert _read_line(s) == {"ok": True, "args": "last", "pid": os.getpid(),
                                 "uid": os.geteuid(), "id": 3}
        assert _readers[s].read(10) == b""  # then closed
    finally:
        s.close()
    s = _connect(srv.path)  # malformed, unterminated, half-closed: an error reply all the same
    try:
        s.sendall(b"[" * 60_000)
        s.shutdown(socket.SHUT_WR)
        assert _read_line(s)["ok"] is False
    finally:
        s.close()
