"""The load benchmark's ideal FIFO server, the reference its half-load tail is judged against, and
its record of how busy the rest of the machine was."""
import os

import pytest

from benchmarks.load import Workload, arrival_gaps, ideal_fifo_latencies, machine_load


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


def test_paced_arrivals_are_evenly_spaced_and_poisson_ones_average_the_rate():
    paced = arrival_gaps("paced", 4.0, seed=0)
    assert [next(paced) for _ in range(3)] == [0.25, 0.25, 0.25]
    poisson = arrival_gaps("Poisson", 4.0, seed=0)
    gaps = [next(poisson) for _ in range(4000)]
    assert len(set(gaps)) == len(gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.05)


def test_paced_at_half_load_the_ideal_server_never_queues():
    # requests of 1 to 3 units (mean 2) every 4 units: each takes just its own time
    sizes = [100, 300, 200, 300, 100, 200]
    wl = workload(*([n] for n in sizes))
    gaps = arrival_gaps("paced", 1 / 4.0, seed=0)
    sent, t = [], 0.0
    for k in range(len(sizes)):
        sent.append((t, k))
        t += next(gaps)
    assert ideal_fifo_latencies(sent, wl, 100, 1000) == pytest.approx([n / 100 for n in sizes])


def test_machine_load_names_the_runs_that_other_processes_contended():
    def run(mode, foreign):
        return {"transport": "rest", "batching": True, "mode": mode, "cpus": {"foreign": foreign}}
    cpus = os.cpu_count() or 1
    quiet, busy = 0.01 * cpus, 0.5 * cpus
    load = machine_load([run("1 clients", quiet), run("64 clients", busy), run("8 clients", None)],
                        [{"foreign_cpus_max": quiet}])
    assert load["contended"] and load["contended_runs"] == ["rest on 64 clients"]
    assert load["foreign_cpus_max"] == busy
    assert not machine_load([run("1 clients", quiet)], [{"foreign_cpus_max": quiet}])["contended"]
    assert machine_load([run("1 clients", quiet)], [{"foreign_cpus_max": busy}])["contended"]  # the raw forward's
