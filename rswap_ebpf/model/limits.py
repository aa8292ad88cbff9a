"""What a task may hold of a resource, and in which tier it is served: plain data, no I/O."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from rswap_ebpf.errors import ConfigError


class Priority(enum.IntEnum):
    """Lower value = served first."""

    CRITICAL = 0
    NORMAL = 1
    BATCH = 2

    @classmethod
    def parse(cls, text: object, field_name: str = "priority") -> Priority:
        if isinstance(text, Priority):
            return text
        try:
            return cls[str(text).strip().upper()]
        except KeyError:
            raise ConfigError(field_name, f"{text!r} is not a priority "
                                          "(critical, normal or batch)") from None


@dataclass(frozen=True)
class Limits:
    min_units: int = 0
    max_units: int | None = None

    def clamp(self, units: int) -> int:
        if self.max_units is not None:
            units = min(units, self.max_units)
        return max(units, self.min_units)
