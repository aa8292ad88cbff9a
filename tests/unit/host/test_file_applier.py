"""FileApplier writes through one descriptor: what a file holds after each write, the hand
edits it backs off from, and the errors it names, as with a fresh open per step."""
from __future__ import annotations

import pytest

from rswap_ebpf.errors import EnforceError
from rswap_ebpf.host.cgroup import FileApplier
from rswap_ebpf.host.journal import Journal


def test_shorter_longer_and_empty_values_leave_exactly_the_value(tmp_path):
    f = tmp_path / "cpu.max"
    f.write_text("100000 100000\n")
    a = FileApplier(Journal(str(tmp_path / "j.jsonl")))
    for value, held in (("5000 100000", "5000 100000"), ("max 100000", "max 100000"),
                        ("123456789 100000", "123456789 100000"), ("7", "7"), ("", "\n")):
        assert a.apply([(str(f), value)]) == [(str(f), value)]
        assert f.read_text() == held
    assert a.apply([(str(f), "")]) == []  # already what it holds (stripped): nothing written
    assert a.journal.entries()[0] == {"op": "write", "path": str(f),
                                      "original": "100000 100000\n"}


def test_a_hand_edit_is_left_alone(tmp_path):
    f = tmp_path / "io.max"
    f.write_text("0")
    a = FileApplier(Journal(str(tmp_path / "j.jsonl")))
    a.apply([(str(f), "10")])
    f.write_text("99")
    assert a.apply([(str(f), "20")]) == []
    assert f.read_text() == "99" and str(f) in a.overridden


def test_what_cannot_be_read_or_written_is_named(tmp_path):
    a = FileApplier(Journal(str(tmp_path / "j.jsonl")))
    with pytest.raises(EnforceError, match="cannot read"):
        a.apply([(str(tmp_path), "1")])  # a directory: opens for reading only
    with pytest.raises(EnforceError, match="cannot read"):
        a.apply([(str(tmp_path / "gone" / "cpu.max"), "1")])
