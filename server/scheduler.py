"""Batches the pairs of all concurrent requests by token budget, one forward at a time.

Requests queue FIFO; the batcher fills each batch with up to ``max_batch_tokens`` real
tokens, taking pairs from as many requests as fit (a request larger than one batch is
split over several). The forward runs on a dedicated thread so the event loop keeps
accepting, validating and tokenizing. A request whose caller has gone (its awaiting task
was cancelled: HTTP disconnect, gRPC cancel or deadline) has its remaining pairs dropped
before they are computed.
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
    def __init__(self, forward: Callable[[list[list[int]]], list[float]], max_batch_tokens: int,
                 max_queued_tokens: int, on_batch: Callable[[int, int], None] | None = None,
                 batch_requests: bool = True):
        self._forward = forward
        self.batch_requests = batch_requests  # False (--no-batching): one request per forward, for comparisons
        self._on_batch = on_batch  # (pairs, tokens) after each forward, e.g. for metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_queued_tokens = max_queued_tokens
        self._jobs: deque[_Job] = deque()
        self._work = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.queued_tokens = 0
        self.stats = BatchStats()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._thread.shutdown(wait=True)

    async def score(self, pairs: list[list[int]], timings: dict | None = None) -> list[float]:
        """Token-id lists (each at most max_batch_tokens long) -> one logit each.
        ``timings`` (if given) receives "queue" and "inference" seconds."""
        if not pairs:
            return []
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
        while True:
            await self._work.wait()
            batch = self._take_batch()
            if not batch:
                self._work.clear()
                continue
            pairs = [job.pairs[i] for job, i in batch]
            started = time.perf_counter()
            for job, _ in batch:
                job.started = job.started or started
            try:
                logits = await loop.run_in_executor(self._thread, self._forward, pairs)
            except Exception as e:  # one bad batch fails its requests, not the server
                log.exception("forward failed for a batch of %d pairs", len(pairs))
                for job, _ in batch:
                    if not job.future.done():
                        job.future.set_exception(RuntimeError(f"inference failed: {e}"))
                continue
            elapsed, tokens = time.perf_counter() - started, sum(len(p) for p in pairs)
            self.stats.forwards += 1
            self.stats.pairs += len(pairs)
            self.stats.tokens += tokens
            if self._on_batch:
                self._on_batch(len(pairs), tokens)
            for job in {job for job, _ in batch}:
                job.inference_seconds += elapsed
            for (job, i), logit in zip(batch, logits):
                job.logits[i] = logit
                job.done += 1
                if job.done == len(job.pairs) and not job.future.done():
                    job.future.set_result(job.logits)
