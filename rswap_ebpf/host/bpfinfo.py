"""What the kernel says about rswap's BPF objects: pinned maps and the programs that use them.

Read with the ``bpf(2)`` syscall directly (``BPF_OBJ_GET``, ``BPF_OBJ_GET_INFO_BY_FD``,
``BPF_PROG_GET_NEXT_ID``), not through bcc, so ``rswap maps`` and the metrics exporter work in a
process that loaded nothing and see every collector that pins under :func:`paths.pin_dir`.
Program run time needs the kernel's BPF statistics; :func:`enable_run_time_stats` turns them on
with ``BPF_ENABLE_STATS`` for as long as its file descriptor is open (Linux 5.8), so nothing
global is left switched on when rswap exits.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shlex
from dataclasses import asdict, dataclass

from rswap_ebpf import paths

_SYS_BPF = 321  # x86_64
BPF_OBJ_GET = 7
BPF_PROG_GET_NEXT_ID = 11
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0

MAP_TYPES = ("unspec", "hash", "array", "prog_array", "perf_event_array", "percpu_hash",
             "percpu_array", "stack_trace", "cgroup_array", "lru_hash", "lru_percpu_hash",
             "lpm_trie", "array_of_maps", "hash_of_maps", "devmap", "sockmap", "cpumap", "xskmap",
             "sockhash", "cgroup_storage", "reuseport_sockarray", "percpu_cgroup_storage", "queue",
             "stack", "sk_storage", "devmap_hash", "struct_ops", "ringbuf", "inode_storage",
             "task_storage", "bloom_filter", "user_ringbuf", "cgrp_storage")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16),
                ("_rest", ctypes.c_uint8 * 72)]


class _ProgInfo(ctypes.Structure):
    """``struct bpf_prog_info`` up to ``verified_insns`` (uapi/linux/bpf.h)."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
                ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
                ("gpl_compatible", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64),
                ("netns_ino", ctypes.c_uint64), ("nr_jited_ksyms", ctypes.c_uint32),
                ("nr_jited_func_lens", ctypes.c_uint32), ("jited_ksyms", ctypes.c_uint64),
                ("jited_func_lens", ctypes.c_uint64), ("btf_id", ctypes.c_uint32),
                ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
                ("nr_func_info", ctypes.c_uint32), ("nr_line_info", ctypes.c_uint32),
                ("line_info", ctypes.c_uint64), ("jited_line_info", ctypes.c_uint64),
                ("nr_jited_line_info", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
                ("jited_line_info_rec_size", ctypes.c_uint32), ("nr_prog_tags", ctypes.c_uint32),
                ("prog_tags", ctypes.c_uint64), ("run_time_ns", ctypes.c_uint64),
                ("run_cnt", ctypes.c_uint64), ("recursion_misses", ctypes.c_uint64),
                ("verified_insns", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    rc = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if rc < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return rc


def _info(fd: int, info: ctypes.Structure) -> None:
    class Attr(ctypes.Structure):
        _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]

    _bpf(BPF_OBJ_GET_INFO_BY_FD, Attr(fd, ctypes.sizeof(info), ctypes.addressof(info)))


@dataclass(frozen=True)
class PinnedMap:
    """One map pinned by rswap, as the kernel describes it."""

    name: str
    path: str
    id: int
    map_type: str
    key_size: int
    value_size: int
    max_entries: int

    @property
    def dump_command(self) -> str:
        return f"bpftool map dump pinned {shlex.quote(self.path)}"

    def as_dict(self) -> dict:
        return {**asdict(self), "dump_command": self.dump_command}


@dataclass(frozen=True)
class ProgramStats:
    """Cumulative run time and run count of one program (0 while statistics are off)."""

    id: int
    name: str
    run_time_ns: int
    run_cnt: int


def obj_get(path: str) -> int:
    """A file descriptor for the BPF object pinned at ``path``."""
    class Attr(ctypes.Structure):
        _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]

    buf = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(BPF_OBJ_GET, Attr(ctypes.addressof(buf), 0, 0))


def map_info(fd: int) -> _MapInfo:
    info = _MapInfo()
    _info(fd, info)
    return info


def list_pinned(pin_dir: str | None = None) -> list[PinnedMap]:
    """rswap's pinned maps, by name; entries that are not maps are skipped."""
    d = pin_dir or paths.pin_dir()
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        path = os.path.join(d, name)
        try:
            fd = obj_get(path)
        except OSError:
            continue
        try:
            info = map_info(fd)
        except OSError:
            continue  # a pinned program or link, not a map
        finally:
            os.close(fd)
        kind = MAP_TYPES[info.type] if info.type < len(MAP_TYPES) else f"type {info.type}"
        out.append(PinnedMap(name, path, info.id, kind, info.key_size, info.value_size, info.max_entries))
    return out


def _prog_ids():
    class Attr(ctypes.Structure):
        _fields_ = [("start_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]

    attr = Attr(0, 0, 0)
    while True:
        try:
            _bpf(BPF_PROG_GET_NEXT_ID, attr)
        except OSError as err:
            if err.errno == errno.ENOENT:
                return
            raise
        yield attr.next_id
        attr.start_id = attr.next_id


def _prog_fd(prog_id: int) -> int:
    class Attr(ctypes.Structure):
        _fields_ = [("prog_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]

    return _bpf(BPF_PROG_GET_FD_BY_ID, Attr(prog_id, 0, 0))


def programs_using(map_ids: set[int]) -> list[ProgramStats]:
    """Every loaded program that uses one of ``map_ids``: rswap's programs, whoever loaded them."""
    out = []
    if not map_ids:
        return out
    for pid in _prog_ids():
        try:
            fd = _prog_fd(pid)
        except OSError:
            continue  # unloaded meanwhile
        try:
            ids = (ctypes.c_uint32 * 64)()
            info = _ProgInfo(nr_map_ids=64, map_ids=ctypes.addressof(ids))
            _info(fd, info)
        except OSError:
            continue
        finally:
            os.close(fd)
        used = {ids[i] for i in range(min(info.nr_map_ids, 64))}
        if used & map_ids:
            out.append(ProgramStats(info.id, info.name.decode(errors="replace"), info.run_time_ns, info.run_cnt))
    return out


def rswap_program_stats(pin_dir: str | None = None) -> list[ProgramStats]:
    """Run-time statistics of the programs that use rswap's pinned maps."""
    return programs_using({m.id for m in list_pinned(pin_dir)})


def enable_run_time_stats() -> int:
    """Turn on the kernel's BPF run-time statistics until the returned descriptor is closed."""
    class Attr(ctypes.Structure):
        _fields_ = [("type", ctypes.c_uint32)]

    return _bpf(BPF_ENABLE_STATS, Attr(BPF_STATS_RUN_TIME))
