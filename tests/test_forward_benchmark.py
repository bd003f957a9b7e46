"""The forward benchmark measures what the server does: its batches are the scheduler's."""
import asyncio

import pytest
import torch

from benchmarks.workloads import make_latency_workload, pack_ours
from rerank_server.scheduler import Scheduler, launch_now


def scheduler_batches(docs: list[list[int]], max_batch_tokens: int, max_batch_pairs: int) -> list[list[int]]:
    """The lengths of each batch the scheduler forms for ``docs`` queued as one request."""
    batches = []

    def forward(pairs):
        batches.append([len(p) for p in pairs])
        return [0.0] * len(pairs)

    async def main():
        s = Scheduler(launch_now(forward), max_batch_tokens, 10 ** 9, max_batch_pairs=max_batch_pairs)
        s.start()
        try:
            await s.score(docs)
        finally:
            await s.close()
    asyncio.run(main())
    return batches


@pytest.mark.parametrize("max_batch_tokens,max_pairs", [(2048, 65535), (16384, 65535), (100_000, 7)])
def test_latency_request_is_split_as_the_scheduler_splits_it(max_batch_tokens, max_pairs):
    w = make_latency_workload(100, 1000, seed=0)
    ours = pack_ours(w.docs, max_batch_tokens, torch.device("cpu"), max_pairs=max_pairs)
    got = [(cu[1:] - cu[:-1]).tolist() for _, cu, _ in ours]
    want = scheduler_batches([d.tolist() for d in w.docs], max_batch_tokens, max_pairs)
    assert got == want
    assert [max_len for _, _, max_len in ours] == [max(b) for b in want]
    if max_batch_tokens < w.tokens or max_pairs < 100:
        assert len(got) > 1, "the case must split the request to mean anything"
