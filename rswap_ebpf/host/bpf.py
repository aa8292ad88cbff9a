"""Loading rswap's BPF programs with bcc, probing attach points, and pinning maps.

The C lives in ``bpf/*.bpf.c`` beside a shared ``rswap.h``; it is compiled with
``BPF(src_file=..., cflags=[...])``.  Maps are pinned under ``/sys/fs/bpf/rswap/`` so
``bpftool map dump pinned /sys/fs/bpf/rswap/<map>`` shows them while rswap runs.
"""
from __future__ import annotations

import ctypes
import errno
import os
import time
from pathlib import Path

from rswap_ebpf import paths
from rswap_ebpf.errors import FeatureMissing


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


def load(src: str, cflags: list[str]):
    """Compile ``bpf/<src>`` with the shared header on the include path."""
    bcc = import_bcc()
    d = bpf_source_dir()
    if os.geteuid() != 0:
        raise FeatureMissing("BPF", "loading programs needs root (CAP_BPF, CAP_PERFMON)", "run as root")
    try:
        return bcc.BPF(src_file=str(d / src).encode(), cflags=[f"-I{d}", *cflags])
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


class BpfCollector:
    """The life cycle every collector shares: load, pin ``MAPS``, drain by interval, close.

    A collector = one ``bpf/*.bpf.c`` + a subclass with ``open()`` (load, attach, then
    ``_pin_maps()`` and ``_start_clock()``), ``drain()`` and, where it attached more than bcc
    tracks, a ``close()`` that undoes that before calling this one.
    """

    MAPS: tuple[str, ...] = ()

    def __init__(self, pin: bool = True):
        self.pin = pin
        self.pinned: list[str] = []
        self._bpf = None
        self._last = 0

    def table(self, name: str):
        if self._bpf is None:
            raise RuntimeError("collector is not open")
        return self._bpf.get_table(name.encode())

    def _pin_maps(self) -> None:
        if not self.pin:
            return
        try:
            for name in self.MAPS:
                self.pinned.append(pin_map(self.table(name), name))
        except BaseException:
            self.close()
            raise

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
