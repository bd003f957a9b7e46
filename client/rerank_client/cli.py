"""``rerank`` / ``python -m rerank_client``: rank documents against a query from the shell.

Example::

    rerank "What is machine learning?" "ML is a subset of AI." "The weather is sunny." --top-n 1
    printf 'doc one\\ndoc two\\n' | rerank "query" --file - --transport http --url http://localhost:8000 --json
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import json_format

from rerank_client.client import (
    DEFAULT_MODEL,
    MAX_RETRIES,
    RerankClient,
    RerankError,
    RerankResponse,
    build_request,
)
from rerank_client.http import post_rerank


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rerank", description="Rank documents by relevance to a query "
                                "with a rerank server (gRPC rerank.v1.Rerank or REST POST /v1/rerank).")
    p.add_argument("query")
    p.add_argument("documents", nargs="*", help="documents (more with --file)")
    p.add_argument("--file", "-f", help="documents, one per line (blank lines skipped); - for stdin")
    p.add_argument("--top-n", type=int, help="only the best N")
    p.add_argument("--raw-scores", action="store_true", help="raw logits instead of sigmoid scores")
    p.add_argument("--return-documents", action="store_true", help="ask the server to echo the documents")
    p.add_argument("--transport", choices=("grpc", "http"), default="grpc")
    p.add_argument("--target", default=os.environ.get("RERANK_TARGET", "localhost:50051"),
                   help="gRPC target: host:port, dns:///host:port (all its addresses), "
                        "ipv4:10.0.0.1:50051,10.0.0.2:50051 (default: %(default)s; env RERANK_TARGET)")
    p.add_argument("--url", default=os.environ.get("RERANK_URL", "http://localhost:8000"),
                   help="REST base URL, or several comma-separated (a refused connection or 503 is retried "
                        "on the next) (default: %(default)s; env RERANK_URL)")
    p.add_argument("--max-retries", type=int, default=MAX_RETRIES,
                   help=f"retries of a call that failed with UNAVAILABLE / 503, on another replica "
                        f"(0..{MAX_RETRIES}; default: %(default)s)")
    p.add_argument("--load-balancing", choices=("round_robin", "pick_first"), default="round_robin",
                   help="gRPC: spread calls over every address of the target, or use one (default: %(default)s)")
    p.add_argument("--service-config", help="gRPC service config (JSON) replacing the client's own "
                   "(balancing, health checking, retries)")
    p.add_argument("--api-key", default=os.environ.get("RERANK_API_KEY"), help="API key (env RERANK_API_KEY)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="default: %(default)s")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds (default: %(default)s)")
    p.add_argument("--tls", action="store_true", help="gRPC over TLS (system roots, or --ca-cert)")
    p.add_argument("--ca-cert", help="PEM file of root certificates to trust (gRPC TLS and https URLs)")
    p.add_argument("--json", action="store_true", help="print the JSON response instead of a table")
    args = p.parse_args(argv)
    if not 0 <= args.max_retries <= MAX_RETRIES:
        p.error(f"--max-retries must be in 0..{MAX_RETRIES}")
    if args.service_config:
        try:
            json.loads(args.service_config)
        except ValueError as e:
            p.error(f"--service-config is not JSON: {e}")
    if args.file:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        args.documents += [line for line in text.splitlines() if line.strip()]
    if not args.documents:
        p.error("no documents: pass them as arguments or with --file")
    return args


def table(response: RerankResponse, documents: Sequence[str]) -> str:
    rows = [f"{'rank':>4}  {'index':>5}  {'score':>10}  document"]
    for rank, r in enumerate(response.results, 1):
        doc = r.document if r.document is not None else documents[r.index]
        text = doc if isinstance(doc, str) else json.dumps(doc, ensure_ascii=False)
        text = " ".join(text.split())
        rows.append(f"{rank:>4}  {r.index:>5}  {r.relevance_score:>10.6f}  "
                    f"{text[:80] + ('...' if len(text) > 80 else '')}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    request = build_request(args.query, args.documents, model=args.model, top_n=args.top_n,
                            return_documents=args.return_documents, raw_scores=args.raw_scores)
    ca = Path(args.ca_cert).read_bytes() if args.ca_cert else None
    try:
        if args.transport == "http":
            context = ssl.create_default_context(cadata=ca.decode()) if ca else None
            body = post_rerank(args.url, request, api_key=args.api_key, timeout=args.timeout, context=context,
                               max_retries=args.max_retries)
        else:
            with RerankClient(args.target, api_key=args.api_key, secure=args.tls, root_certificates=ca,
                              timeout=args.timeout, max_retries=args.max_retries,
                              load_balancing=args.load_balancing, service_config=args.service_config) as client:
                body = json_format.MessageToDict(client.rerank_pb(request), preserving_proto_field_name=True,
                                                 always_print_fields_with_no_presence=True)
    except RerankError as e:
        print(f"error: {e.code.name}: {e.message}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2, ensure_ascii=False) if args.json
          else table(RerankResponse.from_json(body), args.documents))
    return 0


if __name__ == "__main__":
    sys.exit(main())
