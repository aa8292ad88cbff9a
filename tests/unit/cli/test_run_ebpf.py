"""``rswap run --ebpf`` prints every BPF program the configuration's drivers load."""
from __future__ import annotations

import re

from rswap_ebpf.cli.main import main
from rswap_ebpf.host.registry import BPF_PROGRAMS, bpf_programs
from rswap_ebpf.model.resources import ResourceId, ResourceType


def _banners(capsys) -> list[str]:
    return re.findall(r"^/\* ===== bpf/(\S+) ===== \*/$", capsys.readouterr().out, re.M)


def test_a_cpu_and_net_configuration_prints_both_programs_and_the_header(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[task]]\nname = "web"\ncommand = ["true"]\ncpu = { min = 100 }\n'
                   'net = { min = 1000, interface = "lo" }\n')
    assert main(["run", "--ebpf", "--config", str(cfg)]) == 0
    assert _banners(capsys) == ["rswap.h", "cpu.bpf.c", "runq.bpf.c", "net.bpf.c"]


def test_without_limits_only_the_cpu_program(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[task]]\nname = "web"\ncommand = ["true"]\n')
    assert main(["run", "--ebpf", "--config", str(cfg)]) == 0
    assert _banners(capsys) == ["rswap.h", "cpu.bpf.c", "runq.bpf.c"]


def test_every_program_named_ships_and_each_is_printed_once():
    from rswap_ebpf.host.bpf import bpf_source_dir

    names = [p for progs in BPF_PROGRAMS.values() for p in progs]
    assert all((bpf_source_dir() / n).is_file() for n in names)
    assert sorted(names) == sorted(p.name for p in bpf_source_dir().glob("*.bpf.c"))
    fpga = ResourceId(ResourceType.SPECIALIZED_COPROC, "fpga0")
    assert bpf_programs({*ResourceType, fpga}) == ["cpu.bpf.c", "runq.bpf.c", "pmu.bpf.c", "net.bpf.c",
                                                    "block.bpf.c"]
    assert bpf_programs({ResourceType.GPU_MEMORY}) == []
