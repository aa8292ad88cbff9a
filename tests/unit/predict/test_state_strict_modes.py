"""State directories others can write are refused, with the fix (sshd's StrictModes)."""
from __future__ import annotations

import os

import pytest

from rswap_ebpf import paths
from rswap_ebpf.errors import UnsafeStateError
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.predict.store import ProfileStore

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to another user)")


def test_a_world_writable_state_dir_is_refused_with_the_fix(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    with pytest.raises(UnsafeStateError, match=f"chmod go-w {state}"):
        ProfileStore.in_dir(str(state))
    with pytest.raises(UnsafeStateError, match="writable by group or others"):
        Journal(str(state / "journal.jsonl"))
    assert not (state / "profiles.db").exists()  # refused before anything was opened
    state.chmod(0o700)
    ProfileStore.in_dir(str(state)).close()


def test_a_group_writable_profiles_db_is_refused(tmp_path):
    ProfileStore.in_dir(str(tmp_path)).close()
    (tmp_path / "profiles.db").chmod(0o664)
    with pytest.raises(UnsafeStateError, match=f"chmod go-w {tmp_path / 'profiles.db'}"):
        ProfileStore.in_dir(str(tmp_path))


@needs_root
def test_a_state_dir_or_file_owned_by_another_user_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    with pytest.raises(UnsafeStateError, match=f"owned by uid 65534.*chown root {state}"):
        ProfileStore.in_dir(str(state))
    os.chown(state, 0, 0)
    (state / "journal.jsonl").write_text("")
    os.chown(state / "journal.jsonl", 65534, 65534)
    with pytest.raises(UnsafeStateError, match="chown root"):
        Journal(str(state / "journal.jsonl"))


def test_a_sticky_world_writable_directory_above_is_fine_but_not_as_the_state_dir(tmp_path):
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    paths.check_private(str(shared / "state"))  # /tmp/state: no one else can replace it
    with pytest.raises(UnsafeStateError):  # /tmp itself: anyone can plant profiles.db there
        paths.check_private(str(shared))
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # not sticky: anyone can rename state/ away and put theirs in
    (open_dir / "state").mkdir(mode=0o700)
    with pytest.raises(UnsafeStateError, match=f"chmod go-w {open_dir}"):
        paths.check_private(str(open_dir / "state"))
