"""Where an array's elements lie in memory: their byte range, and whether they overlap each other.

Writes need both facts before a byte moves. A destination that overlaps a pool's own arena would write
over chunks that other owners hold (a cache would later return another prompt's bytes), and a
destination whose elements overlap themselves (a torch ``expand``, a numpy ``as_strided`` with a zero
stride) cannot hold distinct values at all: filled anyway, it reads back as garbage. The adapters
describe their arrays (:meth:`~lmcache.registry.FrameworkAdapter.memory_extent`); the arithmetic is
here, framework-neutral.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryExtent:
    """The bytes an array's elements occupy.

    Attributes:
        device: ``"cpu"`` for host memory, else the framework's device name (``"cuda:0"``).
        start: address of the lowest byte of any element.
        stop: one past the highest byte of any element (``start`` for an empty array).
        self_overlapping: whether two elements may share memory, so that a write to one changes
            another. Conservative: a layout that interleaves dims in an unusual way counts as
            overlapping even when it is not.
    """

    device: str
    start: int
    stop: int
    self_overlapping: bool

    def overlaps(self, other: MemoryExtent) -> bool:
        """Whether the two byte ranges share a byte on the same device."""
        return (
            self.start < other.stop
            and other.start < self.stop
            and device_key(self.device) == device_key(other.device)
        )

    def within(self, start: int, stop: int) -> bool:
        """Whether every byte lies in ``[start, stop)``."""
        return start <= self.start and self.stop <= stop


def device_key(name: str) -> str:
    """One name per device whatever the framework calls it: JAX's ``gpu:0`` is torch's ``cuda:0``."""
    platform, _, index = name.partition(":")
    return f"cuda:{index or 0}" if platform in ("gpu", "cuda") else name


def strided_extent(
    device: str, address: int, shape: Sequence[int], strides: Sequence[int], itemsize: int
) -> MemoryExtent:
    """The extent of a strided array: ``strides`` in bytes (negative allowed), ``address`` of element 0.

    Self-overlap: the dims of more than one element, ordered by stride, must each step past everything
    the smaller dims cover; otherwise two index tuples may reach one address (a zero stride always does).
    """
    if any(size == 0 for size in shape):
        return MemoryExtent(device, address, address, False)
    low = high = 0
    dims = []
    for size, stride in zip(shape, strides, strict=True):
        if size > 1:
            reach = stride * (size - 1)
            if reach < 0:
                low += reach
            else:
                high += reach
            dims.append((abs(stride), size))
    covered = itemsize
    overlapping = False
    for stride, size in sorted(dims):
        if stride < covered:
            overlapping = True
            break
        covered = stride * (size - 1) + covered
    return MemoryExtent(device, address + low, address + high + itemsize, overlapping)


def first_overlap(extents: Sequence[MemoryExtent | None]) -> tuple[int, int] | None:
    """Return the indices (in order) of two extents that share memory, or None (None entries are skipped).

    Sorted by device and start address, any overlap shows between neighbours: ``O(n log n)`` for ``n``.
    """
    known = sorted(
        (device_key(extent.device), extent.start, index, extent)
        for index, extent in enumerate(extents)
        if extent is not None
    )
    for (_, _, first, before), (_, _, second, after) in itertools.pairwise(known):
        if before.overlaps(after):
            return min(first, second), max(first, second)
    return None


__all__ = ["MemoryExtent", "device_key", "first_overlap", "strided_extent"]
