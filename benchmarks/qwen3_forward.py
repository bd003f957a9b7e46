"""Qwen3-Reranker forward benchmark: ours (with and without the shared prefix) against transformers'
Qwen3ForCausalLM scoring the same pairs the model card's way (one left-padded batch, the last
position's yes/no logits), on random weights of Qwen3-Reranker-0.6B's shapes.

    python -m benchmarks.qwen3_forward --documents 16 100 --dtype float32

Figures: pair tokens/s (every pair's tokens, as transformers computes them, whatever sharing
spared), the ratio to transformers in the same run, and the fraction of the measured GEMM rate
of the dtype achieved on the tokens actually computed. Every timed run records the machine's
load (MachineLoad); a results file from a shared machine says so.
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.measure import MachineLoad, cpu_facts, device_description, git_commit, slug, summarize, time_runs
from rerank_server.checkpoint import write_qwen3_checkpoint
from rerank_server.engine import Engine
from rerank_server.models.qwen3 import build_batch

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("the of and a to in is was for on with as by at from city river history population capital known "
         "mountain north south language people century government built century museum park bridge").split()
QUERY = "What is the capital of China?"


def documents(n: int, seed: int, words: tuple[int, int]) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))).capitalize() + "." for _ in range(n)]


def matmul_flops_per_token(c) -> float:
    """2 x the GEMM parameters of a layer x layers (the last layer's last-token-only saving ignored)."""
    H, D, FF = c.hidden_size, c.head_dim, c.intermediate_size
    per_layer = H * (c.num_heads + 2 * c.num_kv_heads) * D + c.num_heads * D * H + 3 * H * FF
    return 2.0 * per_layer * c.num_layers


def gemm_rate(engine: Engine, rows: int = 512) -> float:
    """GFLOP/s of the model's own packed gate/up GEMM (the chosen library) at ``rows`` rows: the
    best of 7 calls (on a shared machine the median mostly measures the neighbours)."""
    layer, c = engine.model.layers[0], engine.model.config
    x = torch.randn(rows, c.hidden_size).to(engine.model.dtype)
    layer.gate_up(x)
    runs = summarize(time_runs(lambda: layer.gate_up(x), 7, torch.device("cpu")))
    return 2.0 * rows * c.hidden_size * 2 * c.intermediate_size / runs["min_s"] / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, nargs="+", default=[16, 100])
    parser.add_argument("--words", type=int, nargs=2, default=[20, 120], help="document length range, in words")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--layers", type=int, default=28,
                        help="28: Qwen3-Reranker-0.6B (fewer: the same shapes, in less time)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quiet-wait", type=float, default=0.0,
                        help="before each timed run, wait up to this many seconds for the neighbours to quiet down")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_qwen3_checkpoint(Path(tmp), "full", seed=0, num_hidden_layers=args.layers)
        engine = Engine.load(str(path), "cpu", dtype=args.dtype)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    c = engine.model.config
    yes, no = engine.model.answer_ids
    rates, rows = [], []
    for n in args.documents:
        rate = gemm_rate(engine)  # beside each row's runs, and the best of all for the fractions below
        rates.append(rate)
        pairs = engine.tokenizer.encode_pairs(QUERY, documents(n, seed=n, words=tuple(args.words)))
        unshared = [list(p) for p in pairs]  # plain lists: no prefix, every pair from position 0
        tokens = sum(map(len, pairs))
        batch = build_batch(pairs)
        width = max(map(len, pairs))
        ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in pairs])  # left padding, as the card
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in pairs])

        def transformers_scores(ids=ids, mask=mask):
            with torch.inference_mode():
                last = hf(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1, :]
            return (last[:, yes] - last[:, no]).float()

        reference = transformers_scores()  # also the warm-up of both
        shared_scores = torch.tensor(engine.forward(pairs))
        engine.forward(unshared[:2])
        computed = {"ours-shared-prefix": tokens - batch.shared_rows, "ours-no-sharing": tokens,
                    "transformers-padded": width * n}
        row = {"documents": n, "pair_tokens": tokens, "shared_prefix_tokens": pairs[0].type_start,
               "tokens_computed": computed, "backends": {},
               "max_abs_diff_vs_transformers": float((shared_scores - reference).abs().max())}
        for name, fn in (("ours-shared-prefix", lambda pairs=pairs: engine.forward(pairs)),
                         ("ours-no-sharing", lambda unshared=unshared: engine.forward(unshared)),
                         ("transformers-padded", transformers_scores)):
            runs = time_runs(fn, args.repeats, torch.device("cpu"), quiet_wait_s=args.quiet_wait)
            s = summarize(runs)
            seconds = s["median_s"]
            row["backends"][name] = {**s, "runs": runs, "pair_tokens_per_s": tokens / seconds,
                                     "computed_tokens_per_s": computed[name] / seconds,
                                     "matmul_gflops": matmul_flops_per_token(c) * computed[name] / seconds / 1e9,
                                     "fraction_of_gemm_rate": matmul_flops_per_token(c) * computed[name] / seconds
                                     / 1e9 / max(rates)}
            print(f"1 x {n} documents, {tokens} pair tokens: {name} {tokens / seconds:.0f} pair tokens/s "
                  f"({computed[name]} computed, {row['backends'][name]['fraction_of_gemm_rate']:.0%} of the GEMM rate"
                  f"{', contended' if s['contended'] else ''})", flush=True)
        base = row["backends"]["transformers-padded"]["pair_tokens_per_s"]
        for b in row["backends"].values():
            b["ratio_to_transformers"] = b["pair_tokens_per_s"] / base
        rows.append(row)
    with MachineLoad() as load:
        time.sleep(1)
    result = {
        "benchmark": "qwen3_forward", "date": started.isoformat(timespec="seconds"), **git_commit(),
        "device": device_description(torch.device("cpu")), "cpu": cpu_facts(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "dtype": args.dtype,
        "model": f"Qwen3-Reranker-0.6B shapes, random weights, {args.layers} of 28 layers",
        "transformers_scoring": "one left-padded batch of every pair, logits_to_keep=1 (the last position only; "
                                "the card's code computes every position's vocabulary logits, which costs more)",
        "gemm_rate_gflops": rates, "cpu_gemm_choices": engine.model.ops.choices,
        "machine_load_after": {"foreign_cpus": load.foreign_cpus},
        "note": "measured on a shared 2-core machine under contention from other processes: each run records "
                "foreign_cpus (CPUs used by others); contended runs are flagged, and the figures are lower bounds",
        "rows": rows,
    }
    out = args.out or RESULTS / f"qwen3-forward-{slug(result['device'])}-{args.dtype}-{started.date()}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
