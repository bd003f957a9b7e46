"""The README's snippets run as written against a live server (its addresses substituted for
localhost:8000 / localhost:50051), so the first thing a newcomer copies stays true. Python
blocks run in a fresh interpreter; bash blocks whose every command is `curl` or the `rerank`
CLI run in bash. The set-up commands (make, pip, docker) are what CI itself runs, or the
install tests (tests/test_install.py) do."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from helpers import ROOT

pytestmark = pytest.mark.serving

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


def commands(script: str) -> list[str]:
    """The commands of a bash block: the lines that start a command (a multi-line quoted
    argument's lines are indented or close the quote), comments dropped."""
    joined = re.sub(r"\\\n", " ", script)
    return [line.split(" #")[0].strip() for line in joined.splitlines() if re.match(r"[A-Za-z]", line)]


def live(script: str, server) -> str:
    return (script.replace("http://localhost:8000", server.http_url).replace("localhost:8000", server.http_url)
            .replace("localhost:50051", server.grpc_address))


def example_exchanges() -> list[tuple[str, dict, dict]]:
    """(path, request body, response) for each bash block that is one `curl -d` to a scoring
    route followed at once by a json block: the README's example answer to that request."""
    out = []
    fences = FENCE.findall(README.read_text())
    for (lang, body), (next_lang, answer) in zip(fences, fences[1:], strict=False):
        match = re.search(r"curl -s localhost:8000(\S+) .*?-d '(.*?)'", body, re.S)
        if lang == "bash" and next_lang == "json" and match:
            out.append((match.group(1), json.loads(match.group(2)), json.loads(answer)))
    return out


def runnable_bash() -> list[str]:
    out = []
    for script in blocks("bash"):
        cmds = commands(script)
        if cmds and all(c.startswith(("curl ", "rerank ")) for c in cmds):
            out.append(script)
    return out


def test_the_readme_has_snippets_to_run():
    assert len(blocks("python")) >= 4 and len(runnable_bash()) >= 2
    # and the two commands come first
    first = blocks("bash")[0]
    assert [c.split()[:2] for c in commands(first)] == [["make", "serve"], ["make", "test"]], first


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_snippet(live_server, index, tmp_path):
    script = live(blocks("python")[index], live_server)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, f"{script}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.stdout.strip(), "each snippet prints what it got"


@pytest.mark.parametrize("index", range(len(runnable_bash())))
def test_shell_snippet(live_server, index, tmp_path):
    script = live(runnable_bash()[index], live_server)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # the `rerank` CLI
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, f"{script}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    out = result.stdout.strip()
    assert out, script
    if script.lstrip().startswith("curl"):
        body = json.loads(out)  # rerank, TEI's bare array or /score's list: never an error body
        assert body and (isinstance(body, list) or body.get("object") in ("rerank", "list")), body
        assert isinstance(body, list) or body.get("results") or body.get("data"), body


def shape(value):
    """The JSON value with every number replaced by its type (scores differ on random weights)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__ if isinstance(value, int | float) and not isinstance(value, bool) else value


@pytest.mark.parametrize("index", range(len(example_exchanges())))
def test_example_response_is_what_the_server_answers(live_server, index):
    """The usage shown is the server's for that request (the tokenizer is the real one); the
    rest has the server's shape; only scores, ids and times are illustrative."""
    path, request, shown = example_exchanges()[index]
    answer = requests.post(live_server.http_url + path, json=request, timeout=60).json()
    assert shown["usage"] == answer["usage"]
    for volatile in ("id", "created"):
        shown.pop(volatile), answer.pop(volatile)
    for result in shown["results"] + answer["results"]:  # the order depends on the (random) scores
        index, document = result.pop("index"), result.pop("document", None)
        assert document in (None, request["documents"][index])  # each document as sent
    assert shape(shown) == shape(answer)


def test_the_readme_shows_an_example_exchange():
    assert any(path == "/v1/rerank" and "usage" in shown for path, _, shown in example_exchanges())
