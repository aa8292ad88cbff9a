"""The ``rswap`` command."""
from rswap_ebpf.cli.main import main

__all__ = ["main"]
