"""Writes random-weight reranker checkpoints (XLM-RoBERTa, BERT or Qwen3) around real tokenizers.

Real weights cannot be downloaded everywhere; tests, benchmarks and offline trials use
these. The directory is a normal Hugging Face checkpoint (config.json, model.safetensors,
tokenizer.json), loadable by this server and by ``transformers`` alike.

    rerank-server checkpoint --size tiny --out checkpoints/tiny
    rerank-server checkpoint --size small --out checkpoints/small  # 6 x 384, for CPU load tests
    rerank-server checkpoint --size full --out checkpoints/full    # bge-reranker-v2-m3 shapes
    rerank-server checkpoint --family bert --size small --out checkpoints/bert-small  # ms-marco-MiniLM-L-6-v2 shapes
    rerank-server checkpoint --family qwen3 --size full --out checkpoints/qwen3  # Qwen3-Reranker-0.6B shapes
    rerank-server checkpoint --family modernbert --size full --out checkpoints/mb  # gte-reranker-modernbert-base
    rerank-server checkpoint --family deberta-v2 --size small --out checkpoints/mxbai  # mxbai-rerank-xsmall-v1

(``python -m rerank_server.checkpoint`` is the same.)
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from rerank_server.encoder_checkpoints import FAMILY_WRITERS, write_encoder_checkpoint

# The real XLM-RoBERTa tokenizer (MIT) and uncased BERT WordPiece tokenizer (Apache-2.0), shipped
# as package data (see assets/NOTICE.md); the first also stands in for DeBERTa-v2's, Qwen3's (below)
# for ModernBERT's (rerank_server.encoder_checkpoints).
ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_FIXTURE = ASSETS / "xlm-roberta-tokenizer.json.gz"
BERT_TOKENIZER_FIXTURE = ASSETS / "bert-uncased-tokenizer.json.gz"

# bge-reranker-v2-m3's config.json, less the fields transformers fills by default.
FULL = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
# The shape of the smallest production cross-encoders (MiniLM-L6): what a CPU load test needs,
# a forward that costs far more than the tokenizer, as on a real deployment, yet answers in 0.1 s.
SMALL = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
SIZES = {"tiny": TINY, "small": SMALL, "full": FULL}

# What a BERT cross-encoder's config.json has where XLM-RoBERTa's differs
# (cross-encoder/ms-marco-MiniLM-L-6-v2's, less what transformers fills by default).
BERT = {
    "architectures": ["BertForSequenceClassification"],
    "model_type": "bert",
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}
FAMILIES = {"xlm-roberta": ({}, TOKENIZER_FIXTURE, {
                "tokenizer_class": "XLMRobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>",
                "mask_token": "<mask>"}),
            "bert": (BERT, BERT_TOKENIZER_FIXTURE, {
                "tokenizer_class": "BertTokenizer", "do_lower_case": True, "cls_token": "[CLS]",
                "sep_token": "[SEP]", "unk_token": "[UNK]", "pad_token": "[PAD]", "mask_token": "[MASK]"})}


def hf_config(**overrides) -> dict:
    config = {
        "architectures": ["XLMRobertaForSequenceClassification"],
        "model_type": "xlm-roberta",
        "vocab_size": 250002,
        **FULL,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 8194,
        "type_vocab_size": 1,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "position_embedding_type": "absolute",
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "torch_dtype": "float32",
    }
    config.update(overrides)
    if config["model_type"] == "bert":  # BERT configs name no <s> / </s>
        del config["bos_token_id"], config["eos_token_id"]
    return config


def random_state_dict(config: dict, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Hugging Face tensor names -> random tensors. LayerNorm weights scatter around 1 and
    biases around 0 (not their init values), so a forward that drops one of them fails parity."""
    g = torch.Generator().manual_seed(seed)
    H, FF, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]

    def randn(*shape: int, mean: float = 0.0, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * std + mean).to(dtype)

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": randn(H, mean=1.0, std=0.1), f"{prefix}.bias": randn(H, std=0.1)}

    def linear(prefix: str, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": randn(out_features, in_features), f"{prefix}.bias": randn(out_features, std=0.05)}

    bert = config["model_type"] == "bert"
    prefix = "bert" if bert else "roberta"
    e = f"{prefix}.embeddings"
    sd = {
        f"{e}.word_embeddings.weight": randn(V, H),
        f"{e}.position_embeddings.weight": randn(config["max_position_embeddings"], H),
        f"{e}.token_type_embeddings.weight": randn(config["type_vocab_size"], H),
        **norm(f"{e}.LayerNorm"),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"{prefix}.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            sd.update(linear(f"{p}.attention.self.{name}", H, H))
        sd.update(linear(f"{p}.attention.output.dense", H, H))
        sd.update(norm(f"{p}.attention.output.LayerNorm"))
        sd.update(linear(f"{p}.intermediate.dense", FF, H))
        sd.update(linear(f"{p}.output.dense", H, FF))
        sd.update(norm(f"{p}.output.LayerNorm"))
    # the head: dense + tanh on the first token, then one output (BERT: its pooler and classifier)
    dense, out = ("bert.pooler.dense", "classifier") if bert else ("classifier.dense", "classifier.out_proj")
    sd.update(linear(dense, H, H))
    sd[f"{out}.weight"] = randn(1, H, std=0.5)
    sd[f"{out}.bias"] = randn(1, std=0.5)
    return sd


# Qwen3-Reranker (Qwen3ForCausalLM scored by its answer tokens) around the real Qwen3 tokenizer
# (Apache-2.0, Qwen's; see assets/NOTICE.md). full: Qwen3-Reranker-0.6B's config.json shapes.
QWEN3_TOKENIZER = ASSETS / "qwen3-tokenizer.json.gz"
QWEN3_TOKENIZER_CONFIG = ASSETS / "qwen3-tokenizer_config.json"
QWEN3_SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                  intermediate_size=768),
    "full": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072),
}


def qwen3_config(size: str = "tiny", **overrides) -> dict:
    """A Qwen3ForCausalLM config.json (Qwen3-Reranker-0.6B's fields at ``size``'s shapes)."""
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
        **QWEN3_SIZES[size], "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "use_sliding_window": False, "sliding_window": None, "tie_word_embeddings": True,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "float32", "initializer_range": 0.02,
    }
    config.update(overrides)
    if config["architectures"] == ["Qwen3ForSequenceClassification"]:
        config.setdefault("id2label", {"0": "LABEL_0"})
        config.setdefault("label2id", {"LABEL_0": 0})
        config.setdefault("pad_token_id", 151643)
    return config


def qwen3_state_dict(config: dict, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Hugging Face tensor names -> random tensors; the RMSNorm weights scatter around 1."""
    g = torch.Generator().manual_seed(seed)
    H, FF, V, D = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * D, config["num_key_value_heads"] * D

    def randn(*shape: int, mean: float = 0.0, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * std + mean).to(dtype)

    sd = {"model.embed_tokens.weight": randn(V, H, std=0.5), "model.norm.weight": randn(H, mean=1.0, std=0.1)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        sd.update({
            f"{p}.input_layernorm.weight": randn(H, mean=1.0, std=0.1),
            f"{p}.post_attention_layernorm.weight": randn(H, mean=1.0, std=0.1),
            f"{p}.self_attn.q_proj.weight": randn(q, H, std=0.05),
            f"{p}.self_attn.k_proj.weight": randn(kv, H, std=0.05),
            f"{p}.self_attn.v_proj.weight": randn(kv, H), f"{p}.self_attn.o_proj.weight": randn(H, q),
            f"{p}.self_attn.q_norm.weight": randn(D, mean=1.0, std=0.1),
            f"{p}.self_attn.k_norm.weight": randn(D, mean=1.0, std=0.1),
            f"{p}.mlp.gate_proj.weight": randn(FF, H), f"{p}.mlp.up_proj.weight": randn(FF, H),
            f"{p}.mlp.down_proj.weight": randn(H, FF),
        })
    if config["architectures"] == ["Qwen3ForSequenceClassification"]:
        sd["score.weight"] = randn(1, H, std=0.1)
    elif not config["tie_word_embeddings"]:
        sd["lm_head.weight"] = randn(V, H, std=0.1)
    return sd


def write_qwen3_checkpoint(out: Path, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                           **overrides) -> Path:
    """A random-weight Qwen3-Reranker checkpoint: config.json, model.safetensors, the real Qwen3
    tokenizer.json and tokenizer_config.json; ``overrides`` go into config.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = qwen3_config(size, **overrides, torch_dtype=str(dtype).removeprefix("torch."))
    save_file(qwen3_state_dict(config, seed, dtype), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    with gzip.open(QWEN3_TOKENIZER, "rb") as src, open(out / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copyfile(QWEN3_TOKENIZER_CONFIG, out / "tokenizer_config.json")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        os.chmod(out / name, 0o644)
    return out


def write_random_checkpoint(out: Path, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                            family: str = "xlm-roberta", **overrides) -> Path:
    """Writes config.json, model.safetensors and the tokenizer files into ``out``;
    ``family`` "xlm-roberta" or "bert"; ``overrides`` go into config.json."""
    if family == "qwen3":
        return write_qwen3_checkpoint(out, size, seed, dtype, **overrides)
    if family in FAMILY_WRITERS:  # ModernBERT, DeBERTa-v2 (rerank_server.encoder_checkpoints)
        return write_encoder_checkpoint(out, family, size, seed, dtype, **overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    family_config, tokenizer_fixture, tokenizer_config = FAMILIES[family]
    config = hf_config(**{**family_config, **SIZES[size], **overrides})
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(random_state_dict(config, seed, dtype), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    with gzip.open(tokenizer_fixture, "rb") as src, open(out / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    positions = config["max_position_embeddings"] - (0 if family == "bert" else config["pad_token_id"] + 1)
    (out / "tokenizer_config.json").write_text(json.dumps(
        {**tokenizer_config, "model_max_length": positions}, indent=2))
    # Readable by every user (safetensors writes 0600): a checkpoint mounted into the image is
    # read by its non-root user.
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        os.chmod(out / name, 0o644)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rerank-server checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="directory to write")
    parser.add_argument("--family", choices=(*FAMILIES, "qwen3", *FAMILY_WRITERS), default="xlm-roberta",
                        help="xlm-roberta: bge-reranker-v2-m3's architecture and tokenizer (8192 positions); "
                             "bert: BertForSequenceClassification with the uncased WordPiece tokenizer "
                             "(512 positions), as cross-encoder/ms-marco-MiniLM-L-6-v2; qwen3: Qwen3ForCausalLM "
                             "scored as Qwen3-Reranker, with the real Qwen3 tokenizer (full: the 0.6B's shapes); "
                             "modernbert: gte-reranker-modernbert-base's architecture (full: its shapes) with a "
                             "byte-level BPE stand-in for its tokenizer (Qwen3's, with ModernBERT's [CLS] q [SEP] "
                             "d [SEP] template); deberta-v2: mxbai-rerank-v1's architecture (small: xsmall's "
                             "shapes, full: base's) with a SentencePiece Unigram stand-in (XLM-RoBERTa's, with "
                             "DeBERTa-v3's normalizer, special ids and template). No package on PyPI we checked "
                             "ships either family's own tokenizer; see rerank_server.encoder_checkpoints")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny",
                        help="tiny: 2 layers, hidden 64; small: 6 layers, hidden 384 (MiniLM-L6 shapes); "
                             "full: bge-reranker-v2-m3 shapes (568M parameters with its vocabulary)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    args = parser.parse_args(argv)
    path = write_random_checkpoint(args.out, args.size, args.seed, getattr(torch, args.dtype), args.family)
    print(f"wrote a random {args.size} {args.family} checkpoint to {path}")


if __name__ == "__main__":
    main()
