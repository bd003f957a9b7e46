"""Scale-out: what a fleet needs from each replica (a connection age, the scaling signal) and the
proof with real processes (marked slow): three rerank-servers on 127.0.0.1-3 behind the client's
own balancing, one drained by SIGTERM, one killed by SIGKILL, a fourth added, and REST behind
nginx with a kill. Each run prints calls per replica and the client's errors."""
from __future__ import annotations

import asyncio

import pytest
from test_scheduler import RecordingForward, run, with_scheduler

from rerank_server.config import parse_args
from rerank_server.grpc_server import connection_options


def test_pending_tokens_count_waiting_and_running_work():
    """The scaling signal: rerank_queued_tokens misses the batch on the device; pending has both."""
    forward = RecordingForward()

    async def body(s):
        forward.gate.clear()  # the first batch stays on the "device"
        first = asyncio.create_task(s.score([[1] * 6]))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(s.score([[2] * 4, [3] * 5]))
        await asyncio.sleep(0.05)
        while_held = (s.queued_tokens, s.pending_tokens)
        forward.gate.set()
        await first, await second
        return while_held, (s.queued_tokens, s.pending_tokens)
    while_held, after = run(with_scheduler(forward, body))
    assert while_held == (9, 6 + 9) and after == (0, 0)


def test_connection_age_flags(capsys):
    config = parse_args(["--max-connection-age", "2.5", "--max-connection-age-grace", "1"])
    options = dict(connection_options(config.max_connection_age, config.max_connection_age_grace))
    assert options["grpc.max_connection_age_ms"] == 2500 and options["grpc.max_connection_age_grace_ms"] == 1000
    assert "grpc.max_connection_age_ms" not in dict(connection_options(0, 30))  # 0: no limit
    assert parse_args([]).max_connection_age == 120
    with pytest.raises(SystemExit) as e:
        parse_args(["--max-connection-age", "-1"])
    assert e.value.code == 2 and "--max-connection-age must be >= 0" in capsys.readouterr().err
