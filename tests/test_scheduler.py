"""The batcher: token budget, splitting, cross-request batching, cancellation, backpressure."""
import asyncio
import threading

import pytest

from server.scheduler import QueueFullError, Scheduler


class RecordingForward:
    """Scores a pair as its token sum; records every batch; can be held to queue work up."""

    def __init__(self):
        self.batches: list[list[list[int]]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, pairs):
        self.gate.wait(5)
        self.batches.append(pairs)
        return [float(sum(p)) for p in pairs]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def with_scheduler(forward, body, max_batch_tokens=10, max_queued_tokens=1000):
    scheduler = Scheduler(forward, max_batch_tokens, max_queued_tokens)
    scheduler.start()
    try:
        return await body(scheduler)
    finally:
        await scheduler.close()


def test_request_larger_than_a_batch_is_split_and_reassembled():
    forward = RecordingForward()
    pairs = [[i] * 4 for i in range(7)]  # 28 tokens, budget 10 -> batches of 2 pairs

    async def body(s):
        return await s.score(pairs)
    assert run(with_scheduler(forward, body)) == [4.0 * i for i in range(7)]
    assert [len(b) for b in forward.batches] == [2, 2, 2, 1]
    assert all(sum(map(len, b)) <= 10 for b in forward.batches)


def test_concurrent_requests_share_forwards():
    forward = RecordingForward()

    async def body(s):
        forward.gate.clear()  # hold the first forward so the others queue up behind it
        first = asyncio.create_task(s.score([[1, 1]]))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(s.score([[n, n]])) for n in range(2, 6)]
        await asyncio.sleep(0.05)
        forward.gate.set()
        return await first, [await r for r in rest]
    first, rest = run(with_scheduler(forward, body, max_batch_tokens=100))
    assert first == [2.0] and rest == [[2.0 * n] for n in range(2, 6)]
    assert len(forward.batches) == 2  # 5 requests, 2 forwards


def test_cancelled_request_pairs_are_not_computed():
    forward = RecordingForward()

    async def body(s):
        forward.gate.clear()
        blocker = asyncio.create_task(s.score([[9] * 10]))
        await asyncio.sleep(0.05)
        doomed = asyncio.create_task(s.score([[7] * 5, [7] * 5]))
        await asyncio.sleep(0.05)
        doomed.cancel()
        forward.gate.set()
        await blocker
        after = await s.score([[3]])
        return after, s.queued_tokens
    after, queued = run(with_scheduler(forward, body))
    assert after == [3.0] and queued == 0
    assert all(7 not in p for b in forward.batches for p in b)


def test_queue_limit_refuses_at_once_and_recovers():
    forward = RecordingForward()

    async def body(s):
        forward.gate.clear()
        held = asyncio.create_task(s.score([[1] * 10]))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(s.score([[2] * 10]))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError, match="busy"):
            await s.score([[3] * 10])
        forward.gate.set()
        return await held, await queued, await s.score([[4] * 10])
    assert run(with_scheduler(forward, body, max_queued_tokens=15)) == ([10.0], [20.0], [40.0])


def test_failing_forward_fails_its_requests_only():
    calls = []

    def forward(pairs):
        calls.append(pairs)
        if any(p[0] == 666 for p in pairs):
            raise RuntimeError("boom")
        return [1.0] * len(pairs)

    async def body(s):
        with pytest.raises(RuntimeError, match="inference failed: boom"):
            await s.score([[666]])
        return await s.score([[1], [2]])
    assert run(with_scheduler(forward, body)) == [1.0, 1.0]
