"""End to end over REST, as a user calls it, against onnxruntime one pair at a time.

    python -m benchmarks.rest_e2e                 # full-size random model, 16 mixed documents (~4 min)
    python -m benchmarks.rest_e2e --quick         # tiny model: a smoke test of this script
    python -m benchmarks.rest_e2e --server-args "--dtype bfloat16"
    python -m benchmarks.rest_e2e --dtypes float32,bfloat16,int8 --peers all   # the int8 comparison

One request: a query and ``--docs`` documents of mixed lengths (lognormal token targets as the
forward benchmark's mixed workload, median 96, filled with common English words), sent
``--repeats`` times to ``POST /v1/rerank`` of a ``rerank-server`` started on loopback (as
benchmarks.load starts it); the median time includes HTTP, JSON, tokenizing, scheduling and the
forward. onnxruntime (the ``bench`` extra) tokenizes the same pairs with the same tokenizer and
scores each pair alone, in this process (no HTTP: it is given that for free). Figures are real
tokens (every pair, special tokens included) per second; target: ours >= 1.2x onnxruntime.

``--dtypes`` starts one server per --dtype in turn; ``--peers`` adds the CPU peers of
benchmarks.peers (onnxruntime fp32 and int8, OpenVINO f32 and bf16), each in its own process, on
the same token ids (their tokenizing is not timed); target: ours int8 >= 1.2x onnxruntime int8.

Results go to ``benchmarks/results/rest-e2e-<checkpoint>-cpu-<cpu>-<YYYY-MM-DD>.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import random
import shlex
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import torch

from benchmarks.checkpoints import ensure_checkpoint
from benchmarks.load import MODEL_NAME, Server, sentence
from benchmarks.measure import MachineLoad, cpu_facts, device_description, git_commit, slug, wait_quiet
from benchmarks.onnx_baseline import OnnxPerPair, ensure_onnx, onnx_unavailable_reason
from benchmarks.peers import PEERS, run_peers
from rerank_server.engine import Engine

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
TARGET_OVER_ONNX = 1.2
TARGET_INT8_OVER_ONNX_INT8 = 1.2
MEDIAN_DOC_TOKENS, SIGMA = 96, 0.9


def make_request(checkpoint: Path, n_docs: int, seed: int) -> tuple[str, list[str], list[list[int]]]:
    """(query, documents, the token ids of each pair as the server's tokenizer makes them)."""
    tokenizer = Engine.load_tokenizer(checkpoint)
    rng, lengths = random.Random(seed), np.random.default_rng(seed)
    query = sentence(rng, 9)
    documents = []
    for target in np.clip(np.rint(lengths.lognormal(math.log(MEDIAN_DOC_TOKENS), SIGMA, n_docs)), 8, 1500):
        words = []
        while len(tokenizer.encode_pairs(query, [" ".join(words)])[0]) < target:
            words.append(sentence(rng, rng.randint(6, 20)))
        documents.append(" ".join(words))
    return query, documents, tokenizer.encode_pairs(query, documents)


async def time_rest(server: Server, body: bytes, repeats: int, quiet_wait: float) -> list[dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await server.wait_ready(session)
        runs = []
        for i in range(repeats + 1):  # the first is a warm-up
            wait_quiet(quiet_wait)
            with MachineLoad(measured=(server.ps,)) as load:  # the server's CPU is what is timed
                async with session.post(server.url + "/v1/rerank", data=body,
                                        headers={"Content-Type": "application/json"}) as r:
                    text = await r.text()
            if r.status != 200:
                raise RuntimeError(f"POST /v1/rerank answered {r.status}: {text[:500]}")
            if i:
                runs.append({"s": load.wall, "foreign_cpus": load.foreign_cpus, "contended": load.contended})
        return runs


def time_onnx(checkpoint: Path, query: str, documents: list[str], repeats: int, quiet_wait: float) -> list[dict]:
    """Tokenize (the server's tokenizer) and score each pair alone, ``repeats`` times after a warm-up."""
    tokenizer = Engine.load_tokenizer(checkpoint)
    runner = OnnxPerPair(ensure_onnx(checkpoint), torch.get_num_threads())

    def once():
        return runner([np.asarray(p, dtype=np.int64) for p in tokenizer.encode_pairs(query, documents)])
    once()
    runs = []
    for _ in range(repeats):
        wait_quiet(quiet_wait)
        with MachineLoad() as load:
            once()
        runs.append({"s": load.wall, "foreign_cpus": load.foreign_cpus, "contended": load.contended})
    return runs


def summary(runs: list[dict], tokens: int) -> dict:
    clean = [r["s"] for r in runs if not r["contended"]]
    median = statistics.median(clean or [r["s"] for r in runs])
    return {"runs": runs, "median_s": median, "clean_runs": len(clean), "tokens_per_s": tokens / median,
            "contended": not clean}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="model directory (default: the full-size random checkpoint)")
    p.add_argument("--quick", action="store_true", help="tiny model, 3 repeats: a smoke test")
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--repeats", type=int, help="timed requests (default 5; 3 quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet-wait", type=float, help="wait up to this long for a quiet machine before each run "
                                                    "(default 30 s; 0 quick)")
    p.add_argument("--server-args", default="", help="more rerank-server flags, e.g. \"--dtype bfloat16\"")
    p.add_argument("--skip-onnx", action="store_true", help="time ours only")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the server and of every peer (default: torch's choice); 1 keeps a contended "
                        "machine's OpenMP barriers from stalling 2-thread runs")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated --dtype values: one server each, in turn (default: one server)")
    p.add_argument("--peers", default="", help=f"'all' or comma-separated of {', '.join(PEERS)}: each in its own "
                                               "process on the same token ids")
    p.add_argument("--out", type=Path, help="results file (default under benchmarks/results/)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 30.0)
    checkpoint = (args.checkpoint or ensure_checkpoint("tiny" if args.quick else "full")).resolve()
    started = time.perf_counter()
    query, documents, pairs = make_request(checkpoint, args.docs, args.seed)
    tokens = sum(map(len, pairs))
    print(f"one request: a query and {len(documents)} documents, {tokens} tokens "
          f"(pairs {min(map(len, pairs))}..{max(map(len, pairs))}); checkpoint {checkpoint}", flush=True)

    body = json.dumps({"model": MODEL_NAME, "query": query, "documents": documents}).encode()
    logs = Path(tempfile.mkdtemp(prefix="rerank-e2e-"))
    by_dtype = {}
    for dtype in (args.dtypes.split(",") if args.dtypes else [None]):
        server = Server(checkpoint, logs / f"server-{dtype}.log", *shlex.split(args.server_args),
                        *(("--dtype", dtype) if dtype else ()), threads=args.threads)
        try:
            ours = summary(asyncio.run(time_rest(server, body, repeats, quiet_wait)), tokens)
        finally:
            server.stop()
        by_dtype[dtype or "as --server-args"] = ours
        print(f"ours over REST{f' ({dtype})' if dtype else ''}: median {ours['median_s'] * 1e3:.0f} ms -> "
              f"{ours['tokens_per_s']:,.0f} tokens/s{' (CONTENDED)' if ours['contended'] else ''}", flush=True)
    ours = next(iter(by_dtype.values()))
    record = {"benchmark": "rest_e2e", "date": datetime.date.today().isoformat(),
              "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "device": {"type": "cpu", "description": device_description(torch.device("cpu")), **cpu_facts()},
              "git": git_commit(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "quick": args.quick, "model": {"checkpoint": checkpoint.name}, "server_args": args.server_args,
              "request": {"docs": len(documents), "tokens": tokens, "pair_tokens": [len(q) for q in pairs]},
              "ours_rest": ours, "ours_rest_by_dtype": by_dtype, "onnxruntime": None, "targets": {}}
    reason = "--skip-onnx" if args.skip_onnx else onnx_unavailable_reason()
    if reason is None:
        ort = summary(time_onnx(checkpoint, query, documents, repeats, quiet_wait), tokens)
        ratio = ours["tokens_per_s"] / ort["tokens_per_s"]
        record["onnxruntime"] = ort
        record["targets"][f"ours_rest_over_onnxruntime_per_pair>={TARGET_OVER_ONNX}"] = {
            "value": ratio, "pass": ratio >= TARGET_OVER_ONNX, "contended": ours["contended"] or ort["contended"]}
        print(f"onnxruntime one pair at a time (tokenizing included, no HTTP): median {ort['median_s'] * 1e3:.0f} ms"
              f" -> {ort['tokens_per_s']:,.0f} tokens/s", flush=True)
        print(f"  {'PASS' if ratio >= TARGET_OVER_ONNX else 'FAIL'}  ours over REST / onnxruntime per pair = "
              f"{ratio:.2f} (target >= {TARGET_OVER_ONNX})", flush=True)
    else:
        print(f"note: onnxruntime not run: {reason}")
    names = PEERS if args.peers == "all" else tuple(n for n in args.peers.split(",") if n)
    if names:
        peers = run_peers(checkpoint, pairs, names, repeats=repeats, quiet_wait=quiet_wait, threads=args.threads)
        record["peers"] = {name: {k: v for k, v in r.items() if k != "logits"} for name, r in peers.items()}
        record["peers_note"] = "each peer in its own process, one pair at a time, on the same token ids " \
                               "(tokenizing and HTTP not timed for them)"
        int8, peer = by_dtype.get("int8"), peers.get("onnxruntime-int8", {})
        if int8 and "tokens_per_s" in peer:
            ratio = int8["tokens_per_s"] / peer["tokens_per_s"]
            record["targets"][f"ours_int8_rest_over_onnxruntime_int8>={TARGET_INT8_OVER_ONNX_INT8}"] = {
                "value": ratio, "pass": ratio >= TARGET_INT8_OVER_ONNX_INT8,
                "contended": int8["contended"] or peer["contended"]}
            print(f"  {'PASS' if ratio >= TARGET_INT8_OVER_ONNX_INT8 else 'FAIL'}  ours int8 over REST / onnxruntime "
                  f"int8 per pair = {ratio:.2f} (target >= {TARGET_INT8_OVER_ONNX_INT8})", flush=True)
    loads = [r["foreign_cpus"] for o in by_dtype.values() for r in o["runs"] if r["foreign_cpus"] is not None]
    record["machine_load"] = {"median_foreign_cpus": statistics.median(loads) if loads else None,
                              "note": "other processes used this much of the machine (CPUs) during our runs: "
                                      "figures measured under contention are lower bounds"}
    record["wall_s"] = time.perf_counter() - started
    out = args.out or RESULTS_DIR / (f"rest-e2e-{slug(checkpoint.name)}-cpu-{slug(record['device']['description'])}-"
                                     f"{record['date']}{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} ({record['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
