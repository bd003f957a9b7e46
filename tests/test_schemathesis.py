"""schemathesis (the OpenAPI fuzzer) against a live server, on GET /openapi.json as published,
with every check (--checks all): schema-valid requests must be accepted and answer as
documented, schema-violating ones must be refused, 405s must carry Allow, and so on. Two
runs: all modes (valid and invalid data), and valid data only. Bounded example counts keep
it to well under a minute on two cores.

Grpc-Timeout is generated from its documented pattern like any other input: a schema-valid
deadline that truly expires (1n always does) is answered 504 DEADLINE_EXCEEDED, as documented,
and schemathesis.toml lets not_a_server_error accept that one 5xx; a malformed one (0S, nine
digits, another unit) must be a 400. Deadlines have their own tests (test_dialects.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests
from helpers import start_server

pytestmark = [pytest.mark.serving, pytest.mark.slow]

CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("schemathesis") / "server.log",
                          "--max-length", "128", "--max-documents", "8", "--max-request-bytes", "200000",
                          "--log-level", "WARNING")
    yield server
    assert server.process.poll() is None
    assert server.stop(60) == 0, server.log()
    # aiohttp answers a malformed request (schemathesis probes with a NUL byte in a header) with
    # 400 itself and logs it with a traceback: those are the only tracebacks allowed
    log = server.log()
    assert log.count("Traceback") == log.count("aiohttp.http_exceptions.BadHttpMessage"), log


@pytest.mark.parametrize("mode, seed", [("all", 1), ("positive", 2)])
def test_schemathesis_finds_nothing(server, tmp_path, mode, seed):
    spec = server.http_url + "/openapi.json"
    assert requests.get(spec, timeout=10).status_code == 200
    run = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(CONFIG), "--no-color", "run", spec,
         "--checks", "all", "--mode", mode, "--max-examples", "30", "--seed", str(seed),
         # one worker: with threads, hypothesis's ast.parse trips CPython 3.11.7's "AST constructor
         # recursion depth mismatch" (fixed in 3.11.8)
         "--workers", "1", "--request-timeout", "60"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    assert "No issues found" in output, output[-6000:]
    tested = [line for line in output.splitlines() if "Tested:" in line]
    assert tested and tested[0].split()[-1] == "8", output[-3000:]  # every documented operation (5 POST, 3 GET)
