"""What --dtype bfloat16 costs on the CPU: the same random checkpoint loaded in float32 and in
bfloat16 (each with the GEMMs the server would choose), the same queries' documents scored by
both; reports the logit error against float32 (max, mean; transformers' own bf16 error beside it
when transformers is installed), the ranking changes (top-k overlap, Kendall tau), and both
forwards' speed (a noisy single run: indicative only). Writes a JSON under benchmarks/results/.

    python -m benchmarks.fidelity [--size small] [--layers N] [--queries 24] [--documents 32]
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import rerank_kernels
from benchmarks.measure import REPO, device_description, git_commit, slug
from rerank_server.checkpoint import write_random_checkpoint
from rerank_server.engine import Engine

RESULTS = REPO / "benchmarks" / "results"


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two score lists over the same items (ties counted as neither)."""
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    n0 = concordant + discordant
    denominator = ((n0 + ties_a) * (n0 + ties_b)) ** 0.5
    return (concordant - discordant) / denominator if denominator else 1.0


def top(scores: list[float], k: int) -> set[int]:
    return set(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def workload(queries: int, documents: int, vocab: int, seed: int) -> list[list[list[int]]]:
    """Per query, ``documents`` pairs of 16-400 token ids sharing the query's first tokens."""
    rng = random.Random(seed)
    batches = []
    for _ in range(queries):
        query = [rng.randrange(5, vocab) for _ in range(rng.randrange(4, 24))]
        batches.append([[0, *query, 2, 2, *(rng.randrange(5, vocab) for _ in range(rng.randrange(12, 380))), 2]
                        for _ in range(documents)])
    return batches


def score_all(engine: Engine, batches: list[list[list[int]]]) -> tuple[list[list[float]], float]:
    """-> (logits per query, tokens per second over all batches)."""
    engine.forward(batches[0])  # warm-up
    started = time.perf_counter()
    logits = [engine.forward(batch) for batch in batches]
    return logits, sum(len(p) for batch in batches for p in batch) / (time.perf_counter() - started)


def transformers_bf16_error(checkpoint: Path, batches: list[list[list[int]]], limit: int = 64) -> float | None:
    """Max |logit| error of transformers' own bf16 model against its fp32, on the first
    ``limit`` pairs (one at a time, unpadded); None without transformers."""
    try:
        from transformers import XLMRobertaForSequenceClassification
    except ImportError:
        return None
    pairs = [torch.tensor(p)[None] for batch in batches for p in batch][:limit]
    errors = []
    fp32 = XLMRobertaForSequenceClassification.from_pretrained(checkpoint, attn_implementation="sdpa").eval()
    bf16 = XLMRobertaForSequenceClassification.from_pretrained(checkpoint, attn_implementation="sdpa",
                                                               dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        for ids in pairs:
            errors.append(abs(bf16(input_ids=ids).logits.float().item() - fp32(input_ids=ids).logits.item()))
    return max(errors)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", choices=("tiny", "small", "full"))
    p.add_argument("--layers", type=int, default=None, help="override the size's layer count")
    p.add_argument("--queries", type=int, default=24)
    p.add_argument("--documents", type=int, default=32, help="documents per query (one forward batch each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/fidelity-bf16-<cpu>-<date>.json")
    args = p.parse_args(argv)
    if rerank_kernels.native_bf16_missing():
        sys.exit(f"bfloat16 is not native here: {rerank_kernels.native_bf16_missing()}")
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_random_checkpoint(Path(tmp), args.size, seed=args.seed, **overrides)
        config = json.loads((checkpoint / "config.json").read_text())
        batches = workload(args.queries, args.documents, config["vocab_size"], args.seed)
        runs = {}
        for dtype in ("float32", "bfloat16"):
            engine = Engine.load(str(checkpoint), "cpu", dtype=dtype)
            logits, tokens_per_s = score_all(engine, batches)
            runs[dtype] = {"logits": logits, "tokens_per_s": round(tokens_per_s, 1),
                           "gemm_choices": {kind: entry["chosen"] for kind, entry in
                                            engine.model.ops.choices["cpu_gemm"]["by_kind"].items()}}
            del engine
        hf_error = transformers_bf16_error(checkpoint, batches)
    f32, b16 = runs["float32"]["logits"], runs["bfloat16"]["logits"]
    errors = [abs(x - y) for q32, q16 in zip(f32, b16, strict=True) for x, y in zip(q32, q16, strict=True)]
    spread = statistics.pstdev(x for q in f32 for x in q)
    taus = [kendall_tau(q32, q16) for q32, q16 in zip(f32, b16, strict=True)]
    overlap = {f"top{k}_overlap": round(statistics.mean(len(top(q32, k) & top(q16, k)) / k
                                                        for q32, q16 in zip(f32, b16, strict=True)), 4)
               for k in (1, 3, 10) if k <= args.documents}
    result = {
        "what": "bfloat16 vs float32 on the CPU, the same random checkpoint and pairs (ours, GEMMs as chosen at load)",
        "cpu": device_description(torch.device("cpu")),
        "native_bf16": {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
                        "amx": torch.cpu._is_amx_tile_supported()},
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **git_commit(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "checkpoint": {"size": args.size, "layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
                       "seed": args.seed, "weights": "random"},
        "queries": args.queries, "documents_per_query": args.documents,
        "pairs": len(errors), "tokens": sum(len(p) for batch in batches for p in batch),
        "logit_error": {"max": max(errors), "mean": statistics.mean(errors), "float32_logit_std": spread,
                        "transformers_bf16_max_on_64_pairs": hf_error},
        "ranking": {**overlap, "kendall_tau_mean": round(statistics.mean(taus), 4),
                    "kendall_tau_min": round(min(taus), 4),
                    "queries_with_identical_order": sum(
                        sorted(range(len(a)), key=lambda i: -a[i]) == sorted(range(len(b)), key=lambda i: -b[i])
                        for a, b in zip(f32, b16, strict=True))},
        "speed_tokens_per_s": {dtype: runs[dtype]["tokens_per_s"] for dtype in runs},
        "speed_note": "one run each on a possibly shared machine: indicative only",
        "gemm_choices": {dtype: runs[dtype]["gemm_choices"] for dtype in runs},
    }
    out = args.out or RESULTS / f"fidelity-bf16-{slug(result['cpu'])}-{result['date'][:10]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("cpu", "logit_error", "ranking", "speed_tokens_per_s")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
