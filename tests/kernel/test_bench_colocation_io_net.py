"""tools/bench_colocation_io_net.py's setup and cleanup on this kernel: the loop device, the two
namespaces and each regime's qdiscs, the blkio groups; everything gone after, also when the body
raises.  No load is run (that is the benchmark's job)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
bench = pytest.importorskip("bench_colocation_io_net")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, netns)")


class Boom(Exception):
    pass


def _run(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True).stdout


def test_storage_makes_a_direct_io_loop_device_and_removes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "IMAGE_MIB", 8)
    with pytest.raises(Boom):
        with bench.Storage(str(tmp_path)) as st:
            dev, image = st.dev, st.image
            assert os.path.exists(image) and os.path.getsize(image) == 8 << 20
            with open(f"/sys/block/{st.name}/loop/dio") as f:
                assert f.read().strip() == "1"
            assert "[" in st.scheduler()
            raise Boom
    assert image not in _run("losetup", "-a")
    assert not os.path.exists(image)
    assert dev not in _run("losetup", "-a", "-O", "NAME")


def test_network_regimes_build_their_qdiscs_and_the_namespaces_go(tmp_path):
    with pytest.raises(Boom):
        with bench.Network() as net:
            a, b = net.a, net.b
            assert {a, b} <= set(_run("ip", "netns", "list").split())
            for mode in ("none", "prio"):
                note = net.link(mode, 100)
                q = net.qdiscs()
                assert "qdisc htb 1: root" in q
                if mode == "none":
                    assert "pfifo" in q
                elif net.has_qdisc("prio"):
                    assert "qdisc prio 10:" in q and not note
                else:  # strict priority from HTB classes, said
                    classes = _run("ip", "netns", "exec", a, "tc", "class", "show", "dev", "va")
                    assert "1:10" in classes and "prio 0" in classes and note
                net.clear()
                assert "htb" not in net.qdiscs()
            assert net.link("rswap", 100) == "" and "htb" not in net.qdiscs()
            raise Boom
    names = _run("ip", "netns", "list").split()
    assert a not in names and b not in names


def test_weight_groups_say_what_they_wrote_and_are_removed():
    dirs: list[str] = []
    try:
        groups, note = bench.weight_groups(f"rsbtest{os.getpid()}", True, dirs)
        assert set(groups) == {"critical", "batch"} and all(os.path.isdir(d) for d in dirs)
        for d, weight in ((groups["critical"], "1000"), (groups["batch"], "10")):
            files = [f for f in ("blkio.bfq.weight", "blkio.weight", "io.bfq.weight", "io.weight")
                     if os.path.exists(os.path.join(d, f))]
            if files:
                with open(os.path.join(d, files[0])) as f:
                    assert f.read().split()[-1] == weight
            else:
                assert "absent" in note
    finally:
        bench.remove_dirs(dirs)
    assert not any(os.path.exists(d) for d in dirs)
