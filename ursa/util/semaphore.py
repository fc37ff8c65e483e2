"""A weighted semaphore for asyncio: work runs together only while the weights it holds fit a total.

Used to bound memory by what is decoded at once, not by a count of threads: downloads weigh each
decode by its bytes (``acquire.fetch.MemoryBudget``), ``ursa serve`` by its pixels
(``apps.serve.limits.PixelBudget``). One home for both, so the rules cannot drift apart:

- work that fits starts at once (no queue to stand in, so a small one never waits behind a big one);
- one larger than the whole total still runs, alone, when nothing else holds any;
- a waiter that is cancelled leaves nothing behind (granted, then cancelled: given back).

Used from one event loop only, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator


class WeightedSemaphore:
    """Hold weights up to ``total`` at once; ``acquire``/``release``, or ``async with sem.hold(weight)``."""

    def __init__(self, total: int) -> None:
        self.total, self.used = max(1, int(total)), 0
        self.waiters: list[tuple[int, asyncio.Future]] = []

    def fits(self, weight: int) -> bool:
        """Whether weight more may start now."""
        return self.used == 0 or self.used + weight <= self.total

    async def acquire(self, weight: int) -> None:
        """Wait until weight more fits in the total, then take it."""
        weight = max(0, weight)
        if self.fits(weight):
            self.used += weight
            return
        fut = asyncio.get_running_loop().create_future()
        entry = (weight, fut)
        self.waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if entry in self.waiters:
                self.waiters.remove(entry)
            elif fut.done() and not fut.cancelled():  # granted, then cancelled before use: give it back
                self.release(weight)
            raise

    def release(self, weight: int) -> None:
        """Give weight back and start whoever now fits, oldest first."""
        self.used = max(0, self.used - max(0, weight))
        for entry in list(self.waiters):
            n, fut = entry
            if fut.done():
                self.waiters.remove(entry)
            elif self.fits(n):
                self.waiters.remove(entry)
                self.used += n
                fut.set_result(None)

    @contextlib.asynccontextmanager
    async def hold(self, weight: int) -> AsyncIterator[None]:
        """Hold weight for the block (waiting until it fits)."""
        weight = max(0, weight)
        await self.acquire(weight)
        try:
            yield
        finally:
            self.release(weight)
