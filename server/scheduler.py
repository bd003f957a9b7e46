"""Batches the pairs of all concurrent requests by token budget, one forward at a time.

Requests queue FIFO; the batcher fills each batch with up to ``max_batch_tokens`` real
tokens, taking pairs from as many requests as fit (a request larger than one batch is
split over several). The forward runs on the device thread (the one that loaded the
model: see rerank_server.__main__) so the event loop keeps accepting, validating and tokenizing.
A request whose caller has gone (its awaiting task was cancelled: HTTP disconnect, gRPC
cancel or deadline) has its remaining pairs dropped before they are computed.

A forward is a *launch* that returns a *wait*: on a GPU the launch only queues the kernels,
so with ``in_flight=2`` the next batch is assembled, copied and queued while the device
still runs the current one, and the device never idles between batches for the host. On
the CPU the launch computes; ``in_flight=1`` there, or results would wait a whole forward.
A batch already launched is computed even if its callers leave meanwhile.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Accepting the request would exceed the queued-token limit."""


class ShuttingDownError(RuntimeError):
    """The server is shutting down: the request was cut off (or arrived after the cut-off)."""


Pairs = list[list[int]]
Wait = Callable[[], list[float]]  # blocks until the batch's logits are on the host
Launch = Callable[[Pairs], Wait]  # starts a forward


def launch_now(forward: Callable[[Pairs], list[float]]) -> Launch:
    """A blocking forward as a launch: it computes at once, its wait returns the result."""
    def launch(pairs: Pairs) -> Wait:
        logits = forward(pairs)
        return lambda: logits
    return launch


@dataclass(eq=False)
class _Job:
    pairs: list[list[int]]
    future: asyncio.Future
    logits: list[float | None] = field(default_factory=list)
    next_pair: int = 0  # first pair not yet handed to a batch
    done: int = 0
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None  # when its first batch began
    inference_seconds: float = 0.0  # forward time of the batches it took part in

    @property
    def remaining_tokens(self) -> int:
        return sum(len(p) for p in self.pairs[self.next_pair:])


@dataclass
class BatchStats:
    forwards: int = 0
    pairs: int = 0
    tokens: int = 0


class Scheduler:
    def __init__(self, launch: Launch, max_batch_tokens: int, max_queued_tokens: int,
                 on_batch: Callable[[int, int], None] | None = None, batch_requests: bool = True,
                 in_flight: int = 1, device_thread: ThreadPoolExecutor | None = None):
        """``device_thread``: the one-thread executor that runs launches and waits (default: a
        new one), owned by the scheduler from here on: ``close`` shuts it down."""
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        self._launch = launch
        self.in_flight = in_flight  # batches launched and not yet collected
        self.batch_requests = batch_requests  # False (--no-batching): one request per forward, for comparisons
        self._on_batch = on_batch  # (pairs, tokens) after each forward, e.g. for metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_queued_tokens = max_queued_tokens
        self._jobs: deque[_Job] = deque()
        self._work = asyncio.Event()
        self._thread = device_thread or ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self.queued_tokens = 0
        self.stats = BatchStats()
        self._task: asyncio.Task | None = None
        self._cut_off: str | None = None  # set at the end of the shutdown grace: the reason
        self._launched: deque[tuple[list[tuple[_Job, int]], Wait, float]] = deque()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def close(self) -> None:
        """Stops batching. A forward still running on the device thread is not waited for."""
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._thread.shutdown(wait=False, cancel_futures=True)

    def cut_off(self, reason: str) -> int:
        """Fails every request not yet answered (queued or in a launched batch) with
        ShuttingDownError(reason), and every later one. -> how many were cut."""
        self._cut_off = reason
        jobs = {job for job in self._jobs} | {job for batch, _, _ in self._launched for job, _ in batch}
        cut = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(ShuttingDownError(reason))
                cut += 1
        self._jobs.clear()
        self.queued_tokens = 0
        return cut

    async def score(self, pairs: list[list[int]], timings: dict | None = None) -> list[float]:
        """Token-id lists (each at most max_batch_tokens long) -> one logit each.
        ``timings`` (if given) receives "queue" and "inference" seconds."""
        if not pairs:
            return []
        if self._cut_off:
            raise ShuttingDownError(self._cut_off)
        tokens = sum(len(p) for p in pairs)
        if self.queued_tokens and self.queued_tokens + tokens > self.max_queued_tokens:
            raise QueueFullError(
                f"the server is busy: {self.queued_tokens} tokens are queued and this request adds {tokens} "
                f"(limit {self.max_queued_tokens}); retry later")
        job = _Job(pairs, asyncio.get_running_loop().create_future(), [None] * len(pairs))
        self._jobs.append(job)
        self.queued_tokens += tokens
        self._work.set()
        try:
            logits = await job.future
        finally:
            if not job.future.done():  # the caller went away: drop what is not computed yet
                job.future.cancel()
        if timings is not None:
            timings["queue"] = (job.started or job.enqueued) - job.enqueued
            timings["inference"] = job.inference_seconds
        return logits

    def _take_batch(self) -> list[tuple[_Job, int]]:
        batch, budget = [], self.max_batch_tokens
        while self._jobs:
            job = self._jobs[0]
            if job.future.done():  # cancelled: forget its unscheduled pairs
                self.queued_tokens -= job.remaining_tokens
                self._jobs.popleft()
                continue
            while job.next_pair < len(job.pairs) and (not batch or len(job.pairs[job.next_pair]) <= budget):
                n = len(job.pairs[job.next_pair])
                batch.append((job, job.next_pair))
                budget -= n
                self.queued_tokens -= n
                job.next_pair += 1
            if job.next_pair < len(job.pairs):
                break  # this batch is full
            self._jobs.popleft()
            if not self.batch_requests:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        launched = self._launched
        while True:
            batch = self._take_batch() if len(launched) < self.in_flight else None
            if batch:
                started = time.perf_counter()
                for job, _ in batch:
                    job.started = job.started or started
                try:
                    wait = await loop.run_in_executor(self._thread, self._launch, [job.pairs[i] for job, i in batch])
                except Exception as e:  # one bad batch fails its requests, not the server
                    self._fail(batch, e)
                else:
                    launched.append((batch, wait, started))
            elif launched:
                batch, wait, started = launched.popleft()
                try:
                    logits = await loop.run_in_executor(self._thread, wait)
                except Exception as e:
                    self._fail(batch, e)
                else:
                    self._deliver(batch, logits, time.perf_counter() - started)
            else:
                self._work.clear()
                await self._work.wait()

    def _deliver(self, batch: list[tuple[_Job, int]], logits: list[float], elapsed: float) -> None:
        tokens = sum(len(job.pairs[i]) for job, i in batch)
        self.stats.forwards += 1
        self.stats.pairs += len(batch)
        self.stats.tokens += tokens
        if self._on_batch:
            self._on_batch(len(batch), tokens)
        for job in {job for job, _ in batch}:
            job.inference_seconds += elapsed
        for (job, i), logit in zip(batch, logits):
            job.logits[i] = logit
            job.done += 1
            if job.done == len(job.pairs) and not job.future.done():
                job.future.set_result(job.logits)

    @staticmethod
    def _fail(batch: list[tuple[_Job, int]], error: Exception) -> None:
        log.error("forward failed for a batch of %d pairs", len(batch), exc_info=error)
        for job, _ in batch:
            if not job.future.done():
                job.future.set_exception(RuntimeError(f"inference failed: {error}"))
