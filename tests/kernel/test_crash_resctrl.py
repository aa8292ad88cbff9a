"""Crash safety of the resctrl enforcer, in-process against the fake resctrl mount.

Why in-process: the fake (tests/fakes/resctrl.py, following Documentation/arch/x86/resctrl.rst)
validates writes inside the test process, so a separate ``rswap run`` cannot use it.  Here the
fake plays the kernel, whose state outlives the "process" (the enforcer object), and the crash is
an exception raised at the k-th step (a journal entry on disk, or just before / just after a
resctrl mkdir or write), for every k the run reaches.  Then a fresh Journal restores, as ``rswap
restore`` would, and the tree must be byte for byte what it was, every group gone and every thread
back in the default group.
"""
from __future__ import annotations

import os
import random

import pytest

from rswap_ebpf.host.cache import resctrl
from rswap_ebpf.host.journal import Journal
from tests.fakes.resctrl import FakeResctrl

PIDS = (1, 100, 101, 102, 103, 104)


class Crash(BaseException):
    """The process dies here (BaseException: nothing in rswap may swallow it)."""


class Steps:
    def __init__(self, at: int):
        self.at = at
        self.n = 0

    def step(self) -> None:
        self.n += 1
        if self.n == self.at:
            raise Crash(self.n)


class CrashingJournal(Journal):
    def __init__(self, path, steps):
        super().__init__(path)
        self.steps = steps

    def _append(self, entry):
        super()._append(entry)  # on disk (fsynced) ...
        self.steps.step()       # ... then the crash, before the change it announces


class CrashingFS(resctrl.ResctrlFS):
    """The enforcer's view of the fake; the crash can come before or after each change."""

    def __init__(self, fake, steps, after: bool):
        self.fake, self.steps, self.after = fake, steps, after

    def _change(self, op, *args):
        if not self.after:
            self.steps.step()
        op(*args)
        if self.after:
            self.steps.step()

    def write(self, path, text):
        self._change(self.fake.write, path, text)

    def mkdir(self, path):
        self._change(self.fake.mkdir, path)

    def rmdir(self, path):
        self._change(self.fake.rmdir, path)

    def read(self, path):
        return self.fake.read(path)

    def listdir(self, path):
        return self.fake.listdir(path)

    def isdir(self, path):
        return self.fake.isdir(path)

    def exists(self, path):
        return self.fake.exists(path)


def digest(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.relpath(p, root) == "info/last_cmd_status":
                continue  # the kernel's message about the last command, not state
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = b""
    return out


def run_until_crash(fake, journal, fs, rng) -> None:
    names = [f"t{i}" for i in range(rng.randint(1, 4))]
    tasks = {n: rng.choice(["critical", "normal", "batch"]) for n in names}
    enf = resctrl.ResctrlEnforcer(journal, root=fake.root, fs=fs,
                                  isolate_default=rng.random() < 0.5)
    enf.open(tasks, mount=False)
    for i, n in enumerate(names):
        enf.place(n, [PIDS[1 + i]])
    for _ in range(3):
        ways = {n: rng.randint(0, 4) for n in names}
        percent = {n: rng.randint(10, 40) for n in names}
        enf.apply(ways=ways, percent=percent)


@pytest.mark.parametrize("seed", range(12))
def test_crash_at_every_step_then_restore(tmp_path, monkeypatch, seed):
    monkeypatch.setenv("RSWAP_PROCFS_ROOT", str(tmp_path / "noproc"))  # threads = pids, fake's tasks
    rng_seed = random.Random(seed).random()
    fake = FakeResctrl(str(tmp_path / "resctrl"), cbm_mask="fff", min_cbm_bits=1 + seed % 2,
                       num_closids=8, l3_domains=(0, 1), pids=PIDS)
    try:
        baseline = digest(fake.root)
        jpath = str(tmp_path / "state" / "journal.jsonl")
        k = 1
        crashed = 0
        while True:
            after = k % 2 == 0
            steps = Steps(at=k)
            try:
                run_until_crash(fake, CrashingJournal(jpath, steps),
                                CrashingFS(fake, steps, after), random.Random(rng_seed))
            except Crash:
                crashed += 1
            else:
                # The run got past its last step: restore its complete work, and stop.
                report = Journal(jpath).restore()
                assert report.failed == []
                assert digest(fake.root) == baseline
                break
            report = Journal(jpath).restore()  # "rswap restore", in a fresh process
            assert report.failed == [], (k, report.failed)
            assert digest(fake.root) == baseline, k
            assert set(fake.groups) == {""} and fake.groups[""]["tasks"] == set(PIDS), k
            assert not os.path.exists(jpath)
            k += 1
        assert crashed >= 5  # the run has that many steps at least: every one was a crash point
    finally:
        fake.close()
