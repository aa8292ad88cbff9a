"""Cache masks: one contiguous block of ways per group, laid out by priority tier."""
from __future__ import annotations

import logging
from collections.abc import Mapping

from rswap_ebpf.errors import RswapError
from rswap_ebpf.host.cache.resctrlfs import ResctrlInfo

log = logging.getLogger(__name__)


# -- cache masks ------------------------------------------------------------------------------

def contiguous_mask(first_bit: int, nbits: int) -> int:
    return ((1 << nbits) - 1) << first_bit if nbits > 0 else 0


def layout_masks(info: ResctrlInfo, ways: Mapping[str, int], tiers: Mapping[str, str],
                 default_group: str | None = None) -> dict[str, int]:
    """One contiguous cache mask per group from its ways, as described in the module docstring.

    ``tiers``: group -> "critical" | "normal" | "batch".  ``default_group``: also give that group
    (the root, when isolating it) the unallocated ways.  Allocations larger than the hardware are
    refused, never silently truncated.
    """
    n = info.cbm_len
    wanted = {g: max(0, int(w)) for g, w in ways.items()}
    exclusive = {g: w for g, w in wanted.items() if w >= max(1, info.min_cbm_bits)}
    if sum(exclusive.values()) > n:
        raise RswapError(f"resctrl: {sum(exclusive.values())} ways asked, the cache has {n}")
    masks: dict[str, int] = {}
    low = 0
    for tier in ("critical", "normal"):
        for g in sorted(x for x in exclusive if tiers.get(x) == tier):
            masks[g] = contiguous_mask(low, exclusive[g])
            low += exclusive[g]
    high = n
    for g in sorted(x for x in exclusive if tiers.get(x) not in ("critical", "normal")):
        high -= exclusive[g]
        masks[g] = contiguous_mask(high, exclusive[g])
    free = high - low
    need = max(1, info.min_cbm_bits)
    if free >= need:
        leftover = contiguous_mask(low, free)
    else:
        # Too few unallocated ways for a legal mask: widen the gap into the batch ways above it
        # (or, with no batch group, into the ways below it), so critical ways are shared last.
        start = low if high < n else max(0, high - need)
        leftover = contiguous_mask(min(start, n - need), need)
        log.warning("resctrl: %d unallocated way(s) < min_cbm_bits %d: groups below the minimum "
                    "share mask %x", free, need, leftover)
    for g in wanted:
        if g not in masks:
            masks[g] = leftover
    if default_group is not None:
        masks[default_group] = leftover
    return masks


def check_mask(info: ResctrlInfo, mask: int) -> None:
    """The checks ``cbm_validate()`` makes, so a bad plan fails here, with a reason."""
    if mask == 0 and info.min_cbm_bits > 0 or mask & ~info.cbm_mask:
        raise RswapError(f"resctrl: mask {mask:x} out of range (cbm_mask {info.cbm_mask:x})")
    bits = bin(mask).count("1")
    low = (mask & -mask).bit_length() - 1
    if not info.sparse_masks and mask >> low != (1 << bits) - 1:
        raise RswapError(f"resctrl: mask {mask:x} has non-consecutive 1-bits")
    if bits < info.min_cbm_bits:
        raise RswapError(f"resctrl: mask {mask:x} has fewer than {info.min_cbm_bits} bits")
