"""Roots of the kernel filesystems rswap reads and writes.

Module values, read through :func:`root`, so tests can point them at a temporary tree (the way
psutil overrides ``PROCFS_PATH``).  Environment variables of the same name override them too, which
is how subprocesses started by tests inherit a fake tree.
"""
from __future__ import annotations

import os
import stat

CGROUP_ROOT = "/sys/fs/cgroup"
BPFFS_ROOT = "/sys/fs/bpf"
RSWAP_BPF_DIR = "rswap"
PROCFS_ROOT = "/proc"
SYSFS_ROOT = "/sys"
RESCTRL_ROOT = "/sys/fs/resctrl"
STATE_DIR = "/var/lib/rswap"
RUN_DIR = "/run/rswap"

_ENV = {
    "CGROUP_ROOT": "RSWAP_CGROUP_ROOT",
    "BPFFS_ROOT": "RSWAP_BPFFS_ROOT",
    "PROCFS_ROOT": "RSWAP_PROCFS_ROOT",
    "SYSFS_ROOT": "RSWAP_SYSFS_ROOT",
    "RESCTRL_ROOT": "RSWAP_RESCTRL_ROOT",
    "STATE_DIR": "RSWAP_STATE_DIR",
    "RUN_DIR": "RSWAP_RUN_DIR",
}


def root(name: str) -> str:
    """The current value of root ``name`` (environment first, then the module value)."""
    env = _ENV.get(name)
    if env and os.environ.get(env):
        return os.environ[env]
    return globals()[name]


def pin_dir() -> str:
    """Where rswap pins its maps: ``/sys/fs/bpf/rswap`` ($RSWAP_PIN_DIR overrides, for tests)."""
    return os.environ.get("RSWAP_PIN_DIR") or os.path.join(root("BPFFS_ROOT"), RSWAP_BPF_DIR)


def confine(path: str, base: str, what: str = "path") -> str:
    """Resolve ``path`` below ``base`` and refuse anything that would leave it.

    Rejects NUL bytes, ``..`` that climbs out, and symlinks that point elsewhere, so that nothing
    in a configuration can make root write outside the mount it names.
    """
    from rswap_ebpf.errors import ConfigError

    if "\x00" in path:
        raise ConfigError(what, "contains a NUL byte")
    base_real = os.path.realpath(base)
    joined = path if os.path.isabs(path) else os.path.join(base_real, path)
    real = os.path.realpath(joined)
    if real != base_real and not real.startswith(base_real.rstrip("/") + "/"):
        raise ConfigError(what, f"{path!r} is outside {base_real}")
    return real


def check_private(path: str, files: tuple[str, ...] = ()) -> None:
    """Refuse state at ``path`` unless only root (or the user rswap runs as) can change it, as
    sshd's ``StrictModes`` does.

    ``path`` (a directory) and ``files`` in it must be owned by root (or that user) and not
    writable by group or others; so must every directory above, except that a sticky one
    (``/tmp``) is fine there, since no one else can rename or replace what is in it.  What is
    not there yet is fine (rswap creates it private).  :class:`~.errors.UnsafeStateError` names
    the fix.
    """
    p = os.path.abspath(path)
    for name in files:
        _check_owner_mode(os.path.join(p, name), strict=True)
    strict = True  # the state directory itself: no sticky excuse
    while True:
        _check_owner_mode(p, strict)
        strict = False
        parent = os.path.dirname(p)
        if parent == p:
            return
        p = parent


def _check_owner_mode(p: str, strict: bool) -> None:
    from rswap_ebpf.errors import UnsafeStateError

    try:
        st = os.stat(p)
    except FileNotFoundError:
        return
    except OSError as err:
        raise UnsafeStateError(p, f"cannot be checked ({err.strerror})",
                               f"make {p} readable by root") from err
    if st.st_uid not in (0, os.geteuid()):
        raise UnsafeStateError(p, f"owned by uid {st.st_uid}", f"chown root {p}")
    sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if st.st_mode & 0o022 and (strict or not sticky_dir):
        raise UnsafeStateError(
            p, f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
            f"chmod go-w {p}")
