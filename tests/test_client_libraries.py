"""The reranking client libraries people already use, unchanged but for the base URL, a
dummy key and the served model's name, against live servers: cohere (v1, v2), langchain-cohere,
llama-index (Cohere, Jina, TEI postprocessors), haystack (Cohere, Jina, HuggingFaceTEIRanker),
rerankers (cohere, jina, text-embeddings-inference) and litellm (cohere, infinity, jina_ai,
hosted_vllm, huggingface providers). Each must hand back exactly what our REST route
answers for the same request: the same documents, in the same order, with the same scores.

Their pins clash with the test extra (langchain-cohere needs cohere 5, the extra pins 7),
so they live in their own venv, .venv-clients, built here from tests/clients/requirements.txt
(no torch: a few minutes on a fresh machine, then reused while that file is unchanged).
tests/clients/cases.py runs inside it; the cases of one server run in one process."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from clients.quickstart import DOCS, QUERY, TOP_N
from helpers import ROOT, SERVED_MODEL, start_server

pytestmark = [pytest.mark.clients, pytest.mark.serving, pytest.mark.slow]

CLIENTS = Path(__file__).with_name("clients")
REQUIREMENTS = CLIENTS / "requirements.txt"
VENV = ROOT / ".venv-clients"

# case -> what it checks beyond the default (the sigmoid scores of the top 3, texts as sent)
DEFAULT_SERVER = [
    "cohere_v1", "cohere_v2", "langchain_cohere",
    "llama_index_cohere", "llama_index_jina", "llama_index_tei",
    "haystack_cohere", "haystack_jina", "haystack_tei", "haystack_tei_raw_left", "haystack_tei_error",
    "rerankers_cohere", "rerankers_jina", "rerankers_tei",
    "litellm_cohere", "litellm_infinity", "litellm_jina_ai", "litellm_huggingface",
]
# Parsers that read each returned document as an object {"text": ...} on /v1/rerank: they
# need the server flag --document-objects (RERANK_DOCUMENT_OBJECTS=1).
NEEDS_OBJECTS = {
    "cohere_v1_documents": "cohere 5's v1 SDK reads result.document.text",
    "litellm_hosted_vllm": "litellm's hosted_vllm provider calls document.get('text') (vLLM's shape)",
}
# ... and the one parser that wants the seed's plain string there: litellm's infinity
# provider validates document as a str, so it needs the default (no --document-objects).
NEEDS_STRINGS = {"litellm_infinity": "litellm's infinity provider validates result.document as a string"}


def _stamp() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes() + sys.version.encode()).hexdigest()[:16]


@pytest.fixture(scope="session")
def client_python() -> Path:
    """.venv-clients/bin/python, (re)built when requirements.txt (or this Python) changed."""
    stamp_file, python = VENV / ".stamp", VENV / "bin" / "python"
    if not (python.exists() and stamp_file.exists() and stamp_file.read_text() == _stamp()):
        shutil.rmtree(VENV, ignore_errors=True)
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                  "-r", str(REQUIREMENTS)], capture_output=True, text=True, timeout=1800)
        assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
        stamp_file.write_text(_stamp())
        print(f"built {VENV} in {time.monotonic() - started:.0f} s")
    return python


def run_cases(python: Path, server, names: list[str]) -> dict:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of litellm's price list
           "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost"}
    run = subprocess.run([str(python), str(CLIENTS / "cases.py"), server.http_url, SERVED_MODEL, *names],
                         capture_output=True, text=True, timeout=600, env=env, cwd=CLIENTS)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default_server(tiny_checkpoint, tmp_path_factory):
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("clients") / "server.log", "--max-documents", "8")
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def objects_server(tiny_checkpoint, tmp_path_factory):
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("clients-objects") / "server.log",
                          "--max-documents", "8", env={"RERANK_DOCUMENT_OBJECTS": "1"})
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def default_results(client_python, default_server):
    return run_cases(client_python, default_server, DEFAULT_SERVER + list(NEEDS_OBJECTS))


@pytest.fixture(scope="module")
def objects_results(client_python, objects_server):
    return run_cases(client_python, objects_server, list(NEEDS_OBJECTS) + list(NEEDS_STRINGS))


def ours(server, raw_scores: bool = False, top_n: int = TOP_N) -> list[dict]:
    """What our REST route answers for the cases' request: the reference."""
    r = requests.post(server.http_url + "/v1/rerank", json={
        "model": SERVED_MODEL, "query": QUERY, "documents": DOCS, "top_n": top_n, "raw_scores": raw_scores}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def assert_same(got: dict, server, raw_scores: bool = False, top_n: int = TOP_N) -> None:
    assert "error" not in got, got["error"]
    expected = ours(server, raw_scores, top_n)
    results = got["results"]
    assert [r["index"] for r in results] == [r["index"] for r in expected]
    # float32 in some parsers (haystack's TEI ranker): 1e-6
    assert [r["score"] for r in results] == pytest.approx([r["relevance_score"] for r in expected], abs=1e-6)
    for r in results:
        if "text" in r:
            assert r["text"] == DOCS[r["index"]]


@pytest.mark.parametrize("case", DEFAULT_SERVER)
def test_library_on_the_default_server(case, default_results, default_server):
    got = default_results[case]
    if case == "haystack_tei_error":  # TEI's error shape reaches the user through the ranker
        assert "413" in got["extra"]["error"] and '"error_type": "validation"' in got["extra"]["error"]
        assert "the limit is 8" in got["extra"]["error"]
        return
    # rerankers asks for every document (top_n = len(docs)) and ranks them all
    assert_same(got, default_server, raw_scores=case == "haystack_tei_raw_left",
                top_n=len(DOCS) if case.startswith("rerankers") else TOP_N)


@pytest.mark.parametrize("case", list(NEEDS_OBJECTS))
def test_library_needs_document_objects(case, objects_results, objects_server):
    """--document-objects: these parsers work."""
    assert_same(objects_results[case], objects_server)


@pytest.mark.parametrize("case", list(NEEDS_OBJECTS))
def test_without_the_flag_these_parsers_fail(case, default_results):
    """... and without the flag they fail, for the reason given (why the flag exists)."""
    assert "has no attribute" in default_results[case].get("error", ""), (NEEDS_OBJECTS[case], default_results[case])


@pytest.mark.parametrize("case", list(NEEDS_STRINGS))
def test_with_the_flag_this_parser_fails(case, objects_results):
    """The flag is per deployment: litellm's infinity provider wants the seed's strings."""
    assert "validation error" in objects_results[case].get("error", ""), (NEEDS_STRINGS[case], objects_results[case])
