"""Bounded tokenization: each text is tokenized only as far as its tokens are used, and the
tokens are exactly those of the whole text (``rerank_server.tokenization.BoundedTokenizer``)."""
import gzip
import random
import sys
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rerank_server.checkpoint import TOKENIZER_FIXTURE
from rerank_server.tokenization import PairTokenizer, PairTooLongError, ends_a_cluster, is_plain


@pytest.fixture(scope="module")
def pair_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    path.write_bytes(gzip.decompress(TOKENIZER_FIXTURE.read_bytes()))
    return PairTokenizer(path, 8192)


@pytest.fixture(scope="module")
def bounded(pair_tokenizer):
    return pair_tokenizer.bounded


def rand(rng: random.Random, lo: int, hi: int, n: int) -> str:
    return "".join(chr(rng.randint(lo, hi)) for _ in range(n))


def words(rng: random.Random, alphabet: tuple[int, int], n: int) -> str:
    return " ".join(rand(rng, *alphabet, rng.randint(1, 9)) for _ in range(n))


RNG = random.Random(0)
LATIN = " ".join(RNG.choice(["Lorem", "ipsum", "dolor", "sit", "amet,", "consectetur", "élite.", "x"])
                 for _ in range(6000))
TEXTS = {
    "latin": LATIN,
    "cjk without spaces": rand(RNG, 0x4E00, 0x9FA5, 12000),
    "arabic": words(RNG, (0x0627, 0x064A), 3000),
    "devanagari": words(RNG, (0x0905, 0x094D), 3000),
    "thai without spaces": rand(RNG, 0x0E01, 0x0E3A, 12000),
    "mixed": (LATIN[:900] + rand(RNG, 0x4E00, 0x9FA5, 300) + " مرحبا بالعالم नमस्ते दुनिया สวัสดีชาวโลก ") * 12,
    # (a periodic word is the documented exception: test_a_word_without_a_cut_is_cut...)
    "one huge word": "".join(RNG.choice("abcdefghijklmnopqrstuvwxyz0123456789+/") for _ in range(30000)),
    "one huge mixed word": "".join(RNG.choice(["ab", "Zebra", "中文", "é", "ß", "-", "1"]) for _ in range(12000)),
    "long runs of spaces": "a" + " " * 20000 + " b c" * 3000 + " " * 5000,
    "U+001C between words": "alpha\u001cbeta " * 3000,
    "ZWJ, U+FEFF and control runs": "\u200d\ufeff\x01\x7f " * 4000 + LATIN[:6000] + "\u200d" * 9000 + " end",
    "combining marks": "e\u0301 " * 3000 + "a" + "\u0301" * 9000 + " o\u0308\u0323" * 1000,
    "lone combining marks after spaces": " \u0301x" * 6000,
    "emoji": "👩\u200d👩\u200d👧 🇫🇷🇩🇪 👍🏽 ❤️ " * 2000,
    "only deleted characters": "\u200d\ufeff\x01\u200b" * 6000,
    "added tokens in the text": "word<mask>x</s>" * 2000,
    "prepend before spaces": "\u0600 1 " * 5000,
    "hangul jamo and syllables": ("\u1100\u1161\u11a8 한국어 " * 2000) + "한국어" * 4000,
}


@pytest.mark.parametrize("name", TEXTS)
@pytest.mark.parametrize("n", [1, 5, 300, 2000])
def test_head_and_tail_are_the_whole_texts_tokens(bounded, name, n):
    text = TEXTS[name]
    whole = bounded.ids(text)
    assert bounded.head(text, n) == whole[:n]
    assert bounded.tail(text, n) == whole[-n:]


class Spy:
    """Records the longest text the tokenizer is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def encode(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self.tokenizer.encode(text, **kw)

    def encode_batch(self, texts, **kw):
        self.longest = max(self.longest, *map(len, texts))
        return self.tokenizer.encode_batch(texts, **kw)


@pytest.mark.parametrize("text, direction", [
    (LATIN * 30, "head"), (LATIN * 30, "tail"), (TEXTS["cjk without spaces"] * 40, "head"),
    ("x" * 2_000_000, "head"), (TEXTS["arabic"] * 20, "tail"), (TEXTS["added tokens in the text"] * 50, "tail")])
def test_only_a_bounded_piece_is_tokenized(bounded, monkeypatch, text, direction):
    spy = Spy(bounded.tokenizer)
    monkeypatch.setattr(bounded, "tokenizer", spy)
    got = getattr(bounded, direction)(text, 1000)
    assert len(got) == 1000
    assert spy.longest <= bounded.uncut_chars(1000) < len(text) / 10


def test_a_word_without_a_cut_is_cut_at_the_documented_limit(bounded):
    """A periodic word's segmentation depends on its whole length (``▁xxx x xxx …``: the
    remainder of len / 3 comes second), so no bounded piece gives it: it is cut at
    ``uncut_chars(n)`` characters, the one documented difference."""
    assert bounded.ids("x" * 10)[:2] != bounded.ids("x" * 11)[:2]
    limit = bounded.uncut_chars(1000)
    assert bounded.head("x" * 2_000_000, 1000) == bounded.ids("x" * limit)[:1000]
    cjk = TEXTS["cjk without spaces"] * 40  # 480,000 characters, one word: left truncation cuts it too
    assert bounded.tail(cjk, 1000) == bounded.ids(cjk[-limit:])[-1000:] == bounded.ids(cjk)[-1000:]


# an alphabet of the pieces where cuts go wrong: Python-only whitespace, characters the
# normalizer deletes, combining marks, joiners, added tokens, scripts without spaces
PIECES = [" ", "  ", "\u001c", "\u001f", "\u200d", "\ufeff", "\x01", "\n", "\t", "\u3000", "\xa0", "\u0301",
          "\u0308", "\u093f", "\u0e33", "\u0600", "<mask>", "</s>", "<s", "mask>", "👍", "🏽", "🇫", "\u1100",
          "\u1161", "한", "x", "ab", "Zebra", "é", "中", "文字", "ไทย", "ن", "ह", "1", ".", "-", "'"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=400), n=st.integers(0, 40),
       repeat=st.integers(1, 40))
def test_property_head_and_tail_are_exact(bounded, pieces, n, repeat):
    """Exact for every text within the reach past a cut that is never itself cut."""
    text = ("".join(pieces) * repeat)[:bounded.MIN_UNCUT_CHARS]
    whole = bounded.ids(text)
    assert bounded.head(text, n) == whole[:n]
    assert bounded.tail(text, n) == (whole[-n:] if n else [])


def test_the_space_cut_holds_for_every_character_beside_it(bounded):
    """Exhaustive over Unicode: a space after any character ``ends_a_cluster`` admits, and
    before any ``is_plain`` one, separates the tokens on its two sides."""
    chars = [chr(c) for c in range(sys.maxunicode + 1)
             if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) != "Cn"]
    left = [c for c in chars if ends_a_cluster(c)]
    right = [c for c in chars if is_plain(c)]
    assert len(right) > 100_000 and len(left) > len(right)

    def ids(texts):
        return [e.ids for e in bounded.tokenizer.encode_batch(texts, add_special_tokens=False)]
    for a, b in ((["x" + c for c in left], [" y"] * len(left)), (["x"] * len(right), [" " + c + "y" for c in right])):
        whole = ids([p + q for p, q in zip(a, b, strict=True)])
        bad = [p + q for p, q, w, i, j in zip(a, b, whole, ids(a), ids(b), strict=True) if w != i + j]
        assert not bad, bad[:10]


def test_python_whitespace_is_not_the_boundary(bounded):
    """U+001C is whitespace to Python, not to the tokenizer; a cut there would split a word."""
    assert "\u001c".isspace()
    text = "abc\u001cdef " * 5000
    assert bounded.head(text, 10) == bounded.ids(text)[:10]


def reference_chunks(pt: PairTokenizer, query, documents, max_doc_tokens=None, max_chunks=1, keep_end=False):
    """The pair encoding from whole-text tokenization (what the server did before the bound)."""
    q = pt.tokenizer.encode(query, add_special_tokens=False).ids[: pt.max_query_tokens]
    window = pt.max_length - len(q) - pt.template.num_special
    if max_doc_tokens is not None:
        window = min(window, max_doc_tokens)
    stride = max(1, window - window // 8)
    pairs, owner = [], []
    for index, doc in enumerate(pt.tokenizer.encode_batch(documents, add_special_tokens=False)):
        ids = doc.ids
        for chunk, start in enumerate(range(0, max(1, len(ids) - window + stride), stride)):
            if chunk == max_chunks:
                break
            if keep_end:
                start = max(0, len(ids) - window - start)
            pairs.append(pt.template.pair(q, ids[start:start + window]))
            owner.append(index)
    return pairs, owner


@pytest.mark.parametrize("max_length", [64, 512])
@pytest.mark.parametrize("keep_end", [False, True])
@pytest.mark.parametrize("max_chunks, max_doc_tokens", [(1, None), (1, 20), (3, None), (7, 50), (1000, None)])
def test_pairs_windows_and_usage_equal_whole_text_tokenization(tmp_path, pair_tokenizer, max_length, keep_end,
                                                               max_chunks, max_doc_tokens):
    pt = PairTokenizer.__new__(PairTokenizer)
    pt.__dict__.update(pair_tokenizer.__dict__, max_length=max_length,
                       max_query_tokens=min(max_length * 3 // 4, max_length - 4))
    documents = [TEXTS[name][:20000] for name in ("latin", "cjk without spaces", "devanagari", "emoji",
                                                  "one huge word", "combining marks")] + ["", "short"]
    for query in ("where?", TEXTS["mixed"]):  # the second is cut to 3/4 of max_length
        got = pt.encode_chunked(query, documents, max_doc_tokens, max_chunks, keep_end=keep_end)
        want = reference_chunks(pt, query, documents, max_doc_tokens, max_chunks, keep_end)
        assert got == want
        assert sum(map(len, got[0])) == sum(map(len, want[0]))  # usage.prompt_tokens


def test_truncate_false_says_more_than_the_limit(pair_tokenizer):
    room = pair_tokenizer.max_length - 4 - 1  # the query "q" is one token
    fits = "x" * (3 * room)  # "▁xxx" pieces: 3 characters a token
    assert len(pair_tokenizer.bounded.ids(fits)) == room
    assert len(pair_tokenizer.encode_chunked("q", [fits], truncate=False)[0][0]) == pair_tokenizer.max_length
    with pytest.raises(PairTooLongError, match="document 1 with the query is more than 8192 tokens"):
        pair_tokenizer.encode_chunked("q", [fits, fits + "xxx" + LATIN * 1000], truncate=False)
    with pytest.raises(PairTooLongError, match="the query alone is more than 8192 tokens"):
        pair_tokenizer.encode_chunked(LATIN * 100, ["d"], truncate=False)
