"""The wheel a user or a container image installs carries the BPF sources: built, installed
outside the checkout, and ``rswap doctor`` and a short ``rswap run`` work from ``/``."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BPF_FILES = sorted(p.name for p in (REPO / "bpf").iterdir() if p.suffix in (".c", ".h"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout (no dependencies: those are the venv's), unpacked
    into a directory of its own with pip; (site dir, wheel)."""
    base = tmp_path_factory.mktemp("wheel")
    # from a clean copy: an earlier build/ in the checkout would be packed as it is
    src = base / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "--disable-pip-version-check", "-w", str(base / "dist"), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (base / "dist").glob("rswap_ebpf-*.whl")
    site = base / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--disable-pip-version-check", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    return site, wheel


def _installed_rswap(site, *args, env=None, timeout=120):
    """``rswap ARGS`` from ``/`` with the installed package first on the path (the checkout
    is not on it: cwd is /, and RSWAP_BPF_SRC is unset)."""
    full = {k: v for k, v in os.environ.items() if k not in ("RSWAP_BPF_SRC", "PYTHONPATH")}
    full.update(env or {})
    full["PYTHONPATH"] = str(site)
    code = "import sys; from rswap_ebpf.cli.main import main; sys.argv[0] = 'rswap'; " \
           "sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd="/", env=full, timeout=timeout)


def test_the_wheel_ships_the_bpf_sources_and_header(installed):
    site, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "rswap.h" in BPF_FILES and "cpu.bpf.c" in BPF_FILES
    for f in BPF_FILES:
        assert f"rswap_ebpf/bpf/{f}" in names, names
    shipped = _installed_rswap(site, "default-config", "--unit")  # package data: the unit
    assert shipped.returncode == 0 and "[Service]" in shipped.stdout, shipped.stderr
    probe = subprocess.run(
        [sys.executable, "-c", "import rswap_ebpf; from rswap_ebpf.host.bpf import "
         "bpf_source_dir; print(rswap_ebpf.__file__); print(bpf_source_dir())"],
        capture_output=True, text=True, cwd="/", timeout=60,
        env={**{k: v for k, v in os.environ.items() if k != "RSWAP_BPF_SRC"},
             "PYTHONPATH": str(site)})
    pkg, src = probe.stdout.split()
    assert pkg.startswith(str(site)) and src == str(site / "rswap_ebpf" / "bpf"), probe


def test_installed_doctor_and_a_short_run_work_from_root_dir(installed, tmp_path, rswap_env,
                                                             unique_name):
    site, _ = installed
    env = {**rswap_env, "RSWAP_PIN_DIR": f"/sys/fs/bpf/test-{unique_name}"}
    doc = _installed_rswap(site, "doctor", env=env)
    assert doc.returncode == 0, doc.stdout + doc.stderr
    assert "BPF program load" in doc.stdout
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\ninterval = 0.3\n[[task]]\nname = "w-{unique_name}"\n'
                   'command = ["sleep", "30"]\ncpu = { max = 300 }\n')
    run = _installed_rswap(site, "run", "--config", str(cfg), "--count", "2", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert not os.path.exists(env["RSWAP_PIN_DIR"])
