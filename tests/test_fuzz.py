"""Property-based fuzzing of the REST API against one live server (tiny random checkpoint),
for what schemathesis (tests/test_schemathesis.py) does not cover. Schema-valid and
schema-violating JSON bodies, on every route, are schemathesis's; here:

- valid requests under varied headers: Content-Type (JSON, JSON with parameters, ``+json``,
  other types, none), X-Request-Id (printable, Latin-1, long), Grpc-Timeout (none, ample,
  expired, malformed), and each response checked against its request (result count with
  top_n, documents echoed as sent, score range);
- raw bytes (invalid UTF-8, bad escapes, truncated JSON, deep nesting, an oversized body)
  under garbage Content-Types, methods and routes.

Properties: never a 5xx (but the documented 504 for a Grpc-Timeout that truly expired, 1n)
and never a dropped connection; every 4xx is a JSON body with an
integer ``code`` and a non-empty ``message``; every valid request (with a JSON Content-Type
or none) is a 200 whose body is well formed and consistent with the request; the server
is still healthy at the end and exits 0 on SIGTERM.
"""
from __future__ import annotations

import json
import math

import pytest
import requests
from helpers import SERVED_MODEL, start_server
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.serving, pytest.mark.slow]

MAX_DOCUMENTS = 12
MAX_REQUEST_BYTES = 20_000
ROUTES = ["/v1/rerank", "/rerank", "/v2/rerank"]
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    server = start_server(tiny_checkpoint, tmp_path_factory.mktemp("fuzz") / "server.log",
                          "--max-length", "64", "--max-documents", str(MAX_DOCUMENTS),
                          "--max-request-bytes", str(MAX_REQUEST_BYTES), "--log-level", "WARNING")
    yield server
    assert requests.get(server.http_url + "/health", timeout=30).status_code == 200
    assert server.process.poll() is None
    assert server.stop(60) == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


# ---------------------------------------------------------------- strategies

text = st.text(max_size=40)
documents = st.lists(text | st.builds(lambda t: {"text": t}, text), min_size=1, max_size=MAX_DOCUMENTS)


@st.composite
def valid_requests(draw) -> dict:
    request = {"model": draw(st.sampled_from([SERVED_MODEL, "reranker"])),
               "query": draw(st.text(min_size=1, max_size=60)),
               "documents": draw(documents)}
    for name, values in (("top_n", st.integers(1, MAX_DOCUMENTS + 3)), ("return_documents", st.booleans()),
                         ("raw_scores", st.booleans()), ("max_tokens_per_doc", st.integers(1, 100))):
        if draw(st.booleans()):
            request[name] = draw(values)
    return request


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda body, cut: json.dumps(body).encode()[:cut], valid_requests(), st.integers(0, 200)),
    st.builds(lambda body, junk: json.dumps(body).encode().replace(b'"query": "', b'"query": "' + junk, 1),
              valid_requests(),
              st.sampled_from([b"\xff", b"\xc3\x28", b"\\ud800", b"\\x41", b"\\", b"\x00", b"\xed\xa0\x80"])),
    st.sampled_from([b"", b"null", b"[]", b"NaN", b'{"top_n": NaN}', b'{"top_n": 1e999}', b"[" * 5000 + b"]" * 5000,
                     b'{"model": "' + SERVED_MODEL.encode() + b'", "query": "q", "documents": ["'
                     + b"x" * MAX_REQUEST_BYTES + b'"]}']),
)

JSON_TYPES = [None, "application/json", "application/json; charset=utf-8", "application/vnd.api+json",
              "APPLICATION/JSON"]
OTHER_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "",
               "application/json; charset=latin-1", "*/*", "application/jsonx", "json"]
mostly_json = st.sampled_from(JSON_TYPES * 4 + OTHER_TYPES)
content_types = (st.sampled_from(JSON_TYPES + OTHER_TYPES)
                 | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=30))
# visible ASCII and Latin-1 letters (RFC 9110 obs-text): what an HTTP header may carry
request_ids = st.none() | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e) | st.characters(
    min_codepoint=0xa1, max_codepoint=0xff), min_size=1, max_size=200)


# (header, what it asks for): none, a deadline ample for any request here, one that always
# expires (the documented 504 DEADLINE_EXCEEDED), and malformed ones (400 naming the header)
grpc_timeouts = st.sampled_from([(None, "none")] * 6 + [("60S", "ample"), ("00000120S", "ample"), ("1n", "expired"),
                                                        ("0S", "malformed"), ("123456789m", "malformed"),
                                                        ("5x", "malformed"), ("-1S", "malformed")])


def json_content_type(value: str | None) -> bool:
    if value is None:  # refused (415), as TEI refuses it: a cross-site form could send it
        return False
    media = value.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


# ---------------------------------------------------------------- properties

def assert_error_body(r: requests.Response) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    error = r.json()
    assert isinstance(error, dict), error
    assert isinstance(error.get("code"), int) and not isinstance(error["code"], bool) and error["code"] > 0, error
    assert isinstance(error.get("message"), str) and error["message"].strip(), error


def assert_well_formed(r: requests.Response, request: dict | None, route: str = "/v1/rerank") -> None:
    data = r.json()
    assert data["object"] == "rerank" and data["model"] == SERVED_MODEL and data["id"].startswith("rerank-")
    assert isinstance(data["created"], int)
    usage = data["usage"]
    assert isinstance(usage["prompt_tokens"], int) and usage["prompt_tokens"] == usage["total_tokens"] > 0
    results = data["results"]
    indices = [x["index"] for x in results]
    assert len(set(indices)) == len(indices)
    for a, b in zip(results, results[1:], strict=False):  # neighbours
        assert (a["relevance_score"], -a["index"]) >= (b["relevance_score"], -b["index"]), results
    for x in results:
        assert isinstance(x["index"], int) and isinstance(x["relevance_score"], float)
        assert math.isfinite(x["relevance_score"])
    if request is None:
        return
    n = len(request["documents"])
    assert len(results) == min(n, request.get("top_n", n))
    assert all(0 <= i < n for i in indices)
    if not request.get("raw_scores"):
        assert all(0.0 <= x["relevance_score"] <= 1.0 for x in results)
    for x in results:
        if request.get("return_documents"):
            sent = request["documents"][x["index"]]
            # as sent; /v2/rerank answers a string document as Cohere v2 does, {"text": ...}
            assert x["document"] == ({"text": sent} if route == "/v2/rerank" and isinstance(sent, str) else sent)
        else:
            assert "document" not in x


def send(server, data: bytes, content_type: str | None, request_id: str | None, route: str, method: str = "POST",
         grpc_timeout: str | None = None):
    headers = {} if grpc_timeout is None else {"Grpc-Timeout": grpc_timeout}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    try:
        r = requests.request(method, server.http_url + route, data=data, headers=headers, timeout=60)
    except requests.ConnectionError as e:
        pytest.fail(f"the connection failed ({e}); server log:\n{server.log()[-3000:]}")
    event(f"HTTP {r.status_code}")
    return r


@FUZZ
@given(request=valid_requests(), content_type=mostly_json, request_id=request_ids, route=st.sampled_from(ROUTES),
       timeout=grpc_timeouts)
def test_valid_requests(server, request, content_type, request_id, route, timeout):
    header, deadline = timeout
    r = send(server, json.dumps(request).encode(), content_type, request_id, route, grpc_timeout=header)
    if not json_content_type(content_type):
        assert_error_body(r)
    elif deadline == "expired":
        assert r.status_code == 504 and r.json()["code"] == 4 and "Grpc-Timeout (1 ns)" in r.json()["message"], r.text
    elif deadline == "malformed":
        assert_error_body(r)
        assert r.status_code == 400 and "Grpc-Timeout" in r.json()["message"], r.text
    else:
        assert r.status_code == 200, (r.status_code, r.text)
        assert_well_formed(r, request, route)
        if request_id is not None and request_id.isascii() and len(request_id) <= 128:  # else replaced
            assert r.headers["X-Request-Id"] == request_id


@settings(FUZZ, max_examples=150)
@given(data=raw_bodies, content_type=content_types, method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT"]),
       route=st.sampled_from(ROUTES * 3 + ["/score", "/v1/score", "/v1/rerank/", "/v1/nothing"]))
def test_raw_bytes(server, data, content_type, method, route):
    r = send(server, data, content_type, None, route, method)
    if r.status_code == 200:
        assert_well_formed(r, None)
    else:
        assert_error_body(r)
