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


def _runs(mask: int, n: int) -> list[tuple[int, int]]:
    """The runs of consecutive 1-bits of ``mask`` below bit ``n``, as (first bit, end bit)."""
    out, bit = [], 0
    while bit < n:
        if mask >> bit & 1:
            first = bit
            while bit < n and mask >> bit & 1:
                bit += 1
            out.append((first, bit))
        else:
            bit += 1
    return out


def exclusive_region(info: ResctrlInfo) -> tuple[int, int]:
    """The ways rswap may give a group for itself: the longest run of ``cbm_mask`` bits outside
    ``shareable_bits`` (ways other agents, e.g. I/O or a GPU, may fill regardless of masks:
    resctrl.rst, "shareable_bits"), as (first bit, end bit)."""
    runs = _runs(info.cbm_mask & ~info.shareable_bits, info.cbm_len)
    if not runs:
        return 0, 0
    return max(runs, key=lambda r: (r[1] - r[0], -r[0]))


def _contiguous(mask: int) -> bool:
    return mask != 0 and len(_runs(mask, mask.bit_length())) == 1


def layout_masks(info: ResctrlInfo, ways: Mapping[str, int], tiers: Mapping[str, str],
                 default_group: str | None = None) -> dict[str, int]:
    """One contiguous cache mask per group from its ways, as described in the module docstring.

    ``tiers``: group -> "critical" | "normal" | "batch".  ``default_group``: also give that group
    (the root, when isolating it) the unallocated ways.  Allocations larger than the hardware are
    refused, never silently truncated.  Masks of their own stay inside :func:`exclusive_region`,
    so no ``shareable_bits`` way is ever a task's alone; the shared (leftover) mask takes the
    shareable ways too where the result is still a legal mask.
    """
    lo, hi = exclusive_region(info)
    n = hi - lo
    wanted = {g: max(0, int(w)) for g, w in ways.items()}
    exclusive = {g: w for g, w in wanted.items() if w >= max(1, info.min_cbm_bits)}
    if sum(exclusive.values()) > n:
        raise RswapError(f"resctrl: {sum(exclusive.values())} ways asked, the cache has {n} "
                         f"outside shareable_bits {info.shareable_bits:x}")
    masks: dict[str, int] = {}
    low = lo
    for tier in ("critical", "normal"):
        for g in sorted(x for x in exclusive if tiers.get(x) == tier):
            masks[g] = contiguous_mask(low, exclusive[g])
            low += exclusive[g]
    high = hi
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
        start = low if high < hi else max(lo, high - need)
        leftover = contiguous_mask(max(lo, min(start, hi - need)), need)
        log.warning("resctrl: %d unallocated way(s) < min_cbm_bits %d: groups below the minimum "
                    "share mask %x", free, need, leftover)
    shared = leftover | info.shareable_bits
    if info.shareable_bits and (info.sparse_masks or _contiguous(shared)):
        leftover = shared
    for g in wanted:
        if g not in masks:
            masks[g] = leftover
    if default_group is not None:
        masks[default_group] = leftover
    return masks


def check_mask(info: ResctrlInfo, mask: int) -> None:
    """The checks ``cbm_validate()`` makes, so a bad plan fails here, with a reason: in range,
    consecutive unless ``sparse_masks``, and a first run of at least ``min_cbm_bits`` bits (0
    allows an empty mask, as on AMD)."""
    if mask == 0 and info.min_cbm_bits > 0 or mask & ~info.cbm_mask:
        raise RswapError(f"resctrl: mask {mask:x} out of range (cbm_mask {info.cbm_mask:x})")
    if mask == 0:
        return
    runs = _runs(mask, info.cbm_len)
    if not info.sparse_masks and len(runs) > 1:
        raise RswapError(f"resctrl: mask {mask:x} has non-consecutive 1-bits")
    if runs[0][1] - runs[0][0] < info.min_cbm_bits:
        raise RswapError(f"resctrl: mask {mask:x} has fewer than {info.min_cbm_bits} bits")
