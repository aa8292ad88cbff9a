"""The control socket and its scheduler, composed around a running daemon as a start/stop hook.

``rswap run`` adds it (cli/main.py): the runtime never imports the server.
"""
from __future__ import annotations

from rswap_ebpf.runtime.daemon import Daemon, Hook
from rswap_ebpf.runtime.pipeline import TickReport
from rswap_ebpf.server.control import ControlServer
from rswap_ebpf.server.scheduler import Scheduler


class ControlService(Hook):
    """Serves ``RUN_DIR/rswap.sock`` while the daemon runs; the wait queue after every tick."""

    def __init__(self) -> None:
        self.daemon: Daemon | None = None
        self.scheduler: Scheduler | None = None
        self.control: ControlServer | None = None

    def start(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.scheduler = Scheduler(daemon, daemon.overflow)
        self.control = ControlServer(self.scheduler.dispatch)
        self.control.start()
        self.scheduler.warm_up()  # a first rswap exec / task add need not wait for River's import

    def tick(self, report: TickReport) -> None:
        self.scheduler.serve_queue()

    def stop(self) -> None:
        if self.scheduler is not None:
            with self.daemon.mutex:
                self.scheduler.close()
        if self.control is not None:
            self.control.close()
            self.control = None
