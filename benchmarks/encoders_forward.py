"""ModernBERT and DeBERTa-v2 forward benchmark: ours (unpadded) against transformers' sequence
classifier on one right-padded batch of the same pairs, on random weights of
gte-reranker-modernbert-base's and mxbai-rerank-xsmall-v1's / -base-v1's shapes; and ModernBERT at
one long pair (8,192 tokens by default) with its local layers against the same model with every
layer global (full attention), which is what the window saves.

    python -m benchmarks.encoders_forward --documents 16 --long 8192 --modernbert-layers 3

Figures: pair tokens/s and the ratio to transformers in the same run, by wall time and by this
process's CPU time (what a forward cost where neighbours take the cores). Every timed run records the
machine's load (MachineLoad); a results file from a shared machine says so.
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.measure import MachineLoad, cpu_facts, device_description, git_commit, slug, summarize, time_runs
from rerank_server.encoder_checkpoints import DEBERTA_VOCAB, MODERNBERT_VOCAB, write_encoder_checkpoint
from rerank_server.engine import Engine

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("the of and a to in is was for on with as by at from city river history population capital known "
         "mountain north south language people century government built museum park bridge").split()
QUERY = "What is the capital of France?"
CPU = torch.device("cpu")


def documents(n: int, seed: int, words: tuple[int, int]) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))).capitalize() + "." for _ in range(n)]


def timed(fn, repeats: int) -> dict:
    """Wall-time summary, and the CPU seconds this process spent per run (on a contended machine
    the wall time mostly measures the neighbours; the CPU time is what the forward cost)."""
    runs = time_runs(fn, repeats, CPU)
    for r in runs:
        r["cpu_s"] = r["s"] * r["ours_cpus"]
    return {**summarize(runs), "median_cpu_s": statistics.median(r["cpu_s"] for r in runs), "runs": runs}


def compare(path: Path, pairs_of: list[str], repeats: int, dtype: str) -> dict:
    """Ours and transformers on the same pairs: pair tokens/s each, their ratio, the max logit diff."""
    from transformers import AutoModelForSequenceClassification
    engine = Engine.load(str(path), "cpu", dtype=dtype)
    hf = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    pairs = engine.tokenizer.encode_pairs(QUERY, pairs_of)
    tokens, width = sum(map(len, pairs)), max(map(len, pairs))
    ids = torch.tensor([list(p) + [0] * (width - len(p)) for p in pairs])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in pairs])

    def transformers_scores():
        with torch.inference_mode():
            return hf(input_ids=ids, attention_mask=mask).logits[:, 0].float()

    diff = float((torch.tensor(engine.forward(pairs)) - transformers_scores()).abs().max())  # also the warm-up
    row = {"documents": len(pairs), "pair_tokens": tokens, "longest": width, "max_abs_diff_vs_transformers": diff,
           "backends": {"ours": timed(lambda: engine.forward(pairs), repeats),
                        "transformers-padded": timed(transformers_scores, repeats)}}
    for b in row["backends"].values():
        b["pair_tokens_per_s"] = tokens / b["median_s"]
        b["pair_tokens_per_cpu_s"] = tokens / b["median_cpu_s"]
    ours, theirs = row["backends"]["ours"], row["backends"]["transformers-padded"]
    row["ratio_to_transformers"] = ours["pair_tokens_per_s"] / theirs["pair_tokens_per_s"]
    row["ratio_to_transformers_cpu"] = ours["pair_tokens_per_cpu_s"] / theirs["pair_tokens_per_cpu_s"]
    return row


def window_vs_full(tmp: Path, length: int, layers: int, repeats: int, dtype: str) -> dict:
    """One pair of ``length`` tokens through ModernBERT-base's shapes with its local layers, and
    with every layer global (the same weights; only the attention's reach differs)."""
    row = {"pair_tokens": length, "layers": layers, "backends": {}}
    for name, every in (("ours-local-layers", 3), ("ours-all-global", 1)):
        path = write_encoder_checkpoint(tmp / name, "modernbert", "full", seed=0, num_hidden_layers=layers,
                                        global_attn_every_n_layers=every)
        engine = Engine.load(str(path), "cpu", dtype=dtype, max_length=length)
        pair = engine.tokenizer.encode_pairs(QUERY, documents(1, seed=1, words=(length, length)))
        assert len(pair[0]) == length
        engine.forward(pair)
        row["backends"][name] = timed(lambda engine=engine, pair=pair: engine.forward(pair), repeats)
        row["backends"][name]["global_layers"] = sum(engine.model.config.global_layers)
        print(f"ModernBERT {layers} layers, 1 x {length} tokens: {name} {row['backends'][name]['median_s']:.2f} s "
              f"({row['backends'][name]['median_cpu_s']:.2f} CPU s)", flush=True)
    local, full = row["backends"]["ours-local-layers"], row["backends"]["ours-all-global"]
    row["full_over_local"] = full["median_s"] / local["median_s"]
    row["full_over_local_cpu"] = full["median_cpu_s"] / local["median_cpu_s"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--words", type=int, nargs=2, default=[20, 300], help="document length range, in words")
    parser.add_argument("--long", type=int, default=8192, help="ModernBERT's long pair, in tokens (0: skip)")
    parser.add_argument("--modernbert-layers", type=int, default=22,
                        help="22: gte-reranker-modernbert-base (fewer: the same shapes, in less time)")
    parser.add_argument("--families", nargs="+", default=["modernbert", "deberta-v2-xsmall", "deberta-v2-base"])
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    shapes = {"modernbert": ("modernbert", "full", dict(num_hidden_layers=args.modernbert_layers)),
              "deberta-v2-xsmall": ("deberta-v2", "small", {}), "deberta-v2-base": ("deberta-v2", "full", {})}
    rows = {}
    docs = documents(args.documents, seed=0, words=tuple(args.words))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families:
            family, size, overrides = shapes[name]
            path = write_encoder_checkpoint(Path(tmp) / name, family, size, seed=0, **overrides)
            rows[name] = compare(path, docs, args.repeats, args.dtype)
            r = rows[name]
            print(f"{name}: 1 x {r['documents']} documents, {r['pair_tokens']} pair tokens: ours "
                  f"{r['backends']['ours']['pair_tokens_per_s']:.0f} pair tokens/s, "
                  f"{r['ratio_to_transformers']:.2f}x transformers, {r['ratio_to_transformers_cpu']:.2f}x in CPU "
                  f"time (max diff {r['max_abs_diff_vs_transformers']:.1e})",
                  flush=True)
        long = window_vs_full(Path(tmp), args.long, args.modernbert_layers, args.repeats, args.dtype) \
            if args.long else None
    with MachineLoad() as load:
        time.sleep(1)
    result = {
        "benchmark": "encoders_forward", "date": started.isoformat(timespec="seconds"), **git_commit(),
        "device": device_description(CPU), "cpu": cpu_facts(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "dtype": args.dtype,
        "models": {"modernbert": f"gte-reranker-modernbert-base shapes, {args.modernbert_layers} of 22 layers",
                   "deberta-v2-xsmall": "mxbai-rerank-xsmall-v1 shapes", "deberta-v2-base": "mxbai-rerank-base-v1 "
                   "shapes", "vocabulary": f"the stand-in tokenizers' (ModernBERT {MODERNBERT_VOCAB}, "
                   f"DeBERTa-v2 {DEBERTA_VOCAB})"},
        "transformers_scoring": "one right-padded batch of every pair with its attention mask (sdpa where the "
                                "model has it; DeBERTa-v2: eager)",
        "machine_load_after": {"foreign_cpus": load.foreign_cpus},
        "note": "measured on a shared 2-core machine under contention from other processes: each run records "
                "foreign_cpus (CPUs used by others) and cpu_s (this process's CPU seconds); contended runs are "
                "flagged, the wall-time figures are lower bounds, and the CPU-time ratios compare what each "
                "forward cost",
        "rows": rows, "modernbert_long_pair": long,
    }
    out = args.out or RESULTS / f"encoders-forward-{slug(result['device'])}-{args.dtype}-{started.date()}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
