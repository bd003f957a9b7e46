"""The one place a request is validated and scored; the gRPC servicer and the REST shim
(every dialect: Cohere v1/v2, TEI, vLLM's /score) call ``RerankService.rerank`` or
``RerankService.score`` with the proto request.

validation -> tokenize (thread pool) -> scheduler queue -> batched forward -> rank, top_n.
"""
from __future__ import annotations

import asyncio
import contextvars
import enum
import functools
import hmac
import json
import logging
import math
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from google.protobuf import json_format, struct_pb2

from rerank_server import __version__
from rerank_server.engine import Engine
from rerank_server.metrics import Metrics
from rerank_server.scheduler import QueueFullError, Scheduler, ShuttingDownError
from rerank_server.schema import pb
from rerank_server.tokenization import EncodedPair, PairTooLongError, RequestTooLargeError, token_type_start

log = logging.getLogger(__name__)


class Reason(str, enum.Enum):
    """Refusals that share a gRPC code but that HTTP dialects answer with statuses of their own
    (rerank_server.rest maps them)."""

    EMPTY = "empty"  # no documents
    TOO_MANY = "too_many"  # over --max-documents
    TOO_LONG = "too_long"  # a pair over --max-length with truncation off
    TOO_LARGE = "too_large"  # more tokens than --max-request-tokens
    MEDIA_TYPE = "media_type"  # a REST body that is not application/json
    BODY_TIMEOUT = "body_timeout"  # a REST body not received in time


class ApiError(Exception):
    """A request the service refuses, transport-neutral: a gRPC status code, a sentence naming
    the field, and where a dialect needs it, the ``Reason``."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: Reason | None = None):
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason


@dataclass(frozen=True)
class Deadline:
    """A transport's deadline: seconds, and how to say it ("500 ms")."""

    seconds: float
    text: str


def invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


# Bounds on what a request may hold beyond --max-documents, checked before any per-item work
# (on REST before the body is transcoded), so that the work a request costs stays linear in
# its size: rank_fields x documents lookups, and the fields of each document object.
MAX_RANK_FIELDS = 100
MAX_DOCUMENT_FIELDS = 256


def check_rank_fields(n: int) -> None:
    if n > MAX_RANK_FIELDS:
        raise invalid(f"rank_fields has {n} names; the limit is {MAX_RANK_FIELDS}")


def check_document_fields(index: int, n: int) -> None:
    if n > MAX_DOCUMENT_FIELDS:
        raise invalid(f"documents[{index}] is an object of {n} fields; the limit is {MAX_DOCUMENT_FIELDS}")


def document_text(doc: struct_pb2.Value, index: int, rank_fields: list[str]) -> str:
    """A document is a string, or an object: ranked on its "text" field, or with
    ``rank_fields`` on "field: value" lines built from those of the fields it has (Cohere style)."""
    kind = doc.WhichOneof("kind")
    if kind == "string_value":
        return doc.string_value
    if kind == "struct_value":
        fields = doc.struct_value.fields
        check_document_fields(index, len(fields))
        if rank_fields:  # the fields a document lacks are skipped; with none, its text is empty
            return "\n".join(f"{f}: {_plain(fields[f])}" for f in rank_fields if f in fields)
        text = fields.get("text")
        if text is not None and text.WhichOneof("kind") == "string_value":
            return text.string_value
        raise invalid(f'documents[{index}] is an object without a string field "text" (or name rank_fields)')
    raise invalid(f'documents[{index}] must be a string or an object with a "text" field; got {value_kind(doc)}')


_KINDS = {"string_value": "a string", "number_value": "a number", "bool_value": "a boolean",
          "null_value": "null", "list_value": "an array", "struct_value": "an object", None: "nothing"}


def value_kind(value: struct_pb2.Value) -> str:
    """What a google.protobuf.Value holds, in JSON's words ("a string", "an array", ...)."""
    return _KINDS[value.WhichOneof("kind")]


def _plain(value: struct_pb2.Value) -> str:
    if value.WhichOneof("kind") == "string_value":
        return value.string_value
    return json.dumps(json_format.MessageToDict(value), ensure_ascii=False)


# The id of the request being served, for log lines (see rerank_server.__main__'s log filter).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


_REQUEST_ID = re.compile(r"[!-~]{1,128}")


@dataclass
class Call:
    """One request's identity and per-stage timings (seconds), filled as it travels. Each
    transport opens it with ``RerankService.begin`` and closes it with ``RerankService.end``."""

    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A client's id is echoed in a header, the response's id and the log: printable ASCII
        # only, bounded; anything else (e.g. Latin-1 bytes in the header) gets a fresh id.
        if not _REQUEST_ID.fullmatch(self.request_id or ""):
            self.request_id = uuid.uuid4().hex

    def stage_milliseconds(self) -> dict[str, str]:
        """Stage -> its time in milliseconds as text, for response headers / trailing metadata."""
        return {stage: f"{seconds * 1000:.2f}" for stage, seconds in self.timings.items()}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


MAX_TOTAL_CHUNKS = 10_000  # as Cohere: documents x max_chunks_per_doc


def counted_in_flight(method):
    """Counts a service call in ``RerankService.in_flight`` while it runs (the shutdown drain
    waits for that count to reach zero)."""
    @functools.wraps(method)
    async def run(self: RerankService, *args, **kwargs):
        self.in_flight += 1
        try:
            return await method(self, *args, **kwargs)
        finally:
            self.in_flight -= 1
    return run


BATCHES_PER_REQUEST = 32  # the most forward batches of work one request may hold, by default


def default_max_request_tokens(max_queued_tokens: int, max_batch_tokens: int, max_length: int) -> int:
    """32 batches (131,072 tokens on the CPU, 524,288 on a GPU) but at most a quarter of the
    queue, so that no request can take more than a quarter of it; always room for one pair of
    the longest length."""
    return max(min(BATCHES_PER_REQUEST * max_batch_tokens, max_queued_tokens // 4),
               min(max_length, max_queued_tokens))


class RerankService:
    def __init__(self, served_model_names: list[str], max_documents: int, api_keys: list[str] = (),
                 metrics: Metrics | None = None, settings: dict | None = None,
                 max_request_tokens: int | None = None, cpu_workers: int = 2):
        """``max_request_tokens``: the most tokens one request may put in the queue (default: see
        default_max_request_tokens, once the model is attached). ``cpu_workers``: threads that
        parse, validate and tokenize requests off the event loop."""
        self.settings = settings or {}  # limits and listeners, reported by describe()
        self.model_id = served_model_names[0]
        self.served_names = set(served_model_names)
        self.max_documents = max_documents
        self.max_request_tokens = max_request_tokens
        self._api_keys = [k.encode() for k in api_keys]
        self.metrics = metrics or Metrics()
        self.engine: Engine | None = None
        self.draining = False  # set at shutdown: health goes NOT_SERVING, new requests 503
        self.failed = False  # set when inference cannot go on (the scheduler died): NOT_SERVING for good
        self.in_flight = 0  # service calls running now (see counted_in_flight)
        self.scheduler: Scheduler | None = None
        # The event loop only moves bytes: JSON parsing, transcoding, validation and tokenization
        # run here, so that health checks and small requests are answered while a big one is read.
        self._cpu_pool = ThreadPoolExecutor(max_workers=cpu_workers, thread_name_prefix="request-cpu")

    @property
    def ready(self) -> bool:
        return self.scheduler is not None and not self.draining and not self.failed

    @property
    def takes_instruction(self) -> bool | None:
        """Whether the served model takes ``instruction`` (an LLM reranker); None while it loads."""
        if self.engine is None:
            return None
        return bool(getattr(self.engine.tokenizer, "takes_instruction", False))

    def attach(self, engine: Engine, scheduler: Scheduler) -> None:
        """Called once the model is loaded and warmed: from here on requests are served."""
        if self.max_request_tokens is None:
            self.max_request_tokens = default_max_request_tokens(
                scheduler.max_queued_tokens, scheduler.max_batch_tokens, engine.tokenizer.max_length)
        self.engine, self.scheduler = engine, scheduler
        engine.on_shared_tokens = self.metrics.shared_prefix_tokens.inc

    async def off_loop(self, function, *args, **kwargs):
        """Runs CPU work on the request pool, with this request's context (its id in the log)."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self._cpu_pool, functools.partial(context.run, function, *args, **kwargs))

    def cut_off(self, reason: str) -> None:
        """End of the shutdown grace: every request still running is answered UNAVAILABLE."""
        if self.scheduler:
            self.scheduler.cut_off(reason)

    def not_serving(self) -> ApiError:
        if self.draining:
            return ApiError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry (on another replica)")
        return ApiError(grpc.StatusCode.UNAVAILABLE, "the model is loading; retry shortly")

    def describe(self) -> dict:
        """What GET /info reports: the model, how it runs, and the limits."""
        info = {"model": self.model_id, "aliases": sorted(self.served_names - {self.model_id}),
                "ready": self.ready, "max_documents": self.max_documents,
                "version": __version__, **self.settings}
        if self.engine:
            model = self.engine.model
            info.update(device=str(model.device), dtype=str(model.dtype).removeprefix("torch."),
                        attention_backend=model.ops.attention_backend, max_length=self.engine.max_length,
                        kernel_choices=model.ops.choices,  # load-time measurements (CUDA), with timings
                        model_dir=str(self.engine.model_dir), layers=model.config.num_layers,
                        hidden_size=model.config.hidden_size, family=model.config.family)
            tokenizer = getattr(self.engine, "tokenizer", None)
            if getattr(tokenizer, "takes_instruction", False):  # an LLM reranker's prompt
                info["template"] = tokenizer.describe()
        if self.scheduler:
            info.update(max_batch_tokens=self.scheduler.max_batch_tokens,
                        max_queued_tokens=self.scheduler.max_queued_tokens,
                        max_request_tokens=self.max_request_tokens)
        return info

    def begin(self, request_id: str | None) -> Call:
        """A request arrives, on either transport: its id (the client's where usable, else a
        new one), set for the log lines of all it runs."""
        call = Call(request_id=request_id or "")
        request_id_var.set(call.request_id)
        return call

    def end(self, call: Call, transport: str, route: str, code: grpc.StatusCode, outcome: str,
            http_status: int | None = None) -> None:
        """A request answered, on either transport: its count and latency in the metrics, and
        one log line, ``outcome`` (e.g. "POST /v1/rerank 200") and the time taken."""
        elapsed = time.perf_counter() - call.started
        self.metrics.requests.labels(transport, route, code.name, str(http_status or "")).inc()
        self.metrics.request_seconds.labels(transport).observe(elapsed)
        log.info("%s in %.1f ms", outcome, elapsed * 1000)

    @property
    def auth_required(self) -> bool:
        return bool(self._api_keys)

    def authenticate(self, authorization: str | bytes | None, transport: str) -> None:
        """``authorization`` is the HTTP header / gRPC metadata value, "Bearer <key>". A refusal
        is counted in the metrics (rerank_auth_failures_total); the value is never logged."""
        if not self._api_keys:
            return
        try:
            self._check_key(authorization)
        except ApiError:
            self.metrics.auth_failures.labels(transport).inc()
            raise

    def _check_key(self, authorization: str | bytes | None) -> None:
        if not authorization:
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED,
                           "authorization is required: send 'Authorization: Bearer <key>'")
        if isinstance(authorization, bytes):  # gRPC binary metadata: never a key
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED, "authorization must be text: 'Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        try:
            key_bytes = key.strip().encode()
        except UnicodeEncodeError:  # undecodable bytes in the header (aiohttp keeps them as surrogates)
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED,
                           "authorization holds bytes that are not UTF-8 text: send 'Bearer <key>'") from None
        # compare against every key, in constant time, whatever matches first
        matched = [hmac.compare_digest(key_bytes, k) for k in self._api_keys]
        if scheme.lower() != "bearer" or not any(matched):
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED, "authorization: invalid API key")

    def check_model(self, model: str) -> None:
        if model not in self.served_names:
            raise ApiError(grpc.StatusCode.NOT_FOUND,
                           f"model {model!r} is not served here; served: {', '.join(sorted(self.served_names))}")

    def check_count(self, field_name: str, n: int) -> None:
        """The documents' count (``field_name``: what the dialect calls them)."""
        if n == 0:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field_name} is required and must hold at least one document", Reason.EMPTY)
        self.check_not_too_many(field_name, n)

    def check_not_too_many(self, field_name: str, n: int) -> None:
        """At most --max-documents, checked before any work on the documents."""
        if n > self.max_documents:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field_name} has {n} entries; the limit is {self.max_documents} (--max-documents)",
                           Reason.TOO_MANY)

    def validate(self, request: pb.RerankRequest, documents_field: str = "documents") -> list[str]:
        """-> the documents' texts; raises ApiError naming the offending field (``documents_field``:
        what the caller's dialect calls the documents, e.g. TEI's "texts")."""
        if not request.model:
            raise invalid("model is required: name the served model, e.g. " + repr(self.model_id))
        self.check_model(request.model)
        if not request.query:
            raise invalid("query is required and must be a non-empty string")
        self.check_count(documents_field, len(request.documents))
        check_rank_fields(len(request.rank_fields))
        if request.HasField("top_n") and request.top_n < 1:
            raise invalid(f"top_n must be an integer >= 1, got {request.top_n}")
        if request.HasField("max_tokens_per_doc") and request.max_tokens_per_doc < 1:
            raise invalid(f"max_tokens_per_doc must be an integer >= 1, got {request.max_tokens_per_doc}")
        if request.HasField("max_chunks_per_doc"):
            if request.max_chunks_per_doc < 1:
                raise invalid(f"max_chunks_per_doc must be an integer >= 1, got {request.max_chunks_per_doc}")
            if len(request.documents) * request.max_chunks_per_doc > MAX_TOTAL_CHUNKS:
                raise invalid(f"documents x max_chunks_per_doc must be at most {MAX_TOTAL_CHUNKS}, got "
                              f"{len(request.documents)} x {request.max_chunks_per_doc}")
        self.check_instruction(request)
        return [document_text(d, i, request.rank_fields) for i, d in enumerate(request.documents)]

    def check_instruction(self, request: pb.RerankRequest | pb.ScoreRequest) -> None:
        """``instruction`` is for LLM rerankers (a prompt template); a cross-encoder refuses it."""
        tokenizer = getattr(self.engine, "tokenizer", None)
        if request.HasField("instruction") and tokenizer is not None and not getattr(
                tokenizer, "takes_instruction", False):
            raise invalid(f"instruction is only taken by LLM rerankers (a prompt template); the served model is a "
                          f"{self.engine.model.config.family} cross-encoder: omit instruction")

    def validate_score(self, request: pb.ScoreRequest) -> list[tuple[str, str]]:
        """-> the (text_1, text_2) pairs in order; raises ApiError naming the offending field."""
        if request.HasField("model"):
            self.check_model(request.model)
        if not request.HasField("text_1") or not request.HasField("text_2"):
            raise invalid("text_1 and text_2 are required: a string or a list of strings each")
        self.check_instruction(request)
        first, second = _texts(request.text_1, "text_1"), _texts(request.text_2, "text_2")
        self.check_count("text_2", len(second))
        if len(first) not in (1, len(second)):
            raise invalid(f"text_1 must be one string or as many as text_2 ({len(second)}), got {len(first)}")
        if not first or not all(first):
            raise invalid("text_1 must hold non-empty strings")
        return list(zip(first * len(second) if len(first) == 1 else first, second, strict=True))

    def _require_ready(self) -> None:
        if not self.ready:
            raise self.not_serving()

    async def _within(self, work, deadline: Deadline | None):
        """Runs ``work`` (validation done) under the transport's deadline, if any."""
        if deadline is None:
            return await work
        try:
            return await asyncio.wait_for(work, deadline.seconds)
        except asyncio.TimeoutError:  # the scoring task was cancelled: its queued pairs are dropped
            raise ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded: the request took longer than "
                           f"its Grpc-Timeout ({deadline.text})") from None

    @counted_in_flight
    async def rerank(self, request: pb.RerankRequest, call: Call | None = None,
                     deadline: Deadline | None = None, documents_field: str = "documents") -> pb.RerankResponse:
        call = call or Call()
        created = int(time.time())
        texts = await self.off_loop(self.validate, request, documents_field)
        self._require_ready()
        chunks = request.max_chunks_per_doc if request.HasField("max_chunks_per_doc") else 1
        logits, best_chunk, tokens = await self._within(self._score_groups(
            [(request.query, texts)], call, chunks=chunks,
            max_doc_tokens=request.max_tokens_per_doc if request.HasField("max_tokens_per_doc") else None,
            keep_end=request.truncation_direction == pb.RerankRequest.LEFT,
            truncate=not request.HasField("truncate") or request.truncate,
            instruction=request.instruction if request.HasField("instruction") else None), deadline)
        scores = logits if request.raw_scores else [sigmoid(x) for x in logits]
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        if request.HasField("top_n"):
            order = order[: request.top_n]
        response = pb.RerankResponse(
            object="rerank", id=f"rerank-{call.request_id}", model=self.model_id, created=created,
            usage=pb.Usage(prompt_tokens=tokens, total_tokens=tokens),
        )
        for i in order:
            result = response.results.add(index=i, relevance_score=scores[i])
            if request.HasField("max_chunks_per_doc"):
                result.chunk_index = best_chunk[i]
            if request.return_documents:
                result.document.CopyFrom(request.documents[i])
        self._observe(call)
        return response

    @counted_in_flight
    async def score(self, request: pb.ScoreRequest, call: Call | None = None,
                    deadline: Deadline | None = None) -> pb.ScoreResponse:
        call = call or Call()
        created = int(time.time())
        pairs = await self.off_loop(self.validate_score, request)
        self._require_ready()
        # pairs that share text_1 are tokenized together (the query once), then put back in order
        groups: dict[str, list[int]] = {}
        for i, (first, _) in enumerate(pairs):
            groups.setdefault(first, []).append(i)
        logits, _, tokens = await self._within(self._score_groups(
            [(first, [pairs[i][1] for i in members]) for first, members in groups.items()], call,
            truncate=not request.HasField("truncate") or request.truncate,
            instruction=request.instruction if request.HasField("instruction") else None), deadline)
        by_pair = [0.0] * len(pairs)
        for logit, i in zip(logits, (i for members in groups.values() for i in members), strict=True):
            by_pair[i] = logit
        response = pb.ScoreResponse(id=f"score-{call.request_id}", object="list", created=created,
                                    model=self.model_id, usage=pb.Usage(prompt_tokens=tokens, total_tokens=tokens))
        for i, logit in enumerate(by_pair):
            response.data.add(index=i, object="score", score=logit if request.raw_scores else sigmoid(logit))
        self._observe(call)
        return response

    async def _score_groups(self, groups: list[tuple[str, list[str]]], call: Call, chunks: int = 1,
                            max_doc_tokens: int | None = None, keep_end: bool = False,
                            truncate: bool = True, instruction: str | None = None,
                            ) -> tuple[list[float], list[int], int]:
        """(query, documents) groups -> (one logit per document, in group order; the best
        window of each; the tokens fed to the model). The one scoring path of every route.
        ``instruction``: an LLM reranker's (validated: cross-encoders never get one)."""
        extra = {} if instruction is None else {"instruction": instruction}
        t0 = time.perf_counter()
        pairs, owner, n_documents, tokens = [], [], 0, 0
        for query, documents in groups:
            try:
                group_pairs, group_owner = await self.off_loop(
                    self.engine.tokenizer.encode_chunked, query, documents, max_doc_tokens, chunks,
                    keep_end=keep_end, truncate=truncate, max_tokens=self.max_request_tokens - tokens, **extra)
            except PairTooLongError as e:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(e), Reason.TOO_LONG) from None
            except RequestTooLargeError:
                raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(RequestTooLargeError(self.max_request_tokens)),
                               Reason.TOO_LARGE) from None
            tokens += sum(len(p) for p in group_pairs)
            pairs += group_pairs
            owner += [n_documents + o for o in group_owner]
            n_documents += len(documents)
        call.timings["tokenize"] = time.perf_counter() - t0
        # identical pairs (duplicate documents) are scored once: equal scores tie exactly, and
        # the compute is not spent twice
        # (the key: token type start, then the ids; equal ids split into other types differ)
        unique: dict[tuple[int, ...], int] = {}
        slot = [unique.setdefault((token_type_start(p), *p), len(unique)) for p in pairs]
        distinct = [EncodedPair(key[1:], key[0]) for key in unique]
        try:
            unique_logits = await self.scheduler.score(distinct, call.timings)
            window_logits = [unique_logits[i] for i in slot]
        except QueueFullError as e:
            raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except ShuttingDownError as e:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except RuntimeError as e:
            raise ApiError(grpc.StatusCode.INTERNAL, str(e)) from None
        logits, best_chunk = [-math.inf] * n_documents, [0] * n_documents
        chunk = 0
        for i, (doc, logit) in enumerate(zip(owner, window_logits, strict=True)):
            chunk = chunk + 1 if i and owner[i - 1] == doc else 0
            if logit > logits[doc]:
                logits[doc], best_chunk[doc] = logit, chunk
        return logits, best_chunk, tokens  # every pair counts, duplicates included

    def _observe(self, call: Call) -> None:
        call.timings["total"] = time.perf_counter() - call.started
        for stage in ("tokenize", "queue", "inference"):
            self.metrics.stage_seconds.labels(stage).observe(call.timings.get(stage, 0.0))


def _texts(value: struct_pb2.Value, name: str) -> list[str]:
    """A string or a list of strings -> the list."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return [value.string_value]
    if kind == "list_value":
        wrong = next((v for v in value.list_value.values if v.WhichOneof("kind") != "string_value"), None)
        if wrong is None:
            return [v.string_value for v in value.list_value.values]
        raise invalid(f"{name} must be a string or an array of strings; got an array holding {value_kind(wrong)}")
    raise invalid(f"{name} must be a string or an array of strings; got {value_kind(value)}")
