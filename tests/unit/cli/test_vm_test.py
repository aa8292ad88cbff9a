"""tools/vm_test ends cleanly however it is stopped: no QEMU left behind, nothing left mounted.

The QEMU here is a stand-in named by ``RSWAP_VM_QEMU`` (tools/vm_test's documented way to run
another QEMU binary or wrapper).  It takes QEMU's command line, writes to the files its two
``-serial file:PATH`` options name as Debian's guest would (the test unit's lines on the first,
a heartbeat on the second), and starts a child of its own, as QEMU's helpers would be.  The root
filesystem tree is a small stand-in too, marked built and provisioned the way tools/vm_test marks
its cache, so the script goes straight to building the image and booting.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[3]
VM_TEST = REPO / "tools" / "vm_test"
KVER = "6.1.0-0-amd64"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tools/vm_test runs mkfs and mounts)"),
    pytest.mark.skipif(shutil.which("mkfs.ext4") is None or shutil.which("setpriv") is None,
                       reason="needs mkfs.ext4 (e2fsprogs) and setpriv (util-linux)"),
]

STAND_IN = r'''#!PYTHON
"""A stand-in for qemu-system-x86_64: behaves as $STAND_IN_MODE says."""
import os, signal, subprocess, sys, time

serial = [a.split(":", 1)[1] for a in sys.argv if a.startswith("file:")]
console, beat = serial[0], serial[1]
mode = os.environ["STAND_IN_MODE"]
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
helper = subprocess.Popen(["sleep", "1000"])
with open(os.environ["STAND_IN_PIDS"], "w") as f:
    f.write(f"{os.getpid()} {helper.pid}\n")

def out(text):
    with open(console, "a") as f:
        f.write(text)

out("[    0.000000] Linux version 6.1.0\r\n")
if mode != "silent":
    out("RSWAP-VM-BEGIN 6.1.0-0-amd64 cgroup=cgroup2fs\r\n")
    out("tests/kernel/test_a.py::test_quick PASSED [ 50%]\r\n")
if mode == "finish":
    out("tests/kernel/test_a.py::test_other PASSED [100%]\r\n")
    out("RSWAP-VM-RESULT 3\r\n")
    helper.kill()
    sys.exit(0)
if mode != "silent":
    out("tests/kernel/test_a.py::test_hangs ")
while True:
    if mode != "silent":
        with open(beat, "a") as f:
            f.write("alive\n")
    time.sleep(0.2)
'''


@pytest.fixture
def vm(tmp_path):
    """An RSWAP_VM_DIR whose tree counts as built and provisioned, and the stand-in QEMU."""
    vmdir = tmp_path / "vm"
    rootfs = vmdir / "rootfs"
    for d in (f"lib/modules/{KVER}", "boot", "proc", "dev", "etc/ssl/certs", "usr/sbin"):
        (rootfs / d).mkdir(parents=True)
    (rootfs / ".rswap-base").touch()
    (rootfs / f"boot/vmlinuz-{KVER}").write_bytes(b"not a kernel")
    (rootfs / f"boot/initrd.img-{KVER}").write_bytes(b"not an initrd")
    # tools/vm_test's stamp: provision.sh --install-only ran for this pyproject.toml and script
    installed = hashlib.sha256((REPO / "pyproject.toml").read_bytes()
                               + (REPO / "vagrant/provision.sh").read_bytes()).hexdigest()
    (rootfs / ".rswap-installed").write_text(installed + "\n")
    qemu = tmp_path / "qemu-stand-in"
    qemu.write_text(STAND_IN.replace("PYTHON", sys.executable, 1))
    qemu.chmod(0o755)
    pids = tmp_path / "pids"
    env = {**os.environ, "RSWAP_VM_DIR": str(vmdir), "RSWAP_VM_QEMU": str(qemu),
           "RSWAP_VM_ACCEL": "tcg", "STAND_IN_PIDS": str(pids)}
    yield {"dir": vmdir, "rootfs": rootfs, "env": env, "pids": pids}
    if pids.exists():  # whatever the test's outcome, leave nothing running
        for pid in map(int, pids.read_text().split()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for m in _mounts_under(rootfs):
        subprocess.run(["umount", "-l", m], check=False)


def _mounts_under(top: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(f"{top}/")]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _start(vm, mode: str, **env) -> subprocess.Popen:
    return subprocess.Popen([str(VM_TEST), "--", "tests/kernel", "-k", "maps"],
                            env={**vm["env"], "STAND_IN_MODE": mode, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for_guest(vm, proc: subprocess.Popen, timeout_s: float = 60) -> tuple[list[int], str]:
    """The stand-in's pid and its helper's, and what tools/vm_test printed, once it has shown
    the guest's first test line (the stand-in has then written its hanging test's start)."""
    shown = ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and "test_quick PASSED" not in shown:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:  # read the pipe itself: a line held in proc.stdout's buffer would not wake select
            chunk = os.read(proc.stdout.fileno(), 65536).decode()
            assert chunk, f"tools/vm_test ended early:\n{shown}"
            shown += chunk
    if "test_quick PASSED" not in shown:
        proc.kill()
        raise AssertionError(f"the guest's first line was never shown:\n{shown}")
    pids = [int(p) for p in vm["pids"].read_text().split()]
    assert len(pids) == 2
    return pids, shown


def _assert_gone_within(pids: list[int], proc: subprocess.Popen, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    try:
        out, _ = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"tools/vm_test still running {seconds} s later: {proc.communicate()[0]}")
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    assert not left, f"left running: {left}\n{out}"
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_stops_qemu_and_unmounts_within_10_s(vm, sig):
    # a mount below the tree, as a chroot step of a killed run would leave one
    subprocess.run(["mount", "-t", "tmpfs", "rswap-test", str(vm["rootfs"] / "proc")], check=True)
    proc = _start(vm, "hang")
    pids, shown = _wait_for_guest(vm, proc)
    assert not _mounts_under(vm["rootfs"]), "vm_test left a mount in the tree before booting"
    subprocess.run(["mount", "-t", "tmpfs", "rswap-test", str(vm["rootfs"] / "dev")], check=True)
    t0 = time.monotonic()
    proc.send_signal(sig)
    out = shown + _assert_gone_within(pids, proc, 10)
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 128 + sig, out
    assert f"stopped by {sig.name}: stopping QEMU" in out, out
    assert not _mounts_under(vm["rootfs"])
    assert "tests/kernel/test_a.py::test_hangs" in out  # the test it was in, when stopped


def test_a_qemu_that_ignores_sigterm_is_killed(vm):
    proc = _start(vm, "ignore-term")
    pids, _ = _wait_for_guest(vm, proc)
    proc.send_signal(signal.SIGTERM)
    out = _assert_gone_within(pids, proc, 10)
    assert proc.returncode == 143, out


def test_its_own_timeout_stops_qemu_and_names_the_running_test(vm):
    proc = _start(vm, "hang", RSWAP_VM_TIMEOUT="4")
    pids, _ = _wait_for_guest(vm, proc)
    out = _assert_gone_within(pids, proc, 15)
    assert proc.returncode == 124, out
    assert "did not finish within 4s" in out and "tests/kernel/test_a.py::test_hangs" in out, out


def test_a_guest_without_heartbeat_is_stopped_as_stuck(vm):
    proc = _start(vm, "silent", RSWAP_VM_STUCK_S="3")
    deadline = time.monotonic() + 60
    while not vm["pids"].exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)
    pids = [int(p) for p in vm["pids"].read_text().split()]
    out = _assert_gone_within(pids, proc, 20)
    assert proc.returncode == 1, out
    assert "no heartbeat for 3s" in out, out


def test_the_guests_lines_stream_and_its_status_is_the_exit_status(vm):
    proc = _start(vm, "finish")
    out, _ = proc.communicate(timeout=120)
    lines = out.splitlines()
    assert proc.returncode == 3, out
    assert "tests/kernel/test_a.py::test_other PASSED [100%]" in lines
    assert not any("Linux version" in line for line in lines), out  # boot noise stays in the log
    assert "kernel tests exited 3" in out
    # what the guest is told to run: the arguments after --, as given
    unit = (vm["rootfs"] / "usr/local/sbin/rswap-vm-test").read_text()
    assert "-- tests/kernel -k maps" in unit


def test_auto_accel_says_why_kvm_is_not_used_and_falls_back_to_tcg(vm):
    """``RSWAP_VM_ACCEL=auto`` on this host.  The stand-in cannot boot anything under KVM (it
    takes one ``-serial`` only as the guest), so wherever /dev/kvm is, TCG is what runs, with
    the reason said; a host whose /dev/kvm is kvm_pvm's is named as such without a probe."""
    proc = _start(vm, "finish", RSWAP_VM_ACCEL="auto")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out
    (why,) = [line for line in out.splitlines() if line.startswith("vm_test: not using KVM: ")]
    assert len(why) > len("vm_test: not using KVM: ") + 10, why
    if not os.path.exists("/dev/kvm"):
        assert "no /dev/kvm" in why
    elif os.path.isdir("/sys/module/kvm_pvm") and not any(
            os.path.isdir(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd")):
        assert "kvm_pvm" in why and "PVM" in why
    assert "software emulation (TCG)" in out
    assert "-accel tcg" in out
