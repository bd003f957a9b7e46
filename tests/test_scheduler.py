"""The batcher: token budget, splitting, cross-request batching, cancellation, backpressure."""
import asyncio
import math
import threading

import pytest

from rerank_server.scheduler import QueueFullError, Scheduler, launch_now


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


async def with_scheduler(forward, body, max_batch_tokens=10, max_queued_tokens=1000, in_flight=None):
    """``in_flight`` given: ``forward`` is a launch (returns a wait), else a blocking forward."""
    launch = launch_now(forward) if in_flight is None else forward
    scheduler = Scheduler(launch, max_batch_tokens, max_queued_tokens, in_flight=in_flight or 1)
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


class AsyncDevice:
    """A launch that returns before its batch is computed, like CUDA: each batch completes
    when the test releases it. Records the order of launches and waits."""

    def __init__(self, fail_on: int | None = None):
        self.events: list[str] = []
        self.released: list[threading.Event] = []
        self.fail_on = fail_on  # a token whose batch fails in its wait, as a device error would

    def release(self, n: int) -> None:
        self.released[n].set()

    def __call__(self, pairs):
        n = len(self.released)
        self.released.append(threading.Event())
        self.events.append(f"launch {n}")

        def wait():
            self.events.append(f"wait {n}")
            assert self.released[n].wait(5), f"batch {n} never released"
            if any(self.fail_on in p for p in pairs):
                raise RuntimeError("device fault")
            return [float(sum(p)) for p in pairs]
        return wait


async def wait_for(condition, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never met"
        await asyncio.sleep(0.005)


def test_two_batches_in_flight_when_work_is_queued():
    device = AsyncDevice()

    async def body(s):
        tasks = [asyncio.create_task(s.score([[n] * 10])) for n in range(1, 4)]  # one batch each
        await wait_for(lambda: {"launch 0", "launch 1", "wait 0"} <= set(device.events))
        await asyncio.sleep(0.05)
        assert "launch 2" not in device.events  # at most two batches launched and uncollected
        device.release(0)
        await wait_for(lambda: "launch 2" in device.events)  # batch 1 still runs meanwhile
        device.release(1)
        device.release(2)
        return [await t for t in tasks]
    assert run(with_scheduler(device, body, in_flight=2)) == [[10.0], [20.0], [30.0]]
    # launches and waits in launch order; each wait after its own launch
    assert [e for e in device.events if e.startswith("launch")] == ["launch 0", "launch 1", "launch 2"]
    assert [e for e in device.events if e.startswith("wait")] == ["wait 0", "wait 1", "wait 2"]
    assert device.events.index("launch 2") > device.events.index("wait 0")


def test_work_arriving_while_a_batch_runs_is_launched_at_once():
    """The queue is empty at the first launch; a request that arrives while the device runs
    that batch (its wait is blocking) is launched before the first batch finishes."""
    device = AsyncDevice()

    async def body(s):
        first = asyncio.create_task(s.score([[1] * 10]))
        await wait_for(lambda: device.events == ["launch 0", "wait 0"])  # blocked on the device
        second = asyncio.create_task(s.score([[2] * 10]))
        await wait_for(lambda: "launch 1" in device.events)
        assert not device.released[0].is_set()  # batch 0 is still running
        device.release(1)
        device.release(0)
        return await first, await second
    assert run(with_scheduler(device, body, in_flight=2)) == ([10.0], [20.0])


def test_non_finite_logit_fails_its_request_only():
    """A NaN or infinite logit fails the request it belongs to with a clear error; the
    requests batched with it get their scores."""
    def forward(pairs):
        return [float("nan") if p[0] == 13 else float("inf") if p[0] == 14 else float(sum(p)) for p in pairs]

    async def body(s):
        results = await asyncio.gather(s.score([[1], [13]]), s.score([[2, 2]]), s.score([[3], [14]]),
                                       return_exceptions=True)
        return results, s.queued_tokens
    (bad_nan, good, bad_inf), queued = run(with_scheduler(forward, body, max_batch_tokens=100))
    assert good == [4.0] and queued == 0
    for bad, value in ((bad_nan, "nan"), (bad_inf, "inf")):
        assert isinstance(bad, RuntimeError), bad
        assert f"non-finite score ({value}) for pair 1 of this request's 2" in str(bad)


def test_pairs_per_batch_are_capped():
    forward = RecordingForward()

    async def body(s):
        s.max_batch_pairs = 3
        return await s.score([[1]] * 7)
    assert run(with_scheduler(forward, body, max_batch_tokens=100)) == [1.0] * 7
    assert [len(b) for b in forward.batches] == [3, 3, 1]


def test_one_in_flight_collects_before_launching_the_next():
    class Finished(AsyncDevice):  # each batch is done by the time it is waited for
        def __call__(self, pairs):
            wait = super().__call__(pairs)
            self.release(len(self.released) - 1)
            return wait
    device = Finished()

    async def body(s):
        return await asyncio.gather(*(s.score([[n] * 10]) for n in range(1, 4)))
    assert run(with_scheduler(device, body, in_flight=1)) == [[10.0], [20.0], [30.0]]
    assert device.events == ["launch 0", "wait 0", "launch 1", "wait 1", "launch 2", "wait 2"]


def test_a_batch_failing_on_the_device_fails_its_requests_only():
    device = AsyncDevice(fail_on=666)

    async def body(s):
        bad = asyncio.create_task(s.score([[666] * 10]))
        good = asyncio.create_task(s.score([[5] * 10]))
        await wait_for(lambda: len(device.released) == 2)
        device.release(0)
        device.release(1)
        with pytest.raises(RuntimeError, match="inference failed: device fault"):
            await bad
        return await good
    assert run(with_scheduler(device, body, in_flight=2)) == [50.0]


def test_service_fails_only_the_request_with_a_non_finite_logit(tiny_checkpoint):
    """End to end in-process: a word-embedding row set to +inf makes the real model's logit
    NaN for pairs holding that token. That request gets INTERNAL with a message saying so;
    a request in the same batch gets finite scores."""
    import grpc
    from google.protobuf import struct_pb2

    from rerank_server.engine import Engine
    from rerank_server.schema import pb
    from rerank_server.service import ApiError, RerankService

    engine = Engine.load(str(tiny_checkpoint))
    query, good_doc, bad_doc = "what is machine learning?", "Machine learning is a field.", "Zebras run."
    good_ids = set(engine.tokenizer.encode_pairs(query, [good_doc])[0])
    poison = next(t for t in engine.tokenizer.encode_pairs(query, [bad_doc])[0] if t not in good_ids)
    engine.model.word_embeddings[poison] = float("inf")

    def request(docs):
        return pb.RerankRequest(model="m", query=query, documents=[struct_pb2.Value(string_value=d) for d in docs])

    async def body(s):
        service = RerankService(["m"], max_documents=10)
        service.attach(engine, s)
        return await asyncio.gather(service.rerank(request([good_doc, bad_doc])), service.rerank(request([good_doc])),
                                    return_exceptions=True)
    bad, good = run(with_scheduler(engine.forward, body, max_batch_tokens=1000))
    assert isinstance(bad, ApiError) and bad.code == grpc.StatusCode.INTERNAL, bad
    assert "non-finite score (nan) for pair 1 of this request's 2" in bad.message
    assert [r.index for r in good.results] == [0] and math.isfinite(good.results[0].relevance_score)
