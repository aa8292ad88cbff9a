"""rswap-ebpf: pool a host's resources and hand them to tasks before they become bottlenecks."""


def version() -> str:
    """The installed distribution's version (``0+unknown`` run from a checkout never installed)."""
    from importlib import metadata

    try:
        return metadata.version("rswap-ebpf")
    except metadata.PackageNotFoundError:
        return "0+unknown"
