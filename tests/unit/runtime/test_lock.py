"""The daemon lock (an flock on RUN_DIR/rswap.lock): one holder, and a dead holder blocks nobody."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from rswap_ebpf.runtime.daemon import Lock
from rswap_ebpf.errors import AlreadyRunning

HOLD = ("import sys, time\n"
        "from rswap_ebpf.runtime.daemon import Lock\n"
        "Lock().acquire(); print('held', flush=True); time.sleep(60)")


@pytest.fixture
def holder(rswap_env):
    """Another process holding the lock, as a running daemon does."""
    p = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, **rswap_env})
    try:
        assert p.stdout.readline().strip() == "held"
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_second_holder_is_refused_and_named(holder):
    assert Lock.held()
    with pytest.raises(AlreadyRunning, match=rf"pid {holder.pid}\b"):
        Lock().acquire()
    assert Lock.held()  # the refusal did not disturb the holder's lock


def test_lock_of_a_killed_holder_does_not_block(holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    path = Lock().path
    assert os.path.exists(path)  # the stale file stays, with the dead pid in it
    with open(path) as f:
        assert f.read().strip() == str(holder.pid)
    assert not Lock.held()
    lock = Lock()
    lock.acquire()
    try:
        assert Lock.held()
        with open(path) as f:
            assert f.read().strip() == str(os.getpid())
    finally:
        lock.release()
    assert not os.path.exists(path) and not Lock.held()


def test_release_then_reacquire_in_one_process(rswap_env):
    for _ in range(3):
        lock = Lock()
        lock.acquire()
        lock.release()
    assert not Lock.held()
