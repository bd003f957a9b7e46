"""The tokenizer fixture is the real XLM-R vocabulary, and our pair encoding matches
transformers' (``truncation="only_second"``) with the query capped as FlagEmbedding does."""
import gzip
import hashlib

import pytest
from transformers import AutoTokenizer

from rerank_server.checkpoint import TOKENIZER_FIXTURE
from rerank_server.tokenization import PairTokenizer

PANDA_Q = "what is panda?"
PANDA_D = "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China."
PANDA_IDS = [0, 2367, 83, 6, 85407, 32, 2, 2, 581, 6051, 18, 6, 85407, 15, 284, 12175, 28437, 19165, 54159,
             16836, 29808, 16, 83, 10, 81148, 114149, 28117, 21068, 47, 9098, 5, 2]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def pair_tokenizer(checkpoint, max_length=8192):
    return PairTokenizer(checkpoint / "tokenizer.json", max_length)


def test_fixture_is_the_real_vocabulary(hf_tokenizer):
    raw = gzip.decompress(TOKENIZER_FIXTURE.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == "0b44a9d7b51c3c62626640cda0e2c2f70fdacdc25bbbd68038369d14ebdf4c39"
    assert hf_tokenizer("Hello world")["input_ids"] == [0, 35378, 8999, 2]
    assert hf_tokenizer(PANDA_Q, PANDA_D)["input_ids"] == PANDA_IDS
    assert len(hf_tokenizer) == 250002


def test_pair_encoding_matches_the_notice(tiny_checkpoint):
    assert pair_tokenizer(tiny_checkpoint).encode_pairs(PANDA_Q, [PANDA_D]) == [PANDA_IDS]


@pytest.mark.parametrize("max_length", [8192, 64, 20])
def test_pairs_match_transformers_only_second(tiny_checkpoint, hf_tokenizer, max_length):
    query = "Wat is kunstmatige intelligentie?"
    docs = ["", "Kunstmatige intelligentie simuleert menselijke intelligentie. " * 30, "短い文書", PANDA_D,
            "L'intelligence artificielle simule l'intelligence humaine.", "  spaces   around\tand\n inside  "]
    ours = pair_tokenizer(tiny_checkpoint, max_length).encode_pairs(query, docs)
    for doc, got in zip(docs, ours, strict=True):
        if doc == "":  # transformers drops an empty text_pair; FlagEmbedding keeps the pair form
            q = hf_tokenizer(query, add_special_tokens=False)["input_ids"][: max_length * 3 // 4]
            assert got == [0, *q, 2, 2, 2]
            continue
        want = hf_tokenizer(query, doc, truncation="only_second", max_length=max_length)["input_ids"]
        assert got == want
        assert len(got) <= max_length


def test_long_query_is_capped_at_three_quarters(tiny_checkpoint, hf_tokenizer):
    max_length = 64
    query = "a long question about pandas and bears " * 40
    [pair] = pair_tokenizer(tiny_checkpoint, max_length).encode_pairs(query, ["short doc"])
    q_ids = hf_tokenizer(query, add_special_tokens=False)["input_ids"][: max_length * 3 // 4]
    d_ids = hf_tokenizer("short doc", add_special_tokens=False)["input_ids"]
    room = max_length - len(q_ids) - 4
    assert pair == [0, *q_ids, 2, 2, *d_ids[:room], 2]
    assert len(pair) == len(q_ids) + 4 + len(d_ids) <= max_length


def test_tiny_max_length_still_leaves_room(tiny_checkpoint):
    [pair] = pair_tokenizer(tiny_checkpoint, 8).encode_pairs("x " * 100, ["y " * 100])
    assert len(pair) == 8 and pair[0] == 0 and pair[-1] == 2
    with pytest.raises(ValueError, match="--max-length must be at least 8"):
        pair_tokenizer(tiny_checkpoint, 7)
