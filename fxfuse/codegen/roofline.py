"""The memory floor of a bandwidth-bound call: the bytes it must read over the bandwidth this machine reads at.

A decode step reads every weight once and does little arithmetic per byte,
so no kernel can run it faster than its bytes over the memory's read
bandwidth. :func:`read_bandwidth` measures that bandwidth the way a user
would check it (a ``torch.sum`` over a buffer far larger than the caches, at
the current intra-op thread count); :class:`Floor` puts a measured time next
to it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from fxfuse.cpu_kernels.arena import huge_page_buffer

# Far larger than any CPU's last-level cache (the project's CPUs have 32-96 MiB of L3).
BUFFER_BYTES = 256 * 2**20
_MEASURED: dict[int, float] = {}


def read_bandwidth(repeats: int = 7, fresh: bool = False) -> float:
    """Bytes per second that a ``torch.sum`` over a 256 MiB float32 buffer (on huge pages where the OS gives
    them) reads, median of ``repeats`` calls,
    at the current ``torch.get_num_threads()``; measured once per thread count and process (``fresh`` to
    measure again). About half a second."""
    threads = torch.get_num_threads()
    if fresh or threads not in _MEASURED:
        buffer = huge_page_buffer(BUFFER_BYTES).view(torch.float32).fill_(1.0)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            buffer.sum()
            seconds.append(time.perf_counter() - start)
        _MEASURED[threads] = BUFFER_BYTES / statistics.median(seconds)
    return _MEASURED[threads]


@dataclass
class Floor:
    """A call's time beside its memory floor: ``bytes_read`` over ``bandwidth`` (bytes per second)."""

    seconds: float
    bytes_read: int
    bandwidth: float
    threads: int

    @property
    def floor_seconds(self) -> float:
        return self.bytes_read / self.bandwidth

    @property
    def ratio(self) -> float:
        """The call's time over the floor: 1.0 is as fast as memory allows."""
        return self.seconds / self.floor_seconds

    def __str__(self) -> str:
        return (f"{self.seconds * 1e3:.2f} ms reading {self.bytes_read / 2**20:.0f} MiB; the machine reads "
                f"{self.bandwidth / 1e9:.1f} GB/s (torch.sum over 256 MiB, {self.threads} threads), a floor of "
                f"{self.floor_seconds * 1e3:.2f} ms: {self.ratio:.2f}x the floor")
