"""Bytes that are not UTF-8 in files rswap reads: a one-line error naming file and line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rswap_ebpf.errors import ConfigError, JournalError
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.offline.plot import load_history

GOOD = json.dumps({"op": "mkdir", "path": "/sys/fs/cgroup/cpu/rswap/x", "shared": False})


def test_journal_with_non_utf8_bytes_names_file_and_line(tmp_path):
    j = tmp_path / "journal.jsonl"
    j.write_bytes(GOOD.encode() + b"\n" + b'{"op": "write", "path": "\xff\xfe"}\n' +
                  GOOD.encode() + b"\n")
    with pytest.raises(JournalError, match=f"{j}:2: not UTF-8 text; inspect it by hand"):
        Journal(str(j))


def test_journal_with_a_torn_non_utf8_last_line_ignores_it(tmp_path):
    j = tmp_path / "journal.jsonl"
    j.write_bytes(GOOD.encode() + b"\n" + b'{"op": "wri\xe2\x82')
    assert [e["op"] for e in Journal(str(j)).entries()] == ["mkdir"]


def test_journal_nested_too_deep_is_a_one_line_error(tmp_path):
    j = tmp_path / "journal.jsonl"
    j.write_bytes(b"[" * 100_000 + b"\n" + GOOD.encode() + b"\n")
    with pytest.raises(JournalError, match=":1: not valid JSON"):
        Journal(str(j))


def _rswap(*args, env=None):
    return subprocess.run([sys.executable, "-m", "rswap_ebpf.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_restore_on_a_non_utf8_journal_is_one_line(tmp_path):
    (tmp_path / "journal.jsonl").write_bytes(b"\xff\xff\xff\n" + GOOD.encode() + b"\n")
    run = tmp_path / "run"
    run.mkdir()
    r = _rswap("restore", "--state-dir", str(tmp_path), env={"RSWAP_RUN_DIR": str(run)})
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr and "UnicodeDecodeError" not in r.stderr
    assert f"{tmp_path / 'journal.jsonl'}:1: not UTF-8 text" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_plot_on_a_non_utf8_file_is_one_line(tmp_path):
    bad = tmp_path / "history.jsonl"
    bad.write_bytes(b'{"time": 1}\n{"time": "\xc3\x28"}\n')
    with pytest.raises(ConfigError, match=f"{bad}:2: not UTF-8 text"):
        load_history(str(bad))
    r = _rswap("plot", str(bad), "--output", str(tmp_path / "x.png"))
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and ":2: not UTF-8 text" in r.stderr
