"""Threads for `ursa serve`: decoding in a small pool, every forward on one inference thread, in micro-batches.

The event loop never runs a forward pass: requests wait on futures while the inference thread
works, and those that arrive meanwhile are run together as the next batch. Nothing here knows
what an image is (numpy arrays on ONNX Runtime, tensors on torch), and torch is never imported.
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ursa.inference.results import Prediction


def set_torch_threads(n: int) -> None:
    """Fix this thread's torch (OpenMP) thread count, when torch is loaded at all (the ONNX path never imports it).

    Each thread that runs torch ops gets its own OpenMP team. Preprocessing ops are small, and
    with 2 threads on a busy 2-core machine they took ~40 ms instead of ~1 ms (a thread waiting
    at a barrier for a descheduled partner), so decode threads use 1 and the inference thread
    uses --threads. get_num_threads() first: torch initialises a thread's count lazily from a
    process-wide value on its first op, which would otherwise overwrite what is set here.
    """
    torch = sys.modules.get("torch")  # never imported here: a slim install has none, and ONNX needs none
    if torch is None:
        return
    torch.get_num_threads()
    torch.set_num_threads(n)


class ThreadPool:
    """A ThreadPoolExecutor made on first use (and again after shutdown) with a torch thread count."""

    def __init__(self, workers: int, torch_threads: int, name: str) -> None:
        self.workers, self.torch_threads, self.name = workers, torch_threads, name
        self._pool: ThreadPoolExecutor | None = None

    def get(self) -> ThreadPoolExecutor:
        """The executor, created when needed."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name,
                                            initializer=set_torch_threads, initargs=(self.torch_threads,))
        return self._pool

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on this pool, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.get(), fn, *args)

    def shutdown(self) -> None:
        """Stop the threads; queued work is dropped, running work finishes."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class MicroBatcher:
    """Groups concurrent requests into one forward pass; one inference thread, never the event loop.

    While a forward runs, new requests queue; the next forward takes up to ``max_batch`` of them
    at once. With ``wait_ms`` > 0 the first request of an idle server also waits that long for
    company. ``max_batch`` = 1 turns batching off. docs/serve.md records what this buys on 2 cores.
    """

    def __init__(self, run: Callable[[list[Any]], list[Prediction]], max_batch: int = 16,
                 wait_ms: float = 0.0, pool: ThreadPool | None = None) -> None:
        self.run, self.max_batch, self.wait_s = run, max(1, max_batch), max(0.0, wait_ms) / 1000
        self.pool = pool or ThreadPool(1, 1, "ursa-infer")
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._draining = False
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.items = 0

    async def submit(self, x: Any) -> Prediction:
        """The prediction for one preprocessed image, computed in some batch."""
        loop = asyncio.get_running_loop()
        if self.max_batch == 1:
            self.batches += 1
            self.items += 1
            return (await self.pool.run(self.run, [x]))[0]
        fut: asyncio.Future = loop.create_future()
        self._pending.append((x, fut))
        if not self._draining:
            self._draining = True
            self._task = loop.create_task(self._drain())  # referenced, so it is not garbage-collected
        return await fut

    async def _drain(self) -> None:
        """Run queued requests in batches until none are left (then stop: no task lives forever)."""
        try:
            while self._pending:
                if self.wait_s and len(self._pending) < self.max_batch:
                    await asyncio.sleep(self.wait_s)
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
                batch = [(x, f) for x, f in batch if not f.done()]  # the client may have gone
                if not batch:
                    continue
                try:
                    results = await self.pool.run(self.run, [x for x, _ in batch])
                except Exception as e:  # a bug, not client input: every waiter learns of it
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(e)
                    continue
                self.batches += 1
                self.items += len(batch)
                for (_, f), r in zip(batch, results):
                    if not f.done():
                        f.set_result(r)
        finally:
            self._draining = False

    def shutdown(self) -> None:
        """Stop the inference thread (made again on next use, e.g. by a second TestClient)."""
        self.pool.shutdown()
