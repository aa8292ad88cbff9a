"""The crash tests' fault hook (tests/kernel/journal_fault.py) kills right after the Nth entry."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

REPO = __file__.rsplit("/tests/", 1)[0]


def test_the_nth_entry_is_on_disk_and_nothing_after_it(tmp_path):
    journal = tmp_path / "journal.jsonl"
    code = ("from tests.kernel.journal_fault import kill_after_journal_entry\n"
            "from rswap_ebpf.host.journal import Journal\n"
            "kill_after_journal_entry(2)\n"
            f"j = Journal({str(journal)!r})\n"
            "for i in range(5):\n"
            "    j._append({'op': 'note', 'i': i})\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert [json.loads(line)["i"] for line in journal.read_text().splitlines()] == [0, 1]

