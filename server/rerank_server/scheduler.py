"""Batches the pairs of all concurrent requests by token budget, one forward at a time.

Requests queue FIFO; the batcher fills each batch with up to ``max_batch_tokens`` real
tokens, taking pairs from as many requests as fit (a request larger than one batch is
split over several). The forward runs on the device thread (the one that loaded the
model: see rerank_server.__main__) so the event loop keeps accepting, validating and tokenizing.
A request whose caller has gone (its awaiting task was cancelled: HTTP disconnect, gRPC
cancel or deadline) has its remaining pairs dropped before they are computed.

A forward is a *launch* that returns a *wait*: on a GPU the launch only queues the kernels,
so with ``in_flight=2`` the next batch is assembled, copied and queued while the device
still runs the current one, and the device never idles between batches for the host. Launches
run on the device thread and waits on a second, collecting thread, so a batch that arrives
while the current one runs is launched at once, not after it finishes. On the CPU the launch
computes; ``in_flight=1`` there, or results would wait a whole forward. A batch already
launched is computed even if its callers leave meanwhile.

A non-finite logit (NaN or infinite) fails the request it belongs to with a RuntimeError
saying so (the service answers INTERNAL): a score of NaN is never returned.

Nothing fails silently: an exception while launching, collecting or delivering a batch (a
forward that raises, one that returns too few logits, a metrics callback that raises) fails
that batch's unanswered requests with a RuntimeError and the loops go on; a loop that ends
anyway (a bug in the scheduler itself) calls ``on_fatal`` with the exception, so that the
server can stop serving and exit for its orchestrator to replace it, rather than leave every
later request waiting.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rerank_kernels.attention import FLASH_MAX_BATCH

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Accepting the request would exceed the queued-token limit."""


class ShuttingDownError(RuntimeError):
    """The server is shutting down: the request was cut off (or arrived after the cut-off)."""


# No batch holds more pairs than FlashAttention's varlen kernels take (the batch is on CUDA
# grid axis y), whatever --max-batch-tokens allows.
MAX_BATCH_PAIRS = FLASH_MAX_BATCH

Pairs = list[list[int]]
Wait = Callable[[], list[float]]  # blocks until the batch's logits are on the host
Launch = Callable[[Pairs], Wait]  # starts a forward


def launch_now(forward: Callable[[Pairs], list[float]]) -> Launch:
    """A blocking forward as a launch: it computes at once, its wait returns the result (the
    engine's on the CPU; tests' fakes)."""
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
                 in_flight: int = 1, device_thread: ThreadPoolExecutor | None = None,
                 max_batch_pairs: int = MAX_BATCH_PAIRS,
                 on_fatal: Callable[[BaseException], None] | None = None):
        """``device_thread``: the one-thread executor that runs launches (default: a new one),
        owned by the scheduler from here on: ``close`` shuts it down. Waits run on a thread
        of the scheduler's own (they only block on the device: no torch compute there).
        ``on_fatal``: called once if the batching or collecting loop ends with an exception."""
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, got {in_flight}")
        self._launch = launch
        self.in_flight = in_flight  # batches launched and not yet collected
        self.batch_requests = batch_requests  # False (--no-batching): one request per forward, for comparisons
        self._on_batch = on_batch  # (pairs, tokens) after each forward, e.g. for metrics
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_pairs = max_batch_pairs
        self.max_queued_tokens = max_queued_tokens
        self._jobs: deque[_Job] = deque()
        self._work = asyncio.Event()
        self._thread = device_thread or ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self._collector = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collect")
        self.queued_tokens = 0
        self.stats = BatchStats()
        self._tasks: list[asyncio.Task] = []
        self._cut_off: str | None = None  # set at the end of the shutdown grace: the reason
        self._open: set[_Job] = set()  # requests not answered yet (queued, launched or collected)
        self._on_fatal = on_fatal
        self.failed: BaseException | None = None  # set when a loop has died (see _loop_ended)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.in_flight)  # launched batches not yet collected
        self._launched: asyncio.Queue = asyncio.Queue()
        self._tasks = [loop.create_task(self._launch_batches(), name="batcher"),
                       loop.create_task(self._collect_batches(), name="collector")]
        for task in self._tasks:
            task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task) -> None:
        """A batching loop ended. Unless cancelled (close), that is fatal: every request not yet
        answered fails, later ones are refused, and ``on_fatal`` is told."""
        if task.cancelled() or self.failed is not None:
            return
        error = task.exception() or RuntimeError(f"the scheduler's {task.get_name()} loop ended")
        self.failed = error
        log.critical("the scheduler's %s loop died; no request can be served from here on", task.get_name(),
                     exc_info=error)
        self.cut_off(f"inference is unavailable: the scheduler failed ({type(error).__name__}: {error})",
                     RuntimeError)
        if self._on_fatal:
            self._on_fatal(error)

    async def close(self) -> None:
        """Stops batching. A forward still running on the device thread is not waited for
        (at shutdown its callers have been answered by ``cut_off``)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._thread.shutdown(wait=False, cancel_futures=True)
        self._collector.shutdown(wait=False, cancel_futures=True)

    def cut_off(self, reason: str, error: type[Exception] = ShuttingDownError) -> int:
        """Fails every request not yet answered (queued or in a launched batch) with
        ``error(reason)``, and every later one with ShuttingDownError. -> how many were cut."""
        self._cut_off = reason
        cut = 0
        for job in list(self._open):
            if not job.future.done():
                job.future.set_exception(error(reason))
                cut += 1
        self._jobs.clear()
        self.queued_tokens = 0
        return cut

    async def score(self, pairs: list[list[int]], timings: dict | None = None) -> list[float]:
        """Token-id lists (each at most max_batch_tokens long) -> one logit each.
        ``timings`` (if given) receives "queue" and "inference" seconds. The queue limit holds
        for every request, an empty queue included (the service caps a request below it)."""
        if not pairs:
            return []
        if self._cut_off:
            raise ShuttingDownError(self._cut_off)
        tokens = sum(len(p) for p in pairs)
        if self.queued_tokens + tokens > self.max_queued_tokens:
            raise QueueFullError(
                f"the server is busy: {self.queued_tokens} tokens are queued and this request adds {tokens} "
                f"(limit {self.max_queued_tokens}); retry later")
        job = _Job(pairs, asyncio.get_running_loop().create_future(), [None] * len(pairs))
        self._jobs.append(job)
        self._open.add(job)
        self.queued_tokens += tokens
        self._work.set()
        try:
            logits = await job.future
        finally:
            self._open.discard(job)
            if not job.future.done():  # the caller went away: drop what is not computed yet
                job.future.cancel()
        if timings is not None:
            timings["queue"] = (job.started or job.enqueued) - job.enqueued
            timings["inference"] = job.inference_seconds
        return logits

    @property
    def pending_tokens(self) -> int:
        """Tokens of the requests not answered yet that are not scored yet: queued, or in a batch
        launched and not collected (the autoscaling signal; computed when asked, at a scrape)."""
        return sum(len(pair) for job in self._open if not job.future.done()
                   for pair, logit in zip(job.pairs, job.logits, strict=True) if logit is None)

    def _take_batch(self) -> list[tuple[_Job, int]]:
        batch, budget = [], self.max_batch_tokens
        while self._jobs:
            job = self._jobs[0]
            if job.future.done():  # cancelled: forget its unscheduled pairs
                self.queued_tokens -= job.remaining_tokens
                self._jobs.popleft()
                continue
            while job.next_pair < len(job.pairs) and (not batch or (len(job.pairs[job.next_pair]) <= budget
                                                                   and len(batch) < self.max_batch_pairs)):
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

    async def _launch_batches(self) -> None:
        """Takes a batch whenever fewer than ``in_flight`` are uncollected and work is queued,
        and launches it on the device thread; the collector waits for it meanwhile."""
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            batch = self._take_batch()
            while not batch:
                self._work.clear()
                await self._work.wait()
                batch = self._take_batch()
            started = time.perf_counter()
            for job, _ in batch:
                job.started = job.started or started
            try:
                wait = await loop.run_in_executor(self._thread, self._launch, [job.pairs[i] for job, i in batch])
            except Exception as e:  # one bad batch fails its requests, not the server
                self._fail(batch, e)
                self._slots.release()
            else:
                self._launched.put_nowait((batch, wait, started))

    async def _collect_batches(self) -> None:
        """Waits for the launched batches in launch order, on the collecting thread."""
        loop = asyncio.get_running_loop()
        while True:
            batch, wait, started = await self._launched.get()
            try:
                logits = await loop.run_in_executor(self._collector, wait)
                self._deliver(batch, logits, time.perf_counter() - started)
            except Exception as e:  # the forward, the delivery or the metrics: this batch fails, the loop goes on
                self._fail(batch, e)
            finally:
                self._slots.release()

    def _deliver(self, batch: list[tuple[_Job, int]], logits: list[float], elapsed: float) -> None:
        """Hands each logit to its request. Checked first: one logit per pair of the batch (a
        forward returning more or fewer would pair scores with the wrong documents)."""
        if len(logits) != len(batch):
            raise RuntimeError(f"the forward returned {len(logits)} logits for a batch of {len(batch)} pairs")
        tokens = sum(len(job.pairs[i]) for job, i in batch)
        self.stats.forwards += 1
        self.stats.pairs += len(batch)
        self.stats.tokens += tokens
        for job in {job for job, _ in batch}:
            job.inference_seconds += elapsed
        for (job, i), logit in zip(batch, logits, strict=True):  # one logit per pair of the batch
            if not math.isfinite(logit):
                if not job.future.done():
                    log.error("the model returned a non-finite logit (%s) for pair %d of %d of a request", logit, i,
                              len(job.pairs))
                    job.future.set_exception(RuntimeError(
                        f"inference failed: the model returned a non-finite score ({logit}) for pair {i} of this "
                        f"request's {len(job.pairs)}; no score is returned rather than NaN"))
                continue
            job.logits[i] = logit
            job.done += 1
            if job.done == len(job.pairs) and not job.future.done():
                job.future.set_result(job.logits)
        if self._on_batch:  # after the answers: a failing callback fails only what is still unanswered
            self._on_batch(len(batch), tokens)

    @staticmethod
    def _fail(batch: list[tuple[_Job, int]], error: Exception) -> None:
        log.error("a batch of %d pairs failed", len(batch), exc_info=error)
        for job, _ in batch:
            if not job.future.done():
                job.future.set_exception(RuntimeError(f"inference failed: {error}"))
