"""The errors rswap raises: one base class, a few subclasses that name what they are about.

OS errors are translated once, where the kernel is touched, with ``raise ... from err``; the CLI
prints ``str(error)`` as one line and exits 2 for bad input, 1 for everything else.
"""
from __future__ import annotations


class RswapError(Exception):
    """Base class of every error rswap raises on purpose."""

    exit_status = 1


class ConfigError(RswapError):
    """Bad input: configuration, command-line value or request. Nothing was applied."""

    exit_status = 2

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class ResourceError(RswapError):
    """A pool operation that would break the pool's invariants (nothing was changed)."""

    exit_status = 2


class FeatureMissing(RswapError):
    """A kernel or hardware feature rswap needs is not there; the message says how to get it."""

    def __init__(self, feature: str, why: str, fix: str = ""):
        self.feature = feature
        self.why = why
        self.fix = fix
        text = f"{feature} is missing: {why}"
        if fix:
            text += f" ({fix})"
        super().__init__(text)


class EnforceError(RswapError):
    """A write to the kernel failed; carries the path so the operator can look at it."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


class JournalError(RswapError):
    """The journal could not be written or read; nothing is changed without a journal entry."""


class AlreadyRunning(RswapError):
    """Another rswap daemon holds the lock."""


class UnsafeStateError(RswapError):
    """State (journal, profiles) in a place others than root can change: refused, with the fix.

    rswap acts as root on what its state files say, so, like sshd's ``StrictModes``, it uses
    them only where no one else could have written them.
    """

    def __init__(self, path: str, why: str, fix: str):
        self.path = path
        self.fix = fix
        super().__init__(f"{path}: {why}; rswap uses state only where no one but root can "
                         f"change it (fix: {fix})")
