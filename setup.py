"""Packaging beyond what pyproject.toml can say: the BPF C sources live in the top-level
``bpf/`` (beside the Python, as bcc tools keep them) and ship inside the wheel as
``rswap_ebpf/bpf/``, where :func:`rswap_ebpf.host.bpf.bpf_source_dir` finds them when rswap
is installed rather than run from a checkout."""
from setuptools import find_namespace_packages, setup

setup(
    packages=find_namespace_packages(include=["rswap_ebpf*"], exclude=["*.__pycache__"])
    + ["rswap_ebpf.bpf"],
    package_dir={"rswap_ebpf.bpf": "bpf"},
    package_data={"rswap_ebpf.data": ["*.toml", "*.service"],
                  "rswap_ebpf.bpf": ["*.bpf.c", "*.h"]},
)
