"""DeBERTa-v2 cross-encoders: parity with transformers' DebertaV2ForSequenceClassification on random
checkpoints of mxbai-rerank-v1's shapes and on variants (separate position projections, one
relative term, absolute positions and token types, a projected embedding, no buckets), lengths up
to 512, the log buckets, bf16, batch invariance, and what the registry refuses."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import assert_engine_batch_invariant, assert_pairs_as_transformers, sentence
from tokenizers import Tokenizer, models

from rerank_kernels import native_bf16_missing
from rerank_kernels.disentangled_attention import log_bucket_position, relative_index
from rerank_server.encoder_checkpoints import deberta_v2_config, write_encoder_checkpoint
from rerank_server.engine import Engine
from rerank_server.models.deberta_v2 import DebertaV2Config
from rerank_server.models.registry import UnsupportedModelError, config_from_hf

transformers = pytest.importorskip("transformers")

QUERY = "what is the capital of france?"
DOCUMENTS = ["Paris is the capital of France.", "", "x", "Berlin is the capital of Germany, a city of rivers."]


def documents(n: int, seed: int, longest: int) -> list[str]:
    """The fixed ones, one cut at 512 tokens, n of random lengths."""
    rng = random.Random(seed)
    return DOCUMENTS + [sentence(rng, 700)] + [sentence(rng, rng.randint(1, longest)) for _ in range(n)]


def hf_scores(path: Path, pairs: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """transformers' model on the right-padded batch with its attention mask and the pairs' token
    types: (batch,) float64 logits."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).eval()
    width = max(map(len, pairs))
    input_ids = torch.tensor([list(p) + [0] * (width - len(p)) for p in pairs])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in pairs])
    types = torch.tensor([[int(i >= p.type_start) for i in range(len(p))] + [0] * (width - len(p)) for p in pairs])
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, token_type_ids=types).logits[:, 0].double()


SHAPES = {
    # mxbai-rerank-xsmall-v1's config at 2 layers of hidden 64 (shared keys, p2c and c2p, 256 buckets)
    "mxbai-tiny": {},
    # the pos_*_proj of their own, one relative term, absolute positions, token types, embedding 32 projected
    "own-projections-c2p": dict(share_att_key=False, pos_att_type=["c2p"], position_biased_input=True,
                                type_vocab_size=2, embedding_size=32, norm_rel_ebd="none"),
    # p2c alone from the older "|" string, no buckets: one embedding per distance up to 64
    "p2c-unbucketed": dict(share_att_key=False, pos_att_type="p2c", position_buckets=-1, max_relative_positions=64),
}


def test_the_stand_in_tokenizer_is_a_sentencepiece_unigram_with_debertas_ids_and_template(tmp_path):
    """No PyPI package ships DeBERTa-v3's own tokenizer (a SentencePiece Unigram): the stand-in is
    XLM-RoBERTa's Unigram with DeBERTa-v3's normalizer, its special ids ([PAD] 0, [CLS] 1, [SEP] 2,
    [UNK] 3) and ``[CLS] q [SEP] d [SEP]``; pairs and their truncation are transformers' from the same file."""
    path = write_encoder_checkpoint(tmp_path, "deberta-v2")
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert isinstance(tokenizer.model, models.Unigram)
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == tokenizer.get_vocab_size() == 250002
    assert [tokenizer.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]")] == [0, 1, 2, 3]
    assert config["pad_token_id"] == 0 and tokenizer.token_to_id("<s>") is None
    pair = tokenizer.encode("what is panda?", "The giant panda")
    # XLM-R's pieces (its NOTICE: "what is panda?" -> 2367 83 6 85407 32), DeBERTa's one [SEP] between
    assert pair.ids == [1, 2367, 83, 6, 85407, 32, 2, 581, 6051, 18, 6, 85407, 2]
    assert pair.type_ids == [0] * 7 + [1] * 6
    assert tokenizer.encode("\U0010fffd", add_special_tokens=False).ids == [6, 3]  # "\u2581", then [UNK]
    # DeBERTa-v3's normalizer: stripped, spaces collapsed
    assert tokenizer.encode("  a  b ", add_special_tokens=False).tokens == ["\u2581a", "\u2581b"]
    assert_pairs_as_transformers(path, "longest_first", (48, 100, 512))


@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_transformers_fp32(shape, tmp_path):
    path = write_encoder_checkpoint(tmp_path, "deberta-v2", seed=len(shape), **SHAPES[shape])
    engine = Engine.load(str(path), "cpu")
    docs = documents(8, seed=len(shape), longest=500)
    pairs = engine.tokenizer.encode_pairs(QUERY, docs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    expected = tokenizer([QUERY] * len(docs), docs, truncation=True, max_length=512,  # CrossEncoder's
                         return_token_type_ids=True)
    assert [list(p) for p in pairs] == expected["input_ids"]
    assert [[int(i >= p.type_start) for i in range(len(p))] for p in pairs] == expected["token_type_ids"]
    assert max(map(len, pairs)) == 512
    ours = torch.tensor(engine.forward(pairs), dtype=torch.float64)
    reference = hf_scores(path, pairs)
    assert (ours - reference).abs().max() <= 1e-4, (ours, reference)
    assert ours.std() > 1e-3  # the scores differ between documents


@pytest.mark.parametrize("size", ["small", pytest.param("full", marks=pytest.mark.slow)])
def test_parity_at_mxbai_shapes(size, tmp_path):
    """mxbai-rerank-xsmall-v1 (small) and -base-v1 (full) shapes, pairs up to 512 tokens."""
    path = write_encoder_checkpoint(tmp_path, "deberta-v2", size, seed=3)
    engine = Engine.load(str(path), "cpu")
    rng = random.Random(9)
    pairs = engine.tokenizer.encode_pairs(QUERY, [DOCUMENTS[0], sentence(rng, 700), sentence(rng, 150)])
    assert max(map(len, pairs)) == 512
    ours = torch.tensor(engine.forward(pairs), dtype=torch.float64)
    reference = hf_scores(path, pairs)
    assert (ours - reference).abs().max() <= 1e-4, (ours, reference)


def test_relative_index_is_transformers_log_buckets():
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position
    probe = torch.empty(1, 512, 8)
    hf = build_relative_position(probe, probe, bucket_size=256, max_position=512)[0]
    c2p, p2c = relative_index(512, 256, 256, 512)
    assert torch.equal(c2p, torch.clamp(hf + 256, 0, 511)) and torch.equal(p2c, torch.clamp(-hf + 256, 0, 511))
    assert len(set(hf[0].tolist())) < 512  # distances beyond 128 share buckets
    assert log_bucket_position(torch.tensor([127, 128, 129, -500]), 256, 512).tolist()[:2] == [127.0, 128.0]


def test_batch_invariance_through_the_measured_gemms(tmp_path):
    path = write_encoder_checkpoint(tmp_path, "deberta-v2", seed=5)
    engine = Engine.load(str(path), "cpu")
    assert any(kind.startswith("deberta_") for kind in engine.model.ops.choices["cpu_gemm"]["by_kind"])
    pairs = engine.tokenizer.encode_pairs(QUERY, documents(10, seed=6, longest=300))
    assert_engine_batch_invariant(engine, pairs)


def test_bf16_within_three_times_transformers_own_error(tmp_path):
    if native_bf16_missing():
        pytest.skip(f"bfloat16 on this CPU: {native_bf16_missing()}")
    path = write_encoder_checkpoint(tmp_path, "deberta-v2", seed=11)
    engine = Engine.load(str(path), "cpu", dtype="bfloat16")
    pairs = engine.tokenizer.encode_pairs(QUERY, documents(6, seed=2, longest=400))
    reference = hf_scores(path, pairs)
    hf_error = (hf_scores(path, pairs, torch.bfloat16) - reference).abs().max()
    ours = torch.tensor(engine.forward(pairs), dtype=torch.float64)
    assert (ours - reference).abs().max() <= 3 * hf_error + 1e-3, ((ours - reference).abs().max(), hf_error)
    assert [engine.forward([p])[0] for p in pairs[:3]] == ours[:3].tolist()


def test_the_registry_reads_an_mxbai_config():
    config = config_from_hf(deberta_v2_config("small"))
    assert isinstance(config, DebertaV2Config)
    assert (config.span, config.c2p, config.p2c, config.share_att_key, config.position_biased_input) == \
        (256, True, True, True, False)
    assert config.scale == (64 * 3) ** 0.5 and config.max_tokens == 512 and config.truncation == "longest_first"


@pytest.mark.parametrize("change, message", [
    (dict(id2label={"0": "a", "1": "b"}), "one output label"),
    (dict(hidden_act="relu"), "hidden_act"),
    (dict(conv_kernel_size=3), "conv_kernel_size"),
    (dict(pos_att_type=["p2p"]), "pos_att_type"),
    (dict(model_type="deberta"), "expected model_type 'deberta-v2'"),
])
def test_what_it_cannot_serve_is_refused_naming_why(change, message):
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(deberta_v2_config("tiny", **change))
