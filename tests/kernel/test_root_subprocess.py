"""Unit-level tests that need root itself (not the kernel's BPF or cgroups): a process that
drops to an unprivileged uid, and ``rswap restore`` run as a subprocess, which refuses anyone
but root.  They use the same fake trees as their tests/unit neighbours, and live here because
tests/kernel is where root-only tests run (skipped with a reason when not root, counted by
RSWAP_REQUIRE_KERNEL=1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from rswap_ebpf.host.cache import resctrl
from rswap_ebpf.host.journal import Journal
from rswap_ebpf.server.control import ControlServer, raw_request
from tests.unit.server.test_control import Recorder
from tests.unit.host.test_fake_resctrl_process import REPO, digest, make
from tests.unit.host.test_restore_hardening import mounts, write_journal  # noqa: F401 (a fixture)


# -- from tests/unit/server/test_control.py -------------------------------------------------------------
def test_non_root_client_is_refused_even_when_the_file_mode_would_let_it_in():
    rec = Recorder()
    where = tempfile.mkdtemp(prefix="rswap-ctl-", dir="/tmp")
    os.chmod(where, 0o755)  # so that nobody can reach the socket at all
    srv = ControlServer(rec, path=os.path.join(where, "s.sock"))  # root only (the default)
    srv.start()
    try:
        os.chmod(srv.path, 0o666)  # only the peer check stands between nobody and rswap now
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                try:
                    reply = raw_request({"op": "echo"}, path=srv.path)
                except Exception as err:
                    reply = {"exception": repr(err)}
                os.write(w, json.dumps(reply).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            out = f.read()
        os.waitpid(pid, 0)
        assert json.loads(out) == {"ok": False, "error": "rswap's control socket serves root only"}
        assert not rec.calls
    finally:
        srv.close()
        os.rmdir(where)


# -- from tests/unit/host/test_fake_resctrl_process.py ------------------------------------------------
def test_rswap_restore_in_a_subprocess_undoes_groups_through_the_fake(tmp_path):
    fake = make(tmp_path, pids=(1, 100, 101))
    baseline = digest(fake.root)
    state = tmp_path / "state"
    journal = Journal(str(state / "journal.jsonl"))
    enf = resctrl.ResctrlEnforcer(journal, root=fake.root, fs=fake)
    enf.open({"web": "critical", "batch": "batch"}, mount=False)
    enf.apply(ways={"web": 4, "batch": 2}, percent={"web": 60, "batch": 20})
    journal.close()
    fake.close()
    assert digest(fake.root) != baseline
    env = {**os.environ, "RSWAP_STATE_DIR": str(state), "RSWAP_RUN_DIR": str(tmp_path / "run"),
           "RSWAP_RESCTRL_ROOT": fake.root, "RSWAP_FAKE_RESCTRL_STATE": fake.state_file,
           "RSWAP_PIN_DIR": str(tmp_path / "pins"),
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "tests.fakes.rswap_fake_resctrl", "restore"],
                       env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert digest(fake.root) == baseline


# -- from tests/unit/host/test_restore_hardening.py ---------------------------------------------------
def test_rswap_restore_reports_refused_entries_and_exits_1(tmp_path, mounts):
    cg, outside = mounts
    quota = cg / "cpu" / "web" / "cpu.cfs_quota_us"
    state = tmp_path / "state"
    write_journal(str(state / "journal.jsonl"),
                  [{"op": "write", "path": str(quota), "original": "50000\n"},
                   {"op": "write", "path": str(outside / "victim"), "original": "pwned"}])
    env = {**os.environ, "RSWAP_STATE_DIR": str(state), "RSWAP_RUN_DIR": str(tmp_path / "run")}
    r = subprocess.run([sys.executable, "-m", "rswap_ebpf.cli.main", "restore"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "refused" in r.stderr and "victim" in r.stderr
    assert "Traceback" not in r.stderr
    assert quota.read_text() == "50000\n"
    assert (outside / "victim").read_text() == "precious\n"
