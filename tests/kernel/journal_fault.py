"""``rswap`` that SIGKILLs itself right after its Nth journal entry is on disk (crash tests).

    python -m tests.kernel.journal_fault N run --config ...

Every journal entry goes through ``Journal._append`` (written and fsynced before the change it
announces is made); this wraps it so that the Nth call, counted over the process, returns only
to a SIGKILL: the change is journalled but not made, the moment crash safety must survive.
Then it runs ``rswap`` as tests/fakes/rswap_fake_resctrl.py does (the fake resctrl mount, then
``rswap_ebpf.cli.main.main``).  The product has no fault switch; the hook lives only here.
"""
from __future__ import annotations

import os
import signal
import sys

from rswap_ebpf.host.journal import Journal
from tests.fakes.rswap_fake_resctrl import main as rswap_main


def kill_after_journal_entry(n: int) -> None:
    """Patch ``Journal._append`` so that the process dies right after its ``n``-th entry."""
    original = Journal._append
    appended = 0

    def _append(self, entry):
        nonlocal appended
        original(self, entry)
        appended += 1
        if appended == n:
            os.kill(os.getpid(), signal.SIGKILL)

    Journal._append = _append


if __name__ == "__main__":
    kill_after_journal_entry(int(sys.argv[1]))
    sys.exit(rswap_main(sys.argv[2:]))
