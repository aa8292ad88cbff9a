"""What --help and --version say: options that exist, and no sudo (a root shell has none)."""
from __future__ import annotations

import re

import pytest

from rswap_ebpf import version
from rswap_ebpf.cli.main import build_parser
from tests.conftest import run_rswap


def _subparsers(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


HELPS = [("", build_parser())] + list(_subparsers(build_parser()))


@pytest.mark.parametrize("name,parser", HELPS, ids=[n or "rswap" for n, _ in HELPS])
def test_help_never_says_sudo(name, parser):
    assert "sudo" not in parser.format_help(), name


def test_every_rswap_run_option_a_help_text_names_exists():
    run = dict(HELPS)["run"]
    options = {o for a in run._actions for o in a.option_strings}
    for name, parser in HELPS:
        for opt in re.findall(r"rswap run ((?:--[a-z-]+ ?)+)", parser.format_help()):
            for o in opt.split():
                assert o in options, f"{name or 'rswap'} --help names rswap run {o}"
    assert "--history" in dict(HELPS)["plot"].format_help()


def test_version():
    r = run_rswap("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"rswap {version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", version())
