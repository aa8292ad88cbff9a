"""The control socket: how schedulers (``rswap exec``, a Slurm prolog, an NRI plugin) talk to rswap.

``RUN_DIR/rswap.sock`` (``/run/rswap/rswap.sock``), a Unix stream socket, mode 0600, and every
peer's credentials (``SO_PEERCRED``) checked: only uid 0 is served, anyone else gets one error
reply and is disconnected.

Protocol: newline-delimited JSON, one request object per line, one reply line per request, in
order; a connection may carry many requests.  A request is ``{"op": NAME, "id": ANY, ...}``
(``id`` is optional and echoed back).  A reply is ``{"ok": true, ...}`` or ``{"ok": false,
"error": TEXT[, "field": NAME]}``.  A line longer than 64 KiB, or that is not a JSON object with a
string ``op`` (bad UTF-8, nested past what the parser can follow), gets an error reply (a
too-long line also closes the connection).  A last request without its newline is answered when
the client shuts its sending side (``shutdown(SHUT_WR)``).

=================  ==============================================================================
op                 arguments -> reply
=================  ==============================================================================
``status``         -> ``{"status": <rswap status --json>}``
``task.list``      -> ``{"tasks": [{"name", "priority", "cgroup", "pids", "source", "allocation"}]}``
``task.add``       ``name, priority, one of command|cgroup|pids, forecaster, <res>: {min, max}``
                   -> ``{"task": name, "allocation": {res: units}}``
``task.remove``    ``name`` -> ``{"released": {res: units}}``
``exec.allocate``  ``name, priority, forecaster, <res>: {min, max}, wait (bool), timeout (s)``
                   -> ``{"task", "procs": [cgroup.procs paths], "allocation", "predicted",
                   "shortfall", "preempted": [{"from", "resource", "units"}], "waited_s"}``;
                   when the pool cannot cover the prediction the reply is an error with
                   ``"shortfall"``, or, with ``wait``, is sent once the units are granted (or at
                   ``timeout``).  The caller then writes its pid to every ``procs`` file and execs.
``exec.release``   ``name`` -> ``{"released": {res: units}}`` (also done by rswap when the task's
                   cgroup empties, or its caller dies before starting it)
=================  ==============================================================================

The server runs in its own thread over non-blocking sockets (``selectors``): a slow or silent
client never delays a tick; requests are handled under the daemon's lock between ticks.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rswap_ebpf import paths
from rswap_ebpf.errors import ConfigError, RswapError

log = logging.getLogger(__name__)

SOCKET_NAME = "rswap.sock"
MAX_MESSAGE = 64 * 1024
MAX_CLIENTS = 64
IDLE_TIMEOUT_S = 30.0


def socket_path() -> str:
    return os.path.join(paths.root("RUN_DIR"), SOCKET_NAME)


def answer_timeout(default: float = 10.0) -> float:
    """Seconds a client waits for the daemon's answer: ``default``, or more where
    ``RSWAP_CONTROL_TIMEOUT`` says so (a daemon on a slow, software-emulated VM answers late)."""
    raw = os.environ.get("RSWAP_CONTROL_TIMEOUT")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError("RSWAP_CONTROL_TIMEOUT", f"expected seconds, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError("RSWAP_CONTROL_TIMEOUT", f"expected seconds > 0, got {raw!r}")
    return max(default, value)


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


class Deferred:
    """A reply given later (``exec.allocate`` with ``wait``), resolved from the tick thread.

    ``on_cancel`` runs (on the server thread) when the client hangs up first.
    """

    def __init__(self, on_cancel: Callable[[], None] | None = None):
        self.on_cancel = on_cancel
        self._lock = threading.Lock()
        self._reply: dict | None = None
        self._notify: Callable[[Deferred], None] | None = None

    def resolve(self, reply: dict) -> None:
        with self._lock:
            if self._reply is not None:
                return
            self._reply = reply
            notify = self._notify
        if notify:
            notify(self)

    @property
    def reply(self) -> dict | None:
        return self._reply

    def _attach(self, notify: Callable[[Deferred], None]) -> bool:
        """Arrange ``notify``; False when already resolved (send the reply now)."""
        with self._lock:
            if self._reply is not None:
                return False
            self._notify = notify
            return True


Dispatch = Callable[[dict, Peer], "dict | Deferred"]


class _Conn:
    def __init__(self, sock: socket.socket, peer: Peer):
        self.sock = sock
        self.peer = peer
        self.inbuf = b""
        self.outbuf = b""
        self.pending: list[tuple[Any, Deferred]] = []
        self.closing = False
        #: the client shut its sending side (or hung up): nothing more to read, replies still go
        self.eof = False
        self.last = time.monotonic()


def error_reply(err: BaseException | str, **extra) -> dict:
    out: dict[str, Any] = {"ok": False, "error": str(err)}
    if isinstance(err, ConfigError):
        out["field"] = err.field
        out["error"] = str(err)
    out.update(extra)
    return out


class ControlServer:
    """Serves ``dispatch(request, peer)`` on a Unix socket from a background thread."""

    def __init__(self, dispatch: Dispatch, path: str | None = None,
                 allowed_uids: frozenset[int] = frozenset({0})):
        self.dispatch = dispatch
        self.path = path or socket_path()
        self.allowed_uids = allowed_uids
        self._sel = selectors.DefaultSelector()
        self._listen: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._ready: list[tuple[_Conn, Any, Deferred]] = []
        self._ready_lock = threading.Lock()
        self._conns: dict[int, _Conn] = {}
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        for p in (tmp, self.path):  # a stale socket of a dead daemon (we hold the lock)
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Bound under a temporary name, made 0600, then renamed: never reachable by others.
            s.bind(tmp)
            os.chmod(tmp, 0o600)
            os.rename(tmp, self.path)
            s.listen(MAX_CLIENTS)
            s.setblocking(False)
        except OSError as err:
            s.close()
            raise RswapError(f"cannot serve the control socket {self.path}: {err.strerror}") from err
        self._listen = s
        self._sel.register(s, selectors.EVENT_READ, "listen")
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, name="rswap-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        for c in list(self._conns.values()):
            self._drop(c)
        if self._listen is not None:
            self._listen.close()
            self._listen = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            for key, events in self._sel.select(timeout=1.0):
                try:
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._service(key.data, events)
                except Exception:  # one client must never take the server down
                    log.exception("control socket")
                    if isinstance(key.data, _Conn):
                        self._drop(key.data)
            now = time.monotonic()
            for c in list(self._conns.values()):
                if not c.pending and not c.outbuf and now - c.last > IDLE_TIMEOUT_S:
                    self._drop(c)

    def _accept(self) -> None:
        assert self._listen is not None
        while True:
            try:
                sock, _ = self._listen.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            peer = peer_credentials(sock)
            conn = _Conn(sock, peer)
            if peer.uid not in self.allowed_uids:
                log.warning("control socket: refused uid %d (pid %d)", peer.uid, peer.pid)
                self._refuse(conn, "rswap's control socket serves root only")
                continue
            if len(self._conns) >= MAX_CLIENTS:
                self._refuse(conn, f"too many clients (at most {MAX_CLIENTS}); try again")
                continue
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _refuse(self, conn: _Conn, text: str) -> None:
        try:
            conn.sock.send(_line(error_reply(text)))
        except OSError:
            pass
        conn.sock.close()

    def _service(self, c: _Conn, events: int) -> None:
        if events & selectors.EVENT_READ and not c.eof:
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._end_of_input(c)
                return
            if data:
                c.last = time.monotonic()
                c.inbuf += data
                self._handle_lines(c)
        if events & selectors.EVENT_WRITE or c.outbuf:
            self._flush(c)

    def _handle_lines(self, c: _Conn) -> None:
        while b"\n" in c.inbuf and not c.closing:
            line, c.inbuf = c.inbuf.split(b"\n", 1)
            if len(line) > MAX_MESSAGE:
                c.closing = True
                self._send(c, error_reply(f"message longer than {MAX_MESSAGE} bytes"))
                break
            if line.strip():
                self._request(c, line)
        if len(c.inbuf) > MAX_MESSAGE and not c.closing:
            c.closing = True
            c.inbuf = b""
            self._send(c, error_reply(f"message longer than {MAX_MESSAGE} bytes"))

    def _end_of_input(self, c: _Conn) -> None:
        """The client sent all it will (``shutdown(SHUT_WR)``, or it hung up): a last request
        without its newline is still answered, then the connection closes once replies are out
        (a request still waiting for its reply is cancelled, as on a hang-up)."""
        c.eof = True
        line, c.inbuf = c.inbuf, b""
        if line.strip() and not c.closing:
            if len(line) > MAX_MESSAGE:
                self._send(c, error_reply(f"message longer than {MAX_MESSAGE} bytes"))
            else:
                self._request(c, line)
        if not c.outbuf or c.sock.fileno() < 0:
            self._drop(c)
            return
        c.closing = True
        self._flush(c)

    def _request(self, c: _Conn, line: bytes) -> None:
        rid = None
        try:
            req = json.loads(line)
        except (ValueError, RecursionError) as err:  # bad JSON or UTF-8; nested past the stack
            why = "nested too deeply" if isinstance(err, RecursionError) else str(err)
            self._send(c, error_reply(f"malformed JSON: {why}"))
            return
        if not isinstance(req, dict) or not isinstance(req.get("op"), str):
            self._send(c, error_reply('expected a JSON object with a string "op"'))
            return
        rid = req.get("id")
        try:
            reply = self.dispatch(req, c.peer)
        except RswapError as err:
            reply = error_reply(err)
        except Exception as err:  # report, keep serving
            log.exception("control request %s", req.get("op"))
            reply = error_reply(f"internal error: {err}")
        if isinstance(reply, Deferred):
            if reply._attach(lambda d, c=c, rid=rid: self._post(c, rid, d)):
                c.pending.append((rid, reply))
                return
            reply = reply.reply or error_reply("no reply")
        self._send(c, reply, rid)

    def _post(self, c: _Conn, rid: Any, d: Deferred) -> None:
        with self._ready_lock:
            self._ready.append((c, rid, d))
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._ready_lock:
            ready, self._ready = self._ready, []
        for c, rid, d in ready:
            if c.sock.fileno() < 0 or self._conns.get(c.sock.fileno()) is not c:
                continue
            c.pending = [(r, x) for r, x in c.pending if x is not d]
            self._send(c, d.reply or error_reply("no reply"), rid)

    def _send(self, c: _Conn, reply: dict, rid: Any = None) -> None:
        if rid is not None:
            reply = {**reply, "id": rid}
        c.outbuf += _line(reply)
        self._flush(c)

    def _flush(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        if fd < 0:
            return
        while c.outbuf:
            try:
                n = c.sock.send(c.outbuf)
            except BlockingIOError:
                break
            except OSError:
                self._drop(c)
                return
            c.outbuf = c.outbuf[n:]
        if c.outbuf:
            events = selectors.EVENT_WRITE if c.eof else selectors.EVENT_READ | selectors.EVENT_WRITE
            self._sel.modify(c.sock, events, c)
        elif c.closing:
            self._drop(c)
        elif fd in self._conns:
            self._sel.modify(c.sock, selectors.EVENT_READ, c)

    def _drop(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        if fd >= 0:
            self._conns.pop(fd, None)
            try:
                self._sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.sock.close()
        for _, d in c.pending:
            if d.reply is None and d.on_cancel is not None:
                try:
                    d.on_cancel()
                except Exception:
                    log.exception("cancelling a waiting request")
        c.pending = []


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode()


# -- client -----------------------------------------------------------------------------------

class NotRunning(RswapError):
    """No daemon answers on the control socket."""


def request(op: str, timeout: float | None = 10.0, path: str | None = None, **args) -> dict:
    """Send one request and return the reply; RswapError when the reply is an error."""
    reply = raw_request({"op": op, **args}, timeout=timeout, path=path)
    if not reply.get("ok"):
        err = RswapError(reply.get("error", "request failed"))
        err.reply = reply  # type: ignore[attr-defined]
        raise err
    return reply


def raw_request(req: dict, timeout: float | None = 10.0, path: str | None = None) -> dict:
    path = path or socket_path()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning("no rswap daemon is running (start one as root with: "
                             "rswap run)") from None
        except PermissionError:
            raise RswapError(f"{path}: permission denied (the control socket is root only; "
                             "run it as root)") from None
        try:
            s.sendall(_line(req))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it read us: its one error line may be waiting below
        buf = b""
        while b"\n" not in buf:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                raise RswapError(f"the daemon did not answer {req.get('op')!r} in time") from None
            if not chunk:
                break
            buf += chunk
        if not buf:
            raise RswapError("the daemon closed the control connection without a reply")
        try:
            return json.loads(buf.split(b"\n", 1)[0])
        except json.JSONDecodeError as err:
            raise RswapError(f"bad reply from the daemon: {err}") from None
    except OSError as err:
        if err.errno in (errno.ECONNRESET, errno.EPIPE):
            raise RswapError("the daemon closed the control connection") from None
        raise
    finally:
        s.close()
