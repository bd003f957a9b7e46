"""The Python examples of the public API document (shared/seed/reranking-api.txt), copied
as written (the document's page lost their indentation; it is restored) with only the URL
changed to the live server's. Each runs in its own interpreter; what it prints must be what
the document says it prints. The Authorization header stays as written: the test server has
no API keys configured, so it must be ignored."""
from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import requests

pytestmark = pytest.mark.serving

# The quick start's set-up, which the later examples rely on (`requests`, `url`, `headers`).
PRELUDE = '''\
import requests
url = "https://api.inference.nebul.io/v1/rerank"
headers = {
    "Authorization": "Bearer <YOUR_API_KEY>",
    "Content-Type": "application/json",
}
'''

QUICK_START = PRELUDE + '''\
payload = {
    "model": "BAAI/bge-reranker-v2-m3",
    "query": "What is machine learning?",
    "documents": [
        "Machine learning is a subset of artificial intelligence.",
        "The weather today is sunny and warm.",
        "Deep learning uses neural networks with multiple layers.",
        "Python is a popular programming language."
    ],
    "top_n": 3,
    "return_documents": True
}
response = requests.post(url, headers=headers, json=payload)
data = response.json()
for result in data["results"]:
    print(f"Score: {result['relevance_score']:.4f}")
    print(f"Document: {result['document']}")
    print(f"Index: {result['index']}\\n")
'''

TOP_N = PRELUDE + '''\
payload = {
    "model": "BAAI/bge-reranker-v2-m3",
    "query": "What is artificial intelligence?",
    "documents": [
        "AI is the simulation of human intelligence.",
        "The sky is blue.",
        "Machine learning enables AI systems to learn.",
        "Today is Monday.",
        "Neural networks are used in AI."
    ],
    "top_n": 2,
    "return_documents": True
}
response = requests.post(url, headers=headers, json=payload)
data = response.json()
print(f"Top {len(data['results'])} most relevant documents:")
for result in data["results"]:
    print(f" - {result['document']} (score: {result['relevance_score']:.4f})")
'''

RAW_SCORES = PRELUDE + '''\
payload = {
    "model": "BAAI/bge-reranker-v2-m3",
    "query": "Python programming",
    "documents": [
        "Python is a high-level programming language.",
        "Java is another programming language.",
        "Python supports multiple programming paradigms."
    ],
    "raw_scores": True,
    "return_documents": True
}
response = requests.post(url, headers=headers, json=payload)
data = response.json()
for result in data["results"]:
    print(f"Raw score: {result['relevance_score']}")
    print(f"Document: {result['document']}\\n")
'''

MULTILINGUAL = PRELUDE + '''\
# Dutch query with mixed language documents
payload = {
    "model": "BAAI/bge-reranker-v2-m3",
    "query": "Wat is kunstmatige intelligentie?",
    "documents": [
        "Artificial intelligence simulates human intelligence.",
        "Kunstmatige intelligentie simuleert menselijke intelligentie.",
        "L'intelligence artificielle simule l'intelligence humaine.",
        "The weather is nice today."
    ],
    "top_n": 2,
    "return_documents": True
}
response = requests.post(url, headers=headers, json=payload)
data = response.json()
for result in data["results"]:
    print(f"Score: {result['relevance_score']:.4f}")
    print(f"Document: {result['document']}\\n")
'''

RAG = PRELUDE + '''\
# Step 1: Retrieve candidate documents (e.g., from a vector database)
candidate_docs = [
    "Machine learning algorithms can be supervised or unsupervised.",
    "The capital of France is Paris.",
    "Neural networks consist of layers of interconnected nodes.",
    "Python has a large ecosystem of libraries for data science.",
    "Deep learning is a subset of machine learning."
]
# Step 2: Rerank documents based on the user query
user_query = "How do neural networks work?"
payload = {
    "model": "BAAI/bge-reranker-v2-m3",
    "query": user_query,
    "documents": candidate_docs,
    "top_n": 2,
    "return_documents": True
}
response = requests.post(url, headers=headers, json=payload)
data = response.json()
# Step 3: Use top-ranked documents for context
top_documents = [result["document"] for result in data["results"]]
context = "\\n\\n".join(top_documents)
print("Top relevant documents for context:")
for i, doc in enumerate(top_documents, 1):
    print(f"{i}. {doc}")
'''

DOC_URL = "https://api.inference.nebul.io/v1/rerank"


def payload_of(source: str) -> dict:
    """The example's own payload, read back by running its lines before the request."""
    namespace: dict = {}
    exec(source[:source.index("response = requests.post")], namespace)
    return namespace["payload"]


def documents_of(source: str) -> list[str]:
    return payload_of(source)["documents"]


def run_example(source: str, base_url: str, route: str = "/v1/rerank") -> str:
    assert source.count(DOC_URL) == 1
    code = source.replace(DOC_URL, base_url + route)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    return proc.stdout


def server_answer(server, source: str) -> dict:
    """What the server answers the example's own payload (to compare with what was printed)."""
    r = requests.post(server.http_url + "/v1/rerank", json=payload_of(source), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("route", ["/v1/rerank", "/rerank"])
def test_quick_start(live_server, route):
    out = run_example(QUICK_START, live_server.http_url, route)
    docs = documents_of(QUICK_START)
    blocks = out.split("\n\n")
    assert blocks[-1] == "", repr(out)  # each result ends with a blank line
    blocks = blocks[:-1]
    assert len(blocks) == 3, out  # top_n 3
    assert len(re.findall(r"^Score: ", out, re.M)) == 3
    scores, indices = [], []
    for block in blocks:
        m = re.fullmatch(r"Score: (0\.\d{4}|1\.0000)\nDocument: (.+)\nIndex: (\d+)", block)
        assert m, repr(block)
        score, doc, index = float(m[1]), m[2], int(m[3])
        assert 0 <= index < len(docs) and docs[index] == doc
        scores.append(score)
        indices.append(index)
    assert scores == sorted(scores, reverse=True)
    assert len(set(indices)) == 3
    expected = server_answer(live_server, QUICK_START)
    assert indices == [r["index"] for r in expected["results"]]
    assert scores == pytest.approx([r["relevance_score"] for r in expected["results"]], abs=1e-4)


def test_top_n(live_server):
    out = run_example(TOP_N, live_server.http_url)
    docs = documents_of(TOP_N)
    lines = out.splitlines()
    assert lines[0] == "Top 2 most relevant documents:"
    assert len(lines) == 3, out
    printed = []
    for line in lines[1:]:
        m = re.fullmatch(r" - (.+) \(score: (\d\.\d{4})\)", line)
        assert m, repr(line)
        assert m[1] in docs
        printed.append((m[1], float(m[2])))
    assert printed[0][1] >= printed[1][1]
    assert printed[0][0] != printed[1][0]
    expected = server_answer(live_server, TOP_N)
    assert [d for d, _ in printed] == [docs[r["index"]] for r in expected["results"]]


def test_raw_scores(live_server):
    out = run_example(RAW_SCORES, live_server.http_url)
    docs = documents_of(RAW_SCORES)
    blocks = out.split("\n\n")
    assert blocks[-1] == ""
    blocks = blocks[:-1]
    assert len(blocks) == 3, out  # no top_n: every document
    assert len(re.findall(r"^Raw score: ", out, re.M)) == 3
    printed = []
    for block in blocks:
        m = re.fullmatch(r"Raw score: (\S+)\nDocument: (.+)", block)
        assert m, repr(block)
        printed.append((float(m[1]), m[2]))
    assert sorted(d for _, d in printed) == sorted(docs)
    assert [s for s, _ in printed] == sorted((s for s, _ in printed), reverse=True)
    expected = server_answer(live_server, RAW_SCORES)
    assert [s for s, _ in printed] == pytest.approx([r["relevance_score"] for r in expected["results"]], abs=1e-6)
    # Raw means logits: the normalized scores of the same request are their sigmoids.
    normal = requests.post(live_server.http_url + "/v1/rerank", timeout=60, json={
        "model": "BAAI/bge-reranker-v2-m3", "query": "Python programming", "documents": docs}).json()
    by_doc = {docs[r["index"]]: r["relevance_score"] for r in normal["results"]}
    for s, d in printed:
        assert 1 / (1 + math.exp(-s)) == pytest.approx(by_doc[d], abs=1e-6)


def test_multilingual(live_server):
    out = run_example(MULTILINGUAL, live_server.http_url)
    docs = documents_of(MULTILINGUAL)
    blocks = out.split("\n\n")
    assert blocks[-1] == ""
    blocks = blocks[:-1]
    assert len(blocks) == 2, out  # top_n 2
    printed = []
    for block in blocks:
        m = re.fullmatch(r"Score: (\d\.\d{4})\nDocument: (.+)", block)
        assert m, repr(block)
        assert m[2] in docs
        printed.append((float(m[1]), m[2]))
    assert printed[0][0] >= printed[1][0] and printed[0][1] != printed[1][1]
    expected = server_answer(live_server, MULTILINGUAL)
    assert [d for _, d in printed] == [docs[r["index"]] for r in expected["results"]]


def test_rag_integration(live_server):
    out = run_example(RAG, live_server.http_url)
    docs = documents_of(RAG)
    lines = out.splitlines()
    assert lines[0] == "Top relevant documents for context:"
    assert len(lines) == 3, out
    printed = []
    for n, line in enumerate(lines[1:], 1):
        m = re.fullmatch(r"(\d+)\. (.+)", line)
        assert m and int(m[1]) == n, repr(line)
        assert m[2] in docs
        printed.append(m[2])
    assert len(set(printed)) == 2
    expected = server_answer(live_server, RAG)
    assert printed == [docs[r["index"]] for r in expected["results"]]


def test_response_format_matches_the_document(live_server):
    """The documented response: these keys and JSON types, for the quick start's request."""
    headers = {"Authorization": "Bearer <YOUR_API_KEY>", "Content-Type": "application/json"}
    r = requests.post(live_server.http_url + "/v1/rerank", json=payload_of(QUICK_START), headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    assert set(data) == {"object", "id", "model", "results", "usage", "created"}
    assert data["object"] == "rerank" and data["id"].startswith("rerank-")
    assert data["model"] == "BAAI/bge-reranker-v2-m3"
    assert type(data["created"]) is int
    usage = data["usage"]
    assert type(usage["prompt_tokens"]) is int and usage["prompt_tokens"] == usage["total_tokens"] > 0
    for result in data["results"]:
        assert set(result) == {"index", "relevance_score", "document"}
        assert type(result["index"]) is int and type(result["relevance_score"]) is float
        assert type(result["document"]) is str
