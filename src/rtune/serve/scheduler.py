"""Iteration-level scheduling ("continuous batching"): one running batch, stepped one token at a time.

One Scheduler drives one Engine on its own model thread (a server with several models runs one
per set of weights: names that share weights under other templates, such as base and base+urial-r,
share its batch, each job ending at its own template's stops, `Job.stops_from`). Each iteration of
its loop:

1. drops the rows and waiting jobs whose client went away (`Job.cancelled`);
2. admits waiting jobs while the batch has room (`max_batch_size` rows, the group's padded prompts
   within `PREFILL_GROUP_TOKENS`, at least one job) as a left-padded group, and feeds the group's
   prompts one chunk of at most `PREFILL_CHUNK_TOKENS` tokens per iteration, so a long prompt holds
   the running rows for one chunk at a time, not for its whole prefill; once fed, the group's first
   tokens are chosen and its KV cache merged into the running batch (rtune.serve.kvbatch);
3. steps the running batch once: one forward for all rows, each row's token chosen with its own
   settings (rtune.serve.sampling), its text checked for its own stop strings (rtune.serve.text)
   and, for a stream, the new text sent; finished rows leave the batch at once.

So requests with different max_tokens, temperatures and stop strings share the batch, new requests
join as others finish, and a stream is a row like any other. A job waits in a bounded queue
(`submit` raises QueueFull at `max_queue`: the server answers 429 with Retry-After). Results are
handed to the event loop with `call_soon_threadsafe`. The loop checks for a stop between steps and
the thread is a daemon, so a stop (SIGTERM) ends generation within one step; every job still
queued or running then fails with ShuttingDown (503).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

import torch

from rtune.serve.engine import Engine, Job
from rtune.serve.kvbatch import KVBatch
from rtune.serve.sampling import RowSampler
from rtune.serve.text import ReplyText, StopSet

logger = logging.getLogger("rtune.serve")

PREFILL_GROUP_TOKENS = 4096  # a group of new prompts, padded, at most (at least one prompt): little padding waste
PREFILL_CHUNK_TOKENS = 512  # prompt tokens fed per iteration (the running rows wait meanwhile)


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} requests are waiting")
        self.waiting, self.retry_after = waiting, retry_after


class ShuttingDown(Exception):
    def __init__(self):
        super().__init__("the server is shutting down")


@dataclass(eq=False)
class _Row:
    """A job in the running batch (model thread only)."""

    job: Job
    stops: StopSet
    stop_ids: frozenset
    sampler: RowSampler
    text: ReplyText | None  # None: nothing to match or stream
    ids: list  # generated so far; the last one is fed at the next step
    position: int  # the position id of ids[-1]
    started: float  # monotonic time of admission
    shown: int = 0  # characters of text already streamed


@dataclass(eq=False)
class _Filling:
    """A group of new jobs whose prompts are being fed, a chunk per iteration (model thread only)."""

    jobs: list[Job]
    ids: torch.Tensor  # [jobs, columns not fed yet], left-padded
    mask: torch.Tensor  # the same columns' attention mask
    positions: torch.Tensor  # and position ids
    kv: KVBatch | None = None  # the columns fed so far


class Scheduler:
    def __init__(self, engine: Engine, *, max_batch_size: int = 16, max_queue: int = 64, max_wait_s: float = 0.01):
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_s >= 0")
        self.engine = engine
        self.max_batch_size, self.max_queue, self.max_wait_s = max_batch_size, max_queue, max_wait_s
        self.stats: Counter = Counter()  # steps, mixed_steps, joined_running, finished, cancelled, failed
        self.step_rows: Counter = Counter()  # rows in a decode step -> how many steps had that many
        self._waiting: deque[Job] = deque()  # shared: under _lock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._rows: list[_Row] = []  # model thread only, as are _kv and _filling
        self._kv: KVBatch | None = None
        self._filling: _Filling | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._request_seconds = 0.0  # moving average of a request's time from admission, for Retry-After

    # -- lifecycle (event loop) -------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"rtune-model-{self.engine.name}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Stop after the current step (safe from any thread and from a signal handler)."""
        self._stopping.set()
        self._wake.set()

    async def stop(self, timeout: float = 5.0) -> None:
        self.request_stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
        with self._lock:  # a thread stuck in one long forward: its queue is answered from here
            left, self._waiting = list(self._waiting), deque()
        for job in left:
            self._settle(job, error=ShuttingDown())

    # -- the client side (event loop) -------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the batches ahead of a new request times a request's time."""
        ahead = self.queued / self.max_batch_size + 1
        return max(1, min(60, math.ceil(ahead * self._request_seconds)))

    def submit(self, jobs: list[Job]) -> list[asyncio.Future]:
        """Queue jobs (all or none); their futures resolve to Results."""
        if self._loop is None:
            raise RuntimeError("the scheduler is not running")
        if self._stopping.is_set():
            raise ShuttingDown()
        with self._lock:
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull(len(self._waiting), self.retry_after())
            for job in jobs:
                job.future = self._loop.create_future()
                job.arrived = time.monotonic()
                self._waiting.append(job)
        self._wake.set()
        return [job.future for job in jobs]

    def cancel(self, jobs: list[Job]) -> None:
        """The client went away: the jobs leave the queue now, the running batch at the next step."""
        with self._lock:
            for job in jobs:
                job.cancelled = True
            left = [j for j in self._waiting if j.cancelled]
            self._waiting = deque(j for j in self._waiting if not j.cancelled)
            self.stats["cancelled"] += len(left)
        for job in left:
            job.future.cancel()
        self._wake.set()

    def snapshot(self) -> dict:
        stats, rows = dict(self.stats), dict(self.step_rows)  # copies in one step: the model thread adds to them
        return {"queued": self.queued, "running": self.running, "steps": stats.get("steps", 0),
                "step_rows": {str(k): v for k, v in sorted(rows.items())},
                **{k: stats.get(k, 0) for k in ("mixed_steps", "joined_running", "finished", "cancelled", "failed")},
                "max_batch_size": self.max_batch_size, "max_queue": self.max_queue}

    # -- handing results to the event loop --------------------------------------------------------
    def _settle(self, job: Job, result=None, error: BaseException | None = None, cancel: bool = False) -> None:
        def settle():
            if job.future is not None and not job.future.done():
                if cancel:
                    job.future.cancel()
                elif error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(result)

        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop is closed: nobody is waiting
            pass

    # -- the model thread -------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping.is_set():
                self._wake.clear()
                self._drop_cancelled()
                if self._filling is None:
                    self._guarded(self._start_filling, self._admit())
                if self._filling is not None:
                    self._guarded(self._fill, self._filling.jobs)
                if self._rows:
                    self._guarded(self._step)
                elif self._filling is None:
                    self._wake.wait(0.5)
        self._fail_all(ShuttingDown())

    def _guarded(self, step, jobs: list[Job] | None = None) -> None:
        """Run a step; on an error its jobs (None: the running batch) fail and the loop goes on."""
        if jobs is not None and not jobs:
            return
        try:
            step() if jobs is None else step(jobs)
        except Exception as e:  # noqa: BLE001 - each request answers with the error; the server goes on
            logger.error("generation failed", exc_info=e)
            failed = jobs if jobs is not None else [r.job for r in self._rows]
            ids = set(map(id, failed))
            if self._filling is not None and any(id(j) in ids for j in self._filling.jobs):
                self._filling = None
            self._keep([r for r in self._rows if id(r.job) not in ids])
            for job in failed:
                self.stats["failed"] += 1
                self._settle(job, error=e)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            left, self._waiting = list(self._waiting), deque()
        filling = self._filling.jobs if self._filling is not None else []
        for job in [r.job for r in self._rows] + filling + left:
            self._settle(job, error=error)
        self._rows, self._kv, self._filling = [], None, None

    def _keep(self, rows: list[_Row]) -> None:
        """The running batch becomes `rows` (a subset of it, in order)."""
        if len(rows) == len(self._rows):
            return
        if not rows:
            self._rows, self._kv = [], None
            return
        index = {id(r): i for i, r in enumerate(self._rows)}
        self._kv.keep([index[id(r)] for r in rows])
        self._rows = rows

    def _drop_cancelled(self) -> None:
        gone = [r.job for r in self._rows if r.job.cancelled]
        if gone:
            self._keep([r for r in self._rows if not r.job.cancelled])
        filling = self._filling
        if filling is not None and any(j.cancelled for j in filling.jobs):
            keep = [i for i, j in enumerate(filling.jobs) if not j.cancelled]
            gone += [j for j in filling.jobs if j.cancelled]
            if not keep:
                self._filling = None
            else:
                index = torch.tensor(keep)
                filling.jobs = [filling.jobs[i] for i in keep]
                filling.ids, filling.mask = filling.ids[index], filling.mask[index]
                filling.positions = filling.positions[index]
                if filling.kv is not None:
                    filling.kv.keep(keep)
        with self._lock:  # cancel() counts too, from the event loop
            self.stats["cancelled"] += len(gone)
        for job in gone:
            self._settle(job, cancel=True)

    def _admit(self) -> list[Job]:
        """Waiting jobs that fit in the batch (oldest first); an idle model first waits max_wait_s for company."""
        if not self._rows and self._waiting and self.max_wait_s:
            wait = self._waiting[0].arrived + self.max_wait_s - time.monotonic()
            if wait > 0 and len(self._waiting) < self.max_batch_size:
                self._stopping.wait(wait)
        taken: list[Job] = []
        rows, width = len(self._rows), 0
        with self._lock:
            while self._waiting and len(taken) < self.max_batch_size:
                job = self._waiting[0]
                stays = job.settings.max_tokens > 1  # a job of 0 or 1 token ends at its prefill: it takes no row
                wider = max(width, len(job.prompt_ids))
                if stays and rows >= self.max_batch_size:
                    break
                if taken and wider * (len(taken) + 1) > PREFILL_GROUP_TOKENS:
                    break
                taken.append(self._waiting.popleft())
                rows, width = rows + stays, wider
        return taken

    def _start_filling(self, jobs: list[Job]) -> None:
        """The new jobs as a left-padded group to feed (a job of max_tokens 0 is answered at once)."""
        for job in [j for j in jobs if j.settings.max_tokens == 0]:  # the prompt's log-probs only
            self._finish_job(job, [], (job.stops_from or self.engine).stops(job.settings), time.monotonic())
        jobs = [j for j in jobs if j.settings.max_tokens > 0]
        if not jobs:
            return
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.engine.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):
            ids[i, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[i, width - len(job.prompt_ids) :] = 1
        self._filling = _Filling(jobs, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))

    def _fill(self, jobs: list[Job]) -> None:
        """Feed the filling group's next chunk; after its last, choose the first tokens and let the rows
        that go on join the running batch."""
        f = self._filling
        columns = max(1, PREFILL_CHUNK_TOKENS // len(jobs))
        ids, mask, positions = f.ids[:, :columns], f.mask[:, :columns], f.positions[:, :columns]
        f.ids, f.mask, f.positions = f.ids[:, columns:], f.mask[:, columns:], f.positions[:, columns:]
        device = self.engine.device
        if f.kv is None:
            f.kv = KVBatch(self.engine.new_cache(), mask.to(device))
        else:
            f.kv.mask = torch.cat([f.kv.mask, mask.to(device)], dim=1)
        logits = self.engine.forward(ids, f.kv.mask, positions, f.kv.cache)
        if f.ids.shape[1]:
            return  # more to feed at the next iteration
        self._filling = None
        rows = [self._new_row(job) for job in jobs]
        going = self._advance(rows, logits)
        if going:
            f.kv.keep([i for i, r in enumerate(rows) if r in going])
            if self._rows:
                self.stats["joined_running"] += len(going)
                self._kv.join(f.kv)
            else:
                self._kv = f.kv
            self._rows = self._rows + going

    def _new_row(self, job: Job) -> _Row:
        stops = (job.stops_from or self.engine).stops(job.settings)
        track = bool(stops.strings) or job.on_text is not None
        text = ReplyText(self.engine.decode_reply, stops.strings) if track else None
        return _Row(job, stops, frozenset(stops.all_ids), RowSampler(job.settings, self.engine.device), text,
                    ids=[], position=len(job.prompt_ids) - 1, started=time.monotonic())

    def _step(self) -> None:
        rows = self._rows
        input_ids = torch.tensor([[r.ids[-1]] for r in rows])
        positions = torch.tensor([[r.position] for r in rows])
        logits = self.engine.forward(input_ids, self._kv.grow(), positions, self._kv.cache)
        self.stats["steps"] += 1
        self.step_rows[len(rows)] += 1
        if len({r.job.settings.key for r in rows}) > 1:
            self.stats["mixed_steps"] += 1
        going = self._advance(rows, logits)
        self._keep(going)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> list[_Row]:
        """Give each row its next token; finish the rows that end; return the rows that go on."""
        tokens = logits.argmax(dim=-1).tolist()
        going = []
        for i, row in enumerate(rows):
            if not row.sampler.plain:
                tokens[i] = row.sampler.choose(logits[i : i + 1], row.job.prompt_ids + row.ids)
            row.ids.append(tokens[i])
            row.position += 1
            ended = tokens[i] in row.stop_ids
            if row.text is not None and not ended:
                row.text.add(row.ids)
                self._stream(row)
            if ended or len(row.ids) >= row.job.settings.max_tokens or (row.text and row.text.stop_at is not None):
                self._finish_job(row.job, row.ids, row.stops, row.started, row)
            else:
                going.append(row)
        return going

    def _stream(self, row: _Row) -> None:
        if row.job.on_text is None:
            return
        upto = row.text.showable(backticks=row.stops.cleanup is not None)
        if upto > row.shown:
            row.job.on_text(row.text.text[row.shown : upto])
            row.shown = upto

    def _finish_job(self, job: Job, ids: list[int], stops: StopSet, started: float, row: _Row | None = None) -> None:
        result = self.engine.result(job, ids, stops)
        if job.on_text is not None:
            shown = row.text.text[: row.shown] if row is not None and row.text is not None else ""
            if result.text.startswith(shown):
                if len(result.text) > len(shown):
                    job.on_text(result.text[len(shown) :])
            else:  # cannot happen for the tokenizers tested; the stream already showed other text
                logger.warning("a streamed reply differs from its final text after %d characters", len(shown))
        self.stats["finished"] += 1
        seconds = time.monotonic() - started
        self._request_seconds = seconds if not self._request_seconds else 0.9 * self._request_seconds + 0.1 * seconds
        self._settle(job, result)
