"""The batching queue: requests that arrive together share one generate call.

Requests wait in a bounded queue. A single worker takes the oldest waiting job and the waiting jobs
with the same decoding settings (`Settings.key`), up to `max_batch_size`; when the model is idle it
first waits up to `max_wait_s` for more to arrive. While a batch runs, new requests queue up and form
the next batch, so under load batches fill by themselves. A job that must run alone (a stream, a
seeded sample) is a batch of one. The model runs in one dedicated thread, so the event loop keeps
accepting and rejecting requests while it works.

`submit` refuses (QueueFull) when the queue holds `max_queue` jobs: the server answers 429 with a
Retry-After estimated from recent batch times, and memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from rtune.serve.engine import Job

logger = logging.getLogger("rtune.serve")


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} requests are waiting")
        self.waiting, self.retry_after = waiting, retry_after


class Batcher:
    def __init__(self, run_batch, *, max_batch_size: int = 16, max_wait_s: float = 0.01, max_queue: int = 64):
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_s >= 0")
        self.run_batch = run_batch
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.pending: list[Job] = []
        self.batch_sizes: Counter = Counter()  # batch size -> how many batches ran with it
        self.busy = False
        self._batch_seconds = 0.0  # moving average, for Retry-After
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtune-model")
        self._task = asyncio.create_task(self._run(), name="rtune-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self.pending:
            job.cancelled = True
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self.pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the client side --------------------------------------------------------------------------
    @property
    def batches(self) -> int:
        return sum(self.batch_sizes.values())

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the batches ahead of a new request times a batch's time."""
        ahead = len(self.pending) / self.max_batch_size + 1
        return max(1, min(60, math.ceil(ahead * self._batch_seconds)))

    def submit(self, jobs: list[Job]) -> list[asyncio.Future]:
        """Queue jobs (all or none); their futures resolve to Results."""
        if self._loop is None:
            raise RuntimeError("the batcher is not running")
        if len(self.pending) + len(jobs) > self.max_queue:
            raise QueueFull(len(self.pending), self.retry_after())
        now = self._loop.time()
        for job in jobs:
            job.future = self._loop.create_future()
            job.arrived = now
            self.pending.append(job)
        self._arrived.set()
        return [job.future for job in jobs]

    # -- the worker -------------------------------------------------------------------------------
    def _same(self, head: Job) -> list[Job]:
        if head.alone:
            return [head]
        return [j for j in self.pending if not j.alone and j.settings.key == head.settings.key][: self.max_batch_size]

    async def _next_batch(self) -> list[Job]:
        while True:
            self.pending = [j for j in self.pending if not (j.cancelled or j.future.done())]
            if self.pending:
                break
            self._arrived.clear()
            await self._arrived.wait()
        head = self.pending[0]
        deadline = head.arrived + self.max_wait_s
        while not head.alone and len(self._same(head)) < self.max_batch_size:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        batch = [j for j in self._same(head) if not (j.cancelled or j.future.done())] or [head]
        taken = set(map(id, batch))
        self.pending = [j for j in self.pending if id(j) not in taken]
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if all(j.cancelled for j in batch):
                continue
            start = time.perf_counter()
            self.busy = True
            try:
                results = await self._loop.run_in_executor(self._executor, self.run_batch, batch)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - each request answers with the error; the worker goes on
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
            else:
                for job, result in zip(batch, results):
                    if not job.future.done():
                        job.future.set_result(result)
            finally:
                self.busy = False
            seconds = time.perf_counter() - start
            self._batch_seconds = seconds if not self._batch_seconds else 0.8 * self._batch_seconds + 0.2 * seconds
            self.batch_sizes[len(batch)] += 1
            logger.debug("batch of %d in %.3f s", len(batch), seconds)
