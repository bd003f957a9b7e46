"""Start-up failures a user meets first: each ends the process with exit status 2 and one
line naming the cause (no traceback), before anything listens; plus --help and the routes
the start-up log announces. Real processes and real ports."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
from helpers import ROOT, error_lines, free_port, start_server, wait_exit

pytestmark = [pytest.mark.serving, pytest.mark.slow]


def run_server(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rerank_server", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_one_line_exit_2(result: subprocess.CompletedProcess, *needles: str) -> str:
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("listener", ["gRPC", "REST"])
def test_a_busy_port_is_refused(tiny_checkpoint, listener):
    """Whatever holds the port (here a plain listening socket; a second rerank-server on the same
    gRPC port was the case gRPC's default SO_REUSEPORT let through)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        ports = {"gRPC": ["--grpc-port", str(busy), "--http-port", str(free_port())],
                 "REST": ["--http-port", str(busy), "--grpc-port", str(free_port())]}[listener]
        result = run_server("--model", str(tiny_checkpoint), "--host", "127.0.0.1", *ports)
    assert_one_line_exit_2(result, f"cannot listen for {listener} on 127.0.0.1:{busy}", "in use")


def test_a_second_server_on_the_same_ports_is_refused(tiny_checkpoint, tmp_path):
    first = start_server(tiny_checkpoint, tmp_path / "first.log")
    try:
        http_port, grpc_port = first.http_url.rsplit(":", 1)[1], first.grpc_address.rsplit(":", 1)[1]
        result = run_server("--model", str(tiny_checkpoint), "--host", "127.0.0.1",
                            "--http-port", str(free_port()), "--grpc-port", grpc_port)
        assert_one_line_exit_2(result, f"gRPC on 127.0.0.1:{grpc_port}")
        result = run_server("--model", str(tiny_checkpoint), "--host", "127.0.0.1",
                            "--http-port", http_port, "--grpc-port", str(free_port()))
        assert_one_line_exit_2(result, f"REST on 127.0.0.1:{http_port}")
    finally:
        assert first.stop() == 0, first.log()


@pytest.mark.parametrize("variable,value", [("RERANK_HTTP_PORT", "abc"), ("RERANK_GRPC_PORT", "5e4"),
                                            ("RERANK_SHUTDOWN_GRACE", "soon"), ("RERANK_LOG_JSON", "maybe"),
                                            ("RERANK_MAX_DOCUMENTS", "1k")])
def test_a_malformed_environment_value_is_named(tiny_checkpoint, variable, value):
    result = run_server("--model", str(tiny_checkpoint), env={variable: value})
    assert_one_line_exit_2(result, f"{variable}={value!r}")


def test_missing_tls_files_are_named(tiny_checkpoint, tmp_path):
    result = run_server("--model", str(tiny_checkpoint), "--tls-cert", str(tmp_path / "cert.pem"),
                        "--tls-key", str(tmp_path / "key.pem"))
    assert_one_line_exit_2(result, "--tls-cert", "cert.pem", "no such file")


def test_an_unusable_tls_pair_is_named(tiny_checkpoint, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    key.write_text("not a key\n")
    result = run_server("--model", str(tiny_checkpoint), "--host", "127.0.0.1", "--http-port", str(free_port()),
                        "--grpc-port", str(free_port()), "--tls-cert", str(cert), "--tls-key", str(key))
    assert_one_line_exit_2(result, "TLS", str(cert))


def test_a_mistyped_model_path_names_both_places_looked(tmp_path):
    """A relative path with one slash could be a hub id: the line says it is no directory and
    not in the cache (offline here), and how to point at a directory."""
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    server = start_server("checkpoints/tinyy", tmp_path / "typo.log", wait=False,
                          env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)})
    code, log = wait_exit(server)
    assert code == 2, log
    errors = error_lines(log)
    assert len(errors) == 1 and "Traceback" not in log, log
    assert f"no such directory {ROOT / 'checkpoints' / 'tinyy'}" in errors[0], errors[0]
    assert "not in the Hugging Face cache" in errors[0] and str(hf_home) in errors[0], errors[0]
    assert "offline" in errors[0], errors[0]


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json", "model.safetensors"])
def test_a_checkpoint_directory_missing_a_file_names_it(tiny_checkpoint, tmp_path, missing):
    checkpoint = tmp_path / "partial"
    checkpoint.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        if name != missing:
            (checkpoint / name).symlink_to(tiny_checkpoint / name)
    server = start_server(checkpoint, tmp_path / "partial.log", wait=False)
    code, log = wait_exit(server)
    assert code == 2, log
    errors = error_lines(log)
    assert len(errors) == 1 and "Traceback" not in log, log
    wanted = "*.safetensors" if missing == "model.safetensors" else missing
    assert f"has no {wanted}" in errors[0] and str(checkpoint) in errors[0], errors[0]


def test_help_shows_every_default():
    result = run_server("--help")
    assert result.returncode == 0, result.stderr
    # one entry per option: its lines up to the next option
    entries = re.split(r"\n(?=  --)", result.stdout.split("options:", 1)[1])
    options = [e for e in entries if e.strip().startswith("--")]
    assert len(options) >= 20, result.stdout
    for entry in options:
        assert "default" in entry, f"no default shown for:\n{entry}"


def test_the_start_up_log_lists_every_route(live_server):
    line = next(line for line in live_server.log().splitlines() if "listening:" in line)
    for route in ("POST /v1/rerank", "POST /rerank", "POST /v2/rerank", "GET /health", "GET /metrics",
                  "GET /info", "GET /openapi.json", "GET /docs", "rerank.v1.Rerank.Rerank", "grpc.health.v1",
                  "reflection"):
        assert route in line, line


def test_a_missing_model_path_fails_before_anything_listens(tmp_path):
    result = run_server("--model", str(tmp_path / "no" / "such" / "dir"), "--host", "127.0.0.1",
                        "--http-port", str(free_port()), "--grpc-port", str(free_port()))
    line = assert_one_line_exit_2(result, "no such directory", str(tmp_path / "no" / "such" / "dir"))
    assert "listening" not in result.stdout + result.stderr, line
