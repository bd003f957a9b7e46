"""ModernBERT cross-encoders: parity with transformers' ModernBertForSequenceClassification on random
checkpoints (both poolings, biases on and off, windows of several widths, sequences far longer than
the window), the window's edge, bf16, batch invariance, and what the registry refuses."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import assert_engine_batch_invariant, assert_pairs_as_transformers, sentence
from tokenizers import Tokenizer, decoders, models

from rerank_kernels import native_bf16_missing
from rerank_kernels.local_attention import QUERY_BLOCK, local_attention_torch
from rerank_server.encoder_checkpoints import modernbert_config, write_encoder_checkpoint
from rerank_server.engine import Engine
from rerank_server.models.modernbert import ModernBertConfig
from rerank_server.models.registry import UnsupportedModelError, config_from_hf

transformers = pytest.importorskip("transformers")

QUERY = "what is the capital of france?"
DOCUMENTS = ["Paris is the capital of France.", "", "x", "Berlin is the capital of Germany, a city of rivers."]


def documents(n: int, seed: int, longest: int) -> list[str]:
    rng = random.Random(seed)
    return DOCUMENTS + [sentence(rng, rng.randint(1, longest)) for _ in range(n)]


def hf_scores(path: Path, ids: list[list[int]], dtype: torch.dtype = torch.float32,
              attention: str = "sdpa") -> torch.Tensor:
    """transformers' model on the right-padded batch with its attention mask: (batch,) float64 logits."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, dtype=dtype, attn_implementation=attention).eval()
    width = max(map(len, ids))
    input_ids = torch.tensor([p + [0] * (width - len(p)) for p in ids])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in ids])
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask).logits[:, 0].double()


def cross_encoder_ids(path: Path, query: str, docs: list[str], max_length: int) -> list[list[int]]:
    """sentence-transformers' CrossEncoder: tokenizer(queries, documents, truncation=True) = longest_first."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return tokenizer([query] * len(docs), docs, truncation=True, max_length=max_length)["input_ids"]


SHAPES = {
    # gte-reranker-modernbert-base's choices at a tiny size: mean pooling, no biases, global every 3rd
    "mean-no-bias": {},
    # the other pooling, every bias on, global every 2nd, other thetas, the tanh GELUs, an odd window
    "cls-biases": dict(classifier_pooling="cls", norm_bias=True, attention_bias=True, mlp_bias=True,
                       classifier_bias=True, global_attn_every_n_layers=2, global_rope_theta=5000.0,
                       local_rope_theta=300.0, hidden_activation="gelu_pytorch_tanh",
                       classifier_activation="gelu_new", local_attention=10),
    # two heads of 32, a window as wide as the sequences (every layer then attends fully)
    "dim32-wide-window": dict(hidden_size=64, num_attention_heads=2, local_attention=512, num_hidden_layers=3),
}


def test_the_stand_in_tokenizer_is_a_byte_level_bpe_with_modernberts_template(tmp_path):
    """No PyPI package ships ModernBERT's own tokenizer (a byte-level BPE): the stand-in is Qwen3's
    byte-level BPE with ModernBERT's special tokens and ``[CLS] q [SEP] d [SEP]``; pairs and their
    truncation are transformers' from the same file."""
    path = write_encoder_checkpoint(tmp_path, "modernbert")
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert isinstance(tokenizer.model, models.BPE) and isinstance(tokenizer.decoder, decoders.ByteLevel)
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == tokenizer.get_vocab_size() == 151674
    specials = [tokenizer.token_to_id(t) for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")]
    assert specials == list(range(151669, 151674))
    assert specials[1:4] == [config["cls_token_id"], config["sep_token_id"], config["pad_token_id"]]
    pair = tokenizer.encode("what is panda?", "A bear.")
    assert pair.ids[0] == specials[1] and pair.ids[-1] == specials[2] and pair.ids.count(specials[2]) == 2
    # Qwen3's pieces: the space is part of the byte-level piece
    assert tokenizer.encode(" bear", add_special_tokens=False).ids == [11722]
    assert_pairs_as_transformers(path, "longest_first", (48, 100, 8192))


@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_transformers_fp32(shape, tmp_path):
    path = write_encoder_checkpoint(tmp_path, "modernbert", seed=len(shape), **SHAPES[shape])
    engine = Engine.load(str(path), "cpu", max_length=256)
    docs = documents(10, seed=len(shape), longest=400)
    pairs = engine.tokenizer.encode_pairs(QUERY, docs)
    assert [list(p) for p in pairs] == cross_encoder_ids(path, QUERY, docs, 256)
    assert max(map(len, pairs)) > 2 * engine.model.config.window + 1 or shape == "dim32-wide-window"
    ours = torch.tensor(engine.forward(pairs), dtype=torch.float64)
    reference = hf_scores(path, [list(p) for p in pairs])
    assert (ours - reference).abs().max() <= 1e-4, (ours, reference)
    assert ours.std() > 1e-2  # the scores differ between documents


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_parity_far_beyond_the_window(pooling, tmp_path):
    """Pairs of a few thousand tokens, 100x the window, through the blocked local attention."""
    path = write_encoder_checkpoint(tmp_path, "modernbert", seed=7, classifier_pooling=pooling, local_attention=32)
    engine = Engine.load(str(path), "cpu", max_length=3000)
    rng = random.Random(3)
    docs = [sentence(rng, 3200), sentence(rng, 2100), sentence(rng, 40)]
    pairs = engine.tokenizer.encode_pairs(QUERY, docs)
    assert max(map(len, pairs)) == 3000
    ours = torch.tensor(engine.forward(pairs), dtype=torch.float64)
    reference = hf_scores(path, [list(p) for p in pairs])
    assert (ours - reference).abs().max() <= 1e-4, (ours, reference)


def dense_local_reference(q, k, v, lengths, window, scale):
    out = []
    start = 0
    for n in lengths:
        qs, ks, vs = (x[start:start + n].transpose(0, 1).double() for x in (q, k, v))
        positions = torch.arange(n)
        mask = (positions[None, :] - positions[:, None]).abs() <= window
        scores = (qs @ ks.transpose(1, 2) * scale).masked_fill(~mask, float("-inf"))
        out.append((scores.softmax(-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(out).float()


def test_local_attention_includes_the_window_edge_and_stays_in_its_sequence():
    """Blocks of queries (a sequence longer than QUERY_BLOCK), sequences within and beyond the window,
    one token: against a dense masked reference with distance <= window; the window one narrower
    (the edge excluded, as some servers did) gives another result."""
    g = torch.Generator().manual_seed(0)
    lengths, window, heads, dim = [1, 4, 7, 8, QUERY_BLOCK + 37, 30], 3, 2, 8
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim, generator=g) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    got = local_attention_torch(q, k, v, cu, max(lengths), window, 0.3)
    assert torch.allclose(got, dense_local_reference(q, k, v, lengths, window, 0.3), atol=1e-5)
    narrower = dense_local_reference(q, k, v, lengths, window - 1, 0.3)
    assert (got - narrower).abs().max() > 1e-2
    alone = [local_attention_torch(q[a:b], k[a:b], v[a:b], torch.tensor([0, b - a], dtype=torch.int32), b - a,
                                   window, 0.3) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)]
    assert torch.equal(torch.cat(alone), got)  # nothing crosses a sequence's edge; batch invariant


def test_batch_invariance_through_the_measured_gemms(tmp_path):
    path = write_encoder_checkpoint(tmp_path, "modernbert", seed=5)
    engine = Engine.load(str(path), "cpu")
    assert any(kind.startswith("modernbert_") for kind in engine.model.ops.choices["cpu_gemm"]["by_kind"])
    pairs = engine.tokenizer.encode_pairs(QUERY, documents(12, seed=6, longest=300))
    assert_engine_batch_invariant(engine, pairs)


def test_bf16_within_three_times_transformers_own_error(tmp_path):
    if native_bf16_missing():
        pytest.skip(f"bfloat16 on this CPU: {native_bf16_missing()}")
    path = write_encoder_checkpoint(tmp_path, "modernbert", seed=11)
    engine = Engine.load(str(path), "cpu", dtype="bfloat16")
    pairs = engine.tokenizer.encode_pairs(QUERY, documents(8, seed=2, longest=300))
    ids = [list(p) for p in pairs]
    reference = hf_scores(path, ids)
    hf_error = (hf_scores(path, ids, torch.bfloat16) - reference).abs().max()
    ours = torch.tensor(engine.forward(pairs), dtype=torch.float64)
    assert (ours - reference).abs().max() <= 3 * hf_error + 1e-3, ((ours - reference).abs().max(), hf_error)
    assert [engine.forward([p])[0] for p in pairs[:3]] == ours[:3].tolist()  # batch-invariant in bf16 too


def test_the_registry_reads_hub_and_transformers_5_configs(tmp_path):
    """The hub's fields (global_attn_every_n_layers, *_rope_theta) and what transformers 5 writes
    (layer_types, rope_parameters) give one config."""
    hub = config_from_hf(modernbert_config("tiny", global_attn_every_n_layers=2, local_rope_theta=123.0))
    assert isinstance(hub, ModernBertConfig)
    assert hub.global_layers == (True, False, True, False) and hub.local_theta == 123.0 and hub.window == 8
    saved = transformers.ModernBertConfig(**modernbert_config("tiny", global_attn_every_n_layers=2,
                                                              local_rope_theta=123.0))
    saved.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert config_from_hf(written) == hub
    assert hub.truncation == "longest_first" and hub.family == "modernbert"


@pytest.mark.parametrize("change, message", [
    (dict(id2label={"0": "a", "1": "b"}), "one output label"),
    (dict(hidden_activation="silu"), "hidden_activation"),
    (dict(classifier_pooling="max"), "classifier_pooling"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope type 'yarn'"),
    (dict(model_type="bert"), "expected model_type 'modernbert'"),
])
def test_what_it_cannot_serve_is_refused_naming_why(change, message):
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(modernbert_config("tiny", **change))
