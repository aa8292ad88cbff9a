"""Loading rswap's BPF programs with bcc, probing attach points, and pinning maps.

The C lives in ``bpf/*.bpf.c`` beside a shared ``rswap.h``; it is compiled with
``BPF(src_file=..., cflags=[...])``.  Maps are pinned under ``/sys/fs/bpf/rswap/`` so
``bpftool map dump pinned /sys/fs/bpf/rswap/<map>`` shows them while rswap runs.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rswap_ebpf import paths
from rswap_ebpf.errors import FeatureMissing

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def bpf_source_dir() -> Path:
    """``bpf/`` beside the package (a checkout or an editable install), or $RSWAP_BPF_SRC."""
    env = os.environ.get("RSWAP_BPF_SRC")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent.parent
    candidates += [here.parent / "bpf", here / "bpf"]
    for c in candidates:
        if (c / "rswap.h").exists():
            return c
    raise FeatureMissing("rswap BPF sources", f"no bpf/rswap.h near {here}",
                         "run rswap from its checkout, or set RSWAP_BPF_SRC")


def import_bcc():
    """Debian's bcc module, or a clear error (never PyPI's unrelated 'bcc')."""
    try:
        import bcc
    except ImportError as err:
        raise FeatureMissing("bcc", f"the Python module does not import ({err})",
                             "apt-get install python3-bpfcc, and run from tools/setup's venv") from None
    if not hasattr(bcc, "BPF"):
        raise FeatureMissing("bcc", f"{bcc.__file__} is not BCC (PyPI's 'bcc' is another project)",
                             "pip uninstall bcc; apt-get install python3-bpfcc")
    return bcc


_LOCAL_INCLUDE = re.compile(r'^#include "([\w.]+)"[ \t]*$', re.M)


def program_source(src: str) -> str:
    """``bpf/<src>`` with its ``#include "..."`` lines replaced by the files of ``bpf/``.

    bcc turns map calls (``table.lookup(&k)``) into helper calls only in the file it compiles,
    not in the headers that file includes, so a header that defines maps and the functions
    using them (``rswap.h``'s run-queue half) has to be part of that file.
    """
    d = bpf_source_dir()
    return _LOCAL_INCLUDE.sub(lambda m: (d / m.group(1)).read_text(), (d / src).read_text())


def load(src: str, cflags: list[str]):
    """Compile ``bpf/<src>`` (with :func:`program_source`'s includes) and the -D ``cflags``."""
    bcc = import_bcc()
    d = bpf_source_dir()
    if os.geteuid() != 0:
        raise FeatureMissing("BPF", "loading programs needs root (CAP_BPF, CAP_PERFMON)", "run as root")
    try:
        return bcc.BPF(text=program_source(src).encode(), cflags=[f"-I{d}", *cflags])
    except Exception as err:  # bcc raises plain Exception for compile/load failures
        msg = str(err)
        if "modules" in msg or "kernel headers" in msg.lower():
            raise FeatureMissing("kernel headers", msg, "run tools/setup (links Debian's headers)") from None
        raise FeatureMissing("BPF program load", f"{src}: {msg}") from None


def pin_map(table, name: str) -> str:
    """Pin a bcc table at ``/sys/fs/bpf/rswap/<name>``; a stale pin from a crash is replaced."""
    bcc = import_bcc()
    d = paths.pin_dir()
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
    except OSError as err:
        raise FeatureMissing("bpffs", f"cannot create {d}: {err.strerror}",
                             "mount -t bpf bpf /sys/fs/bpf (tools/setup does)") from None
    path = os.path.join(d, name)
    if os.path.exists(path):
        os.unlink(path)
    rc = bcc.libbcc.lib.bpf_obj_pin(table.map_fd, path.encode())
    if rc != 0:
        code = ctypes.get_errno() or -rc
        raise FeatureMissing("bpffs pinning", f"cannot pin {path}: {os.strerror(code)}",
                             "is /sys/fs/bpf a bpf filesystem? mount -t bpf bpf /sys/fs/bpf")
    return path


def unpin(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    remove_pin_dir_if_empty()


def remove_pin_dir_if_empty() -> None:
    try:
        os.rmdir(paths.pin_dir())
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.ENOTEMPTY):
            raise


def remove_all_pins() -> int:
    """Used by ``rswap restore``: remove what a killed rswap left pinned."""
    d = paths.pin_dir()
    n = 0
    if os.path.isdir(d):
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
            n += 1
        remove_pin_dir_if_empty()
    return n


def raw_tracepoint_supported() -> bool:
    try:
        return bool(import_bcc().BPF.support_raw_tracepoint())
    except FeatureMissing:
        return False


def tracepoint_exists(category: str, event: str) -> bool:
    try:
        return bool(import_bcc().BPF.tracepoint_exists(category, event))
    except FeatureMissing:
        return False


@dataclass(frozen=True)
class AttachPoint:
    """One way to hook an event: its name (as bpftool shows it), the cflags that build the
    program for it, and how to tell whether the running kernel has it."""

    name: str
    cflags: tuple[str, ...]
    available: Callable[[], bool]


#: sched_switch, the way bcc tools probe it: the raw tracepoint (no argument copy) where the
#: kernel has it, else tracefs' sched:sched_switch.
SCHED_SWITCH = (
    AttachPoint("raw_tracepoint:sched_switch", ("-DRSWAP_RAW_TP",), raw_tracepoint_supported),
    AttachPoint("tracepoint:sched:sched_switch", (),
                lambda: tracepoint_exists("sched", "sched_switch")),
)
SCHED_SWITCH_FIX = "mount tracefs: mount -t tracefs tracefs /sys/kernel/tracing"


def kernel_at_least(major: int, minor: int, release: str | None = None) -> bool:
    """Whether ``uname -r`` (or ``release``) is at least ``major.minor``.

    >>> kernel_at_least(5, 18, "6.18.44-fc-v1272"), kernel_at_least(5, 18, "5.10.0-21-amd64")
    (True, False)
    """
    parts = (release or os.uname().release).split(".")
    try:
        have = (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0))
    except (IndexError, ValueError):
        return False
    return have >= (major, minor)


def sched_switch_has_prev_state(point: AttachPoint) -> bool:
    """Whether a program on ``point`` sees the switched-out task's state: tracefs' event always
    has ``prev_state``; the raw tracepoint passes it as a fourth argument from Linux 5.18."""
    return "-DRSWAP_RAW_TP" not in point.cflags or kernel_at_least(5, 18)


def choose_attach_point(event: str, chain: tuple[AttachPoint, ...], fix: str) -> AttachPoint:
    """The first of ``chain`` the kernel has, or one error naming every one that was tried."""
    for point in chain:
        if point.available():
            return point
    tried = ", ".join(p.name for p in chain)
    raise FeatureMissing(event, f"none of {tried} is available", fix)


def drain_table(table) -> list:
    """Every (key, per-CPU values) of ``table``, deleted as read.

    One ``BPF_MAP_LOOKUP_AND_DELETE_BATCH`` where the kernel has it; otherwise read, then delete
    key by key (an update racing the delete is lost: the batch call has no such window).
    """
    try:
        return list(table.items_lookup_and_delete_batch())
    except Exception:
        items = list(table.items())
        for k, _ in items:
            try:
                del table[k]
            except KeyError:
                pass
        return items


def key_int(k) -> int:
    """bcc hands integer keys back as ints from batch calls and as ctypes from items()."""
    return k if isinstance(k, int) else k.value


_NR_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_PROG_TEST_RUN = 10
_BPF_F_TEST_RUN_ON_CPU = 1


def test_run_on_cpu(prog_fd: int, cpu: int) -> None:
    """Run a raw tracepoint program once on ``cpu`` (``BPF_PROG_TEST_RUN`` with
    ``BPF_F_TEST_RUN_ON_CPU``, Linux 5.10): the kernel runs it there from an IPI, with ``current``
    whatever that CPU is running.  OSError when the kernel refuses (ENXIO: the CPU is offline)."""
    nr = _NR_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"no bpf(2) number known for {os.uname().machine}")
    attr = (ctypes.c_uint8 * 80)()
    ctypes.c_uint32.from_buffer(attr, 0).value = prog_fd
    ctypes.c_uint32.from_buffer(attr, 64).value = _BPF_F_TEST_RUN_ON_CPU  # test.flags
    ctypes.c_uint32.from_buffer(attr, 68).value = cpu                     # test.cpu
    if _libc.syscall(nr, _BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def online_cpus() -> list[int]:
    """CPU numbers from /sys/devices/system/cpu/online ("0-3,6")."""
    try:
        with open("/sys/devices/system/cpu/online") as f:
            text = f.read().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


def prog_ids(b) -> list[int]:
    """Kernel ids of every program bcc loaded into ``b`` (for ``bpftool prog show id``), read
    from the program fds' /proc/self/fdinfo."""
    ids = []
    if b is None:
        return ids
    for fn in getattr(b, "funcs", {}).values():
        try:
            with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                ids += [int(line.split()[1]) for line in f if line.startswith("prog_id:")]
        except OSError:
            pass
    return ids


class BpfCollector:
    """The life cycle every collector shares: load, pin ``MAPS``, drain by interval, close.

    A collector = one ``bpf/<SOURCE>`` + a subclass that says how to build it (:meth:`cflags`,
    where attach points are probed), what to do once it is loaded (:meth:`attach`: perf events,
    tc filters, counters; bcc attaches the ``TRACEPOINT_PROBE``/``RAW_TRACEPOINT_PROBE``
    programs itself) and how to read it (``drain()``, over :func:`drain_table`).  :meth:`open`
    runs those steps and undoes what was done when one fails; a subclass that attached more than
    bcc tracks undoes that in ``close()`` before calling this one.
    """

    SOURCE: str = ""
    MAPS: tuple[str, ...] = ()

    def __init__(self, pin: bool = True):
        self.pin = pin
        self.pinned: list[str] = []
        self._bpf = None
        self._last = 0

    # -- what a subclass says ----------------------------------------------------------------
    def cflags(self) -> list[str]:
        """The ``-D`` flags to build ``SOURCE`` with; raises FeatureMissing when it cannot run."""
        return []

    def attach(self) -> None:
        """What has to happen after the program is loaded and before its maps are pinned."""

    # -- the life cycle ----------------------------------------------------------------------
    def program_text(self) -> str:
        return (bpf_source_dir() / self.SOURCE).read_text()

    def open(self):
        self._bpf = load(self.SOURCE, self.cflags())
        try:
            self.attach()
            self._pin_maps()
        except BaseException:
            self.close()
            raise
        self._start_clock()
        return self

    def table(self, name: str):
        if self._bpf is None:
            raise RuntimeError("collector is not open")
        return self._bpf.get_table(name.encode())

    def prog_ids(self) -> list[int]:
        return prog_ids(self._bpf)

    def _pin_maps(self) -> None:
        if not self.pin:
            return
        for name in self.MAPS:
            self.pinned.append(pin_map(self.table(name), name))

    def _start_clock(self) -> None:
        self._last = time.monotonic_ns()
    def _interval_ns(self) -> int:
        """Nanoseconds since the previous drain (or open); restarts the clock."""
        if self._bpf is None:
            raise RuntimeError("collector is not open")
        now = time.monotonic_ns()
        interval, self._last = now - self._last, now
        return interval

    def _counters(self, stats: str, labels: tuple[str, ...]) -> dict[str, int]:
        """The non-zero overflow/drop counters of a per-CPU stats array, by label ("" skips)."""
        table = self.table(stats)
        out = {}
        for idx, label in enumerate(labels):
            if not label:
                continue
            v = sum(table[table.Key(idx)])
            if v:
                out[label] = v
        return out

    def close(self) -> None:
        for path in self.pinned:
            unpin(path)
        self.pinned = []
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()
