"""The load benchmark's ideal FIFO server, the reference its half-load tail is judged against."""
import pytest

from benchmarks.load import Workload, ideal_fifo_latencies


def workload(*requests: list[int]) -> Workload:
    """Requests given as their pairs' token counts."""
    return Workload([""] * len(requests), [[]] * len(requests), [[[0] * n for n in r] for r in requests])


def test_a_lone_request_takes_its_tokens_at_the_raw_rate():
    assert ideal_fifo_latencies([(1.0, 0)], workload([30, 70]), tokens_per_s=100, max_batch_tokens=1000) == [1.0]


def test_a_request_arriving_during_a_batch_waits_for_it():
    wl = workload([100], [50])
    # request 0 occupies [0, 1); request 1 arrives at 0.5, runs [1, 1.5): latency 1.0
    assert ideal_fifo_latencies([(0.0, 0), (0.5, 1)], wl, 100, 1000) == pytest.approx([1.0, 1.0])


def test_waiting_requests_share_a_batch_up_to_the_budget():
    wl = workload([100], [40, 40], [40])
    # 0 alone in [0, 1); then 1 and 2 (120 tokens) exceed a budget of 100: 1 in [1, 1.8), 2 in [1.8, 2.2)
    got = ideal_fifo_latencies([(0.0, 0), (0.1, 1), (0.2, 2)], wl, 100, 100)
    assert got == pytest.approx([1.0, 1.7, 2.0])
    # with room for both they finish together at 2.2
    assert ideal_fifo_latencies([(0.0, 0), (0.1, 1), (0.2, 2)], wl, 100, 200) == pytest.approx([1.0, 2.1, 2.0])
