"""Specialised co-processors: a resource the operator defines with two commands.

Registered in the configuration::

    [resources.coproc]
    name = "fpga0"                        # shown in status and errors
    total = 8                             # units the device has (required)
    probe = ["/usr/local/bin/fpga-usage"] # prints usage per task (required)
    apply = ["/usr/local/bin/fpga-limit"] # optional: enforces one task's allocation
    timeout = 5                           # seconds either command may take (default 5)

**Probe protocol.**  rswap runs ``probe`` once per tick.  On standard input it writes one line per
task: the task name followed by its process ids, separated by spaces (``web 1234 1240``).  The
probe prints one line per task it has usage for: ``<task> <units>`` where units is a non-negative
number (``web 2.5``).  Blank lines and lines starting with ``#`` are ignored; a task it does not
print used nothing.  Exit status 0.  Anything else (non-zero exit, timeout, a line that is not
``name number``, a negative or non-finite number, a task rswap did not send) is an error that
names the command and the offending line.

**Apply protocol.**  ``apply`` is run as ``apply... <task> <units>`` with the task's pids on
standard input (one line, space separated) whenever the task's allocation changes; exit status
0 means it is in force.
"""
from __future__ import annotations

import math
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rswap_ebpf.errors import EnforceError, RswapError

DEFAULT_TIMEOUT_S = 5.0


class ProbeError(RswapError):
    """The co-processor's probe failed or printed something rswap cannot read."""

    def __init__(self, command: Sequence[str], message: str):
        self.command = tuple(command)
        super().__init__(f"co-processor probe {' '.join(command)!r}: {message}")


@dataclass(frozen=True)
class CoprocSpec:
    name: str
    total_units: int
    probe: tuple[str, ...]
    apply: tuple[str, ...] = ()
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def from_options(cls, options: Mapping, total: int) -> CoprocSpec:
        return cls(options.get("name", "coproc"), int(total), tuple(options["probe"]),
                   tuple(options.get("apply", ())), float(options.get("timeout", DEFAULT_TIMEOUT_S)))


def _stdin(tasks: Mapping[str, Sequence[int]]) -> str:
    return "".join(f"{name} {' '.join(str(p) for p in pids)}".rstrip() + "\n"
                   for name, pids in tasks.items())


def parse_probe_output(text: str, tasks: Sequence[str], command: Sequence[str] = ("probe",)
                       ) -> dict[str, float]:
    """``"web 2.5\\nbatch 1\\n"`` -> ``{"web": 2.5, "batch": 1.0}``; tasks left out used 0."""
    out = {t: 0.0 for t in tasks}
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ProbeError(command, f"line {number} {raw!r}: expected '<task> <units>'")
        name, value = parts
        if name not in out:
            raise ProbeError(command, f"line {number}: unknown task {name!r} "
                             f"(rswap sent {', '.join(tasks) or 'no tasks'})")
        if name in seen:
            raise ProbeError(command, f"line {number}: task {name!r} printed twice")
        try:
            units = float(value)
        except ValueError:
            raise ProbeError(command, f"line {number} {raw!r}: {value!r} is not a number") from None
        if not math.isfinite(units) or units < 0:
            raise ProbeError(command, f"line {number} {raw!r}: units must be a finite number >= 0")
        out[name] = units
        seen.add(name)
    return out


class Coproc:
    """Runs the probe and apply commands of one registered co-processor."""

    def __init__(self, spec: CoprocSpec):
        self.spec = spec

    def probe(self, tasks: Mapping[str, Sequence[int]]) -> dict[str, float]:
        cmd = self.spec.probe
        try:
            # errors="replace": bytes that are not UTF-8 become a ProbeError on their line.
            proc = subprocess.run(list(cmd), input=_stdin(tasks), capture_output=True, text=True,
                                  errors="replace", timeout=self.spec.timeout_s, close_fds=True)
        except FileNotFoundError:
            raise ProbeError(cmd, f"{cmd[0]} does not exist") from None
        except PermissionError:
            raise ProbeError(cmd, f"{cmd[0]} is not executable") from None
        except subprocess.TimeoutExpired:
            raise ProbeError(cmd, f"no answer within {self.spec.timeout_s:g}s") from None
        except OSError as err:
            raise ProbeError(cmd, f"cannot run: {err.strerror}") from None
        if proc.returncode != 0:
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no message"]
            raise ProbeError(cmd, f"exited with status {proc.returncode}: {tail[0]}")
        return parse_probe_output(proc.stdout, list(tasks), cmd)

    def apply(self, task: str, units: int, pids: Sequence[int]) -> None:
        if not self.spec.apply:
            return
        cmd = list(self.spec.apply) + [task, str(int(units))]
        try:
            proc = subprocess.run(cmd, input=" ".join(str(p) for p in pids) + "\n",
                                  capture_output=True, text=True, errors="replace",
                                  timeout=self.spec.timeout_s, close_fds=True)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise EnforceError(cmd[0], f"co-processor apply for {task} failed: {err}") from None
        if proc.returncode != 0:
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no message"]
            raise EnforceError(cmd[0], f"co-processor apply {task} {units} exited with status "
                               f"{proc.returncode}: {tail[0]}")
