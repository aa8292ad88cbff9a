"""The fake resctrl mount across processes (tests/fakes/resctrl.py, ``state_file``), and the
launcher that runs ``rswap`` with it (tests/fakes/rswap_fake_resctrl.py).

The crash test (tests/kernel/test_crash.py) relies on both: a SIGKILLed ``rswap run`` leaves the
fake's state on disk, and ``rswap restore`` in a new process must find it exactly as the kernel
would have kept it.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fakes.resctrl import FakeResctrl
from tests.kernel.test_crash_resctrl import digest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def make(tmp_path, **kw):
    return FakeResctrl(str(tmp_path / "resctrl"), cbm_mask="fff", num_closids=4,
                       state_file=str(tmp_path / "resctrl.state.json"), **kw)


def test_attach_rebuilds_the_state_and_keeps_validating(tmp_path):
    fake = make(tmp_path, pids=(1, 7))
    fake.mkdir(os.path.join(fake.root, "g"))
    fake.write(os.path.join(fake.root, "g", "schemata"), "L3:0=3;1=3\nMB:0=30;1=50\n")
    fake.write(os.path.join(fake.root, "g", "tasks"), "7")
    before = digest(fake.root)
    fake.close()
    # A process killed mid-render left a torn file and half a group behind.
    with open(os.path.join(fake.root, "g", "schemata"), "w") as f:
        f.write("L3:0=")
    os.makedirs(os.path.join(fake.root, "half-made", "mon_data"))
    again = FakeResctrl.attach(fake.root, fake.state_file)
    try:
        assert digest(again.root) == before
        assert again.group_of(7) == "g"
        with pytest.raises(OSError):  # still the kernel's checks
            again.write(os.path.join(again.root, "g", "schemata"), "L3:0=5\n")
        with pytest.raises(OSError):
            again.write(os.path.join(again.root, "g", "tasks"), "99")
        again.rmdir(os.path.join(again.root, "g"))
    finally:
        again.close()
    third = FakeResctrl.attach(fake.root, fake.state_file)
    third.close()
    assert set(third.groups) == {""} and third.groups[""]["tasks"] == {1, 7}


def test_live_pids_are_this_hosts_threads(tmp_path):
    fake = make(tmp_path, pids=(), live_pids=True)
    try:
        fake.mkdir(os.path.join(fake.root, "g"))
        fake.write(os.path.join(fake.root, "g", "tasks"), str(os.getpid()))
        assert fake.group_of(os.getpid()) == "g"
        p = subprocess.Popen([sys.executable, "-c", "pass"])
        p.wait()
        with pytest.raises(OSError):  # exited: ESRCH
            fake.write(os.path.join(fake.root, "g", "tasks"), str(p.pid))
    finally:
        fake.close()
