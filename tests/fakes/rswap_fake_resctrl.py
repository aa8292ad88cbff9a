"""``rswap`` with the fake resctrl mount in place, for tests that run it as a subprocess.

    RSWAP_RESCTRL_ROOT=<tree> RSWAP_FAKE_RESCTRL_STATE=<tree>.state.json \\
        python -m tests.fakes.rswap_fake_resctrl run --config ...

The fake (tests/fakes/resctrl.py, the kernel's documented resctrl interface) validates writes in
Python, inside the process that makes them; this rebuilds the fake a test (or a previous, killed
``rswap``) left at ``RSWAP_RESCTRL_ROOT`` from its state file, registers it as the resctrl
filesystem there (what the in-process tests do with ``FakeResctrl(...)``), and hands the
arguments to ``rswap_ebpf.cli.main.main``.  Nothing else differs from the installed ``rswap``.
"""
from __future__ import annotations

import os
import sys

from tests.fakes.resctrl import FakeResctrl


def main(argv: list[str]) -> int:
    state = os.environ.get("RSWAP_FAKE_RESCTRL_STATE")
    if state:  # unset: no fake was set up (a test's teardown before it made one), plain rswap
        FakeResctrl.attach(os.environ["RSWAP_RESCTRL_ROOT"], state)
    from rswap_ebpf.cli.main import main as rswap_main

    return rswap_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
