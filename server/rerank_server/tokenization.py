"""Pair encoding with the fast (Rust) tokenizer, in the checkpoint's own pair template
(``<s> query </s></s> document </s>`` for XLM-RoBERTa, ``[CLS] query [SEP] document [SEP]`` for
BERT), over a bounded piece of each text.

Every text is tokenized only as far as the tokens it contributes: ``BoundedTokenizer.head``
(and ``tail``, for left truncation) return exactly ``ids(text)[:n]`` (``[-n:]``) while
tokenizing a prefix (suffix) that grows by doubling. Where the prefix may be cut is what makes
the result exact, not an approximation; the argument, step by step along the tokenizer's
pipeline (added tokens -> normalizer -> pre-tokenizer -> model), is in ``BoundedTokenizer``.
"""
from __future__ import annotations

import bisect
import logging
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

log = logging.getLogger(__name__)

TRUNCATIONS = ("only_second", "longest_first")
# longest_first: a query and a document both longer than this many max lengths count as equally
# long (the one place the bounded cut may differ from whole-text tokenization: which of the two
# gets the room's odd token)
COMPARE_LENGTHS_PER_MAX_LENGTH = 4
MIN_MAX_LENGTH = 8  # <s> query </s></s> document </s> with room for a few tokens of each


def check_max_length(max_length: int, model_limit: int | None = None) -> None:
    """--max-length's one rule: at least MIN_MAX_LENGTH and (once the model is known) at most
    its limit; ValueError otherwise."""
    if not MIN_MAX_LENGTH <= max_length <= (model_limit or max_length):
        most = f" and at most the model's {model_limit}" if model_limit else ""
        raise ValueError(f"--max-length must be at least {MIN_MAX_LENGTH}{most}, got {max_length}")

# Characters of these categories are their own grapheme cluster next to one another (UAX #29),
# except for the few listed in _JOINERS. Marks (Mn, Mc, Me), format and control characters (Cf,
# Cc: ZWJ, U+FEFF, ...), separators and unassigned code points are never "plain".
_PLAIN_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lm", "Lo", "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe", "Pi",
                               "Pf", "Po", "Sm", "Sc", "So"})
# Prepend characters (GB9b: they join whatever follows them, a space included).
_PREPEND = ((0x0600, 0x0605), (0x06DD, 0x06DD), (0x070F, 0x070F), (0x0890, 0x0891), (0x08E2, 0x08E2),
            (0x0D4E, 0x0D4E), (0x110BD, 0x110BD), (0x110CD, 0x110CD), (0x111C2, 0x111C3), (0x1193F, 0x1193F),
            (0x11941, 0x11941), (0x11A3A, 0x11A3A), (0x11A84, 0x11A89), (0x11D46, 0x11D46), (0x11F02, 0x11F02))
# Letters and symbols that still join a neighbour: Prepend letters, SpacingMark letters (GB9a),
# Extend modifiers (GB9), Hangul jamo (GB6-8), regional indicators (GB12-13).
_JOINERS = _PREPEND + ((0x0E33, 0x0E33), (0x0EB3, 0x0EB3), (0xFF9E, 0xFF9F), (0x1100, 0x11FF), (0xA960, 0xA97F),
                       (0xD7B0, 0xD7FF), (0x1F1E6, 0x1F1FF))


@lru_cache(maxsize=65536)
def is_plain(char: str) -> bool:
    """A character that forms a grapheme cluster of its own between two other plain ones."""
    code = ord(char)
    return unicodedata.category(char) in _PLAIN_CATEGORIES and not any(lo <= code <= hi for lo, hi in _JOINERS)


@lru_cache(maxsize=65536)
def ends_a_cluster(char: str) -> bool:
    """Whether a grapheme cluster boundary follows ``char`` when a space comes next: any
    assigned character but a Prepend one (UAX #29 joins nothing else to a following space)."""
    code = ord(char)
    return unicodedata.category(char) not in ("Cn", "Cs") and not any(lo <= code <= hi for lo, hi in _PREPEND)


class BoundedTokenizer:
    """``ids(text)`` cut to ``n`` tokens, exactly, from a bounded piece of ``text``.

    Cuts are made where the pipeline is *separable*: ``ids(a + b) == ids(a) + ids(b)``.

    1. **A space before a plain character** (``"x y"``, cut before the space; ``x`` anything
       but a Prepend character), or before marks, joiners, format or control characters that
       the normalizer turns, with the space, into text that starts with a space (checked on
       those few characters, which end before the next plain character or space). The added
       tokens (``<s>``, ``<mask>``, ...) contain no space, so none spans the cut. The normalizer
       works one grapheme cluster at a time (the Precompiled SentencePiece map; the others here
       map characters or runs of spaces), and UAX #29 decides a cluster boundary from the two
       characters beside it: only Prepend joins a following space, only Extend, ZWJ and
       SpacingMark join a preceding one. The normalized space is whitespace, where every
       pre-tokenizer here ends a word (WhitespaceSplit, Metaspace, ByteLevel's `` ?\\p{L}+``),
       and words are tokenized independently. ``check_separable`` tests this on the loaded
       tokenizer at start-up; where it fails, texts are tokenized whole. Python's whitespace is
       not the boundary: U+001C is whitespace to Python, not to the tokenizer, and ZWJ, U+FEFF,
       control characters and lone combining marks are deleted by the normalizer, so a "word"
       may give no token at all.
    2. **Inside one word**, for a Unigram (SentencePiece) model only, which segments a word by
       Viterbi: the best path's node at position p depends only on the word's first p characters,
       so tokenizing the prefix ``text[:p]`` walks back exactly the path the whole text's lattice
       holds from p. A token spans at most ``L`` characters (the longest piece), so the whole
       word's best path visits one of any ``L`` consecutive positions; if the paths walked back
       from each of ``L`` consecutive positions share their first tokens, the whole text's path
       has those tokens too; fewer positions suffice where no piece of more characters begins
       at the window's characters (a token jumping over it would be such a piece). Positions
       must be character-for-character with the normalized text (each character plain,
       normalized alone to one non-space character, no added token near); the shared tokens'
       last one is dropped when it is ``<unk>``, which the model fuses with the unknown
       characters that follow. This costs one tokenization of the prefix per position.
    3. **Before an added token** matched verbatim (not normalized, stripping nothing), where no
       two added tokens can overlap: the tokenizer splits them out of the raw text first and
       tokenizes the pieces between them independently.

    Where no cut is found (a text of characters the normalizer deletes, one word of combining
    marks, a periodic word such as ``"xxxx…"``, a left-truncated text ending in one long word)
    the piece grows past the last cut up to ``uncut_chars(n)`` characters (``UNCUT_CHARS_PER_TOKEN``
    per wanted token, at least ``MIN_UNCUT_CHARS``: 262,144 for 8,192 tokens), and is cut there:
    the one place the result may differ from the whole text's, in the tokens next to that cut.
    No bounded piece could do better: the Unigram segmentation of ``"x" * k`` puts the remainder
    of ``k / 3`` right after its first piece (``▁xxx x xxx …``), so its second token depends on
    the whole word's length. A left cut that far from the kept tokens leaves them as they are in
    practice (Viterbi paths merge within a few pieces). A text with fewer than ``n`` tokens
    within that reach is tokenized whole: every one of its tokens is used.
    """

    # first piece: this many characters per wanted token (about 4.5 for English with XLM-R),
    # doubled until it holds enough tokens
    CHARS_PER_TOKEN = 6
    # how far past the last cut a piece may grow (see above)
    UNCUT_CHARS_PER_TOKEN = 32
    MIN_UNCUT_CHARS = 16384
    # the longest run of marks and format characters after a space that a cut looks through
    JOINED_CHARS = 64

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        added = list(tokenizer.get_added_tokens_decoder().values())
        self.added = [token.content for token in added]
        self.longest_added = max(map(len, self.added), default=0)
        self.normalizer = tokenizer.normalizer
        # 3. before an added token, where they are matched verbatim and cannot overlap
        verbatim = all(not (t.normalized or t.lstrip or t.rstrip or t.single_word) for t in added)
        cuts = [" "] + (self.added if verbatim and not overlapping(self.added) else [])
        self.cut_pattern = re.compile("|".join(map(re.escape, cuts)))
        # 2. (Viterbi certification) needs the Unigram model and its normalizer
        self.piece_chars = 0
        if isinstance(tokenizer.model, models.Unigram) and self.normalizer is not None:
            self.pieces = sorted(tokenizer.get_vocab(with_added_tokens=False))
            self.piece_chars = max(map(len, self.pieces))
            self.unk_id = unigram_unk_id(tokenizer.model)
        self.separable = self.check_separable()
        if not self.separable:
            log.warning("this tokenizer does not split at spaces as expected; texts are tokenized whole")

    def encode(self, text: str):
        """One text's Encoding. Through ``encode_batch``, which lets go of the GIL while it works
        (``encode`` holds it: a long text would stall the event loop's thread for as long)."""
        return self.tokenizer.encode_batch([text], add_special_tokens=False)[0]

    def ids(self, text: str) -> list[int]:
        return self.encode(text).ids

    def check_separable(self) -> bool:
        """The cuts on a few probes (scripts, added tokens beside a space or a word)."""
        probes = [("Hello", " world"), ("中文", " 字"), ("ab", " cd e"), ("a", " " + self.added[-1]),
                  (self.added[-1], " b")] if self.added else [("Hello", " world")]
        if len(self.cut_pattern.pattern) > 1:
            probes += [("word", self.added[-1] + "x"), ("x" + self.added[0], self.added[-1])]
        return all(self.ids(a + b) == self.ids(a) + self.ids(b) for a, b in probes)

    def is_cut(self, text: str, match: re.Match) -> bool:
        """A separable cut before ``match``: an added token, or a space after the end of a
        grapheme cluster whose own cluster normalizes to whitespace first (1. in the class
        docstring)."""
        at = match.start()
        if match.group() != " ":
            return at > 0
        if not (0 < at < len(text) - 1 and ends_a_cluster(text[at - 1])):
            return False
        if is_plain(text[at + 1]):
            return True
        if self.normalizer is None:
            return False
        # the space may be a cluster with what follows (" \u0301", " \u200d"): its clusters end
        # before the next plain character or space, unless a Prepend one joins that too
        end = at + 1
        while end < len(text) and end - at <= self.JOINED_CHARS and not (is_plain(text[end]) or text[end] == " "):
            end += 1
        if end - at > self.JOINED_CHARS or not ends_a_cluster(text[end - 1]):
            return False
        return self.normalizer.normalize_str(text[at:end]).startswith(" ")

    def last_cut(self, text: str, start: int, end: int) -> int | None:
        """The largest cut in ``(start, end]``, or None."""
        last = None
        for match in self.cut_pattern.finditer(text, start + 1, end + 1):
            if match.start() <= end and self.is_cut(text, match):
                last = match.start()
        return last

    def first_cut(self, text: str, start: int, end: int) -> int | None:
        """The smallest cut in ``[start, end)``, or None."""
        for match in self.cut_pattern.finditer(text, start, end):
            if self.is_cut(text, match):
                return match.start()
        return None

    def uncut_chars(self, n: int) -> int:
        return max(self.UNCUT_CHARS_PER_TOKEN * n, self.MIN_UNCUT_CHARS)

    def head(self, text: str, n: int) -> list[int]:
        """``ids(text)[:n]``, exactly (see the class docstring)."""
        size = max(n, 1) * self.CHARS_PER_TOKEN
        if not self.separable or len(text) <= size:
            return self.ids(text)[:n]
        done, done_at = [], 0  # ids(text[:done_at]) == done; done_at is 0 or a cut
        while size < len(text):
            cut = self.last_cut(text, done_at, size)
            if cut is not None:
                done += self.ids(text[done_at:cut])
                done_at = cut
                if len(done) >= n:
                    return done[:n]
            if self.piece_chars:
                certain = self.certain_head(text, done_at, min(size, done_at + self.uncut_chars(n)), n - len(done))
                if certain is not None and len(done) + len(certain) >= n:
                    return (done + certain)[:n]
            if size - done_at > self.uncut_chars(n):  # no cut in reach: cut the word there
                return (done + self.ids(text[done_at:done_at + self.uncut_chars(n)]))[:n]
            size *= 2
        return (done + self.ids(text[done_at:]))[:n]

    def tail(self, text: str, n: int) -> list[int]:
        """``ids(text)[-n:]`` (all of them if fewer), exactly: the mirror of ``head`` through
        cuts of kinds 1 and 3 only (Viterbi runs forwards: a word's end needs its start)."""
        size = max(n, 1) * self.CHARS_PER_TOKEN
        if not self.separable or len(text) <= size:
            return self.ids(text)[-n:] if n else []
        done, done_at = [], len(text)  # ids(text[done_at:]) == done
        while size < len(text):
            cut = self.first_cut(text, len(text) - size, done_at)
            if cut is not None:
                done = self.ids(text[cut:done_at]) + done
                done_at = cut
                if len(done) >= n:
                    return done[-n:] if n else []
            if done_at - (len(text) - size) > self.uncut_chars(n):  # no cut in reach: cut the word there
                return (self.ids(text[done_at - self.uncut_chars(n):done_at]) + done)[-n:] if n else []
            size *= 2
        done = self.ids(text[:done_at]) + done
        return done[-n:] if n else []

    def window_after(self, text: str, at: int, limit: int) -> int | None:
        """The first ``end`` in ``[at, limit]`` such that every position in
        ``[end - L + 1, end]`` is a cut inside a word, one to one with the normalized text: the
        characters ``text[end - L - 1 : end + 1]`` are plain, each normalized alone to one
        character that is not a space, and so are they together; no added token lies near."""
        span = self.piece_chars + 2
        end = max(at, span - 1)
        while end <= min(limit, len(text) - 1):
            chars = text[end - span + 1:end + 1]
            bad = [i for i, c in enumerate(chars) if not is_plain(c)]
            if bad:  # the next window must start after the last non-plain character
                end += bad[-1] + 1
                continue
            alone = [self.normalizer.normalize_str(c) for c in chars]
            near = text[max(0, end - span + 1 - self.longest_added):end + 1 + self.longest_added]
            if (all(len(a) == 1 and not a.isspace() for a in alone)
                    and self.normalizer.normalize_str(chars) == "".join(alone)
                    and not any(token in near for token in self.added)):
                return end
            end += 1
        return None

    def begins_a_piece(self, chars: str) -> bool:
        """Whether some piece of the vocabulary starts with ``chars``."""
        at = bisect.bisect_left(self.pieces, chars)
        return at < len(self.pieces) and self.pieces[at].startswith(chars)

    def certain_head(self, text: str, start: int, end: int, want: int) -> list[int] | None:
        """At least ``want`` tokens of ``text[start:end]`` (``start`` a cut or 0) certainly
        the first of ``text[start:]`` (2. in the class docstring), or None (too few tokens
        there, or no window of plain characters in reach)."""
        probe = self.encode(text[start:end])
        if len(probe.ids) <= want + 16:
            return None
        # the window ends a little past the wanted tokens: the walks merge before it
        reach = start + probe.offsets[want + 16][1]
        window_end = self.window_after(text, reach, end - 1)
        if window_end is None:
            return None
        # Only a piece that the text around the window begins can jump over it: the window
        # needs as many positions as the longest piece start that ends at its last character.
        chars = text[window_end - self.piece_chars:window_end + 1]  # one to one with the normalized text
        normalized = "".join(map(self.normalizer.normalize_str, chars))
        width = max([1] + [len(normalized) - i for i in range(len(normalized)) if self.begins_a_piece(normalized[i:])])
        walks = self.tokenizer.encode_batch(
            [text[start:p] for p in range(window_end - width + 1, window_end + 1)], add_special_tokens=False)
        shared = 0
        for tokens in zip(*(zip(w.ids, w.offsets, strict=True) for w in walks), strict=False):
            if any(t != tokens[0] for t in tokens[1:]):
                break
            shared += 1
        certain = walks[0].ids[:shared]
        if certain and certain[-1] == self.unk_id:
            certain.pop()
        return certain


def unigram_unk_id(model: models.Unigram) -> int | None:
    """The Unigram's unknown-piece id (its name varies: ``<unk>``, ``[UNK]``), read from the model:
    U+FFFF is a noncharacter, never a piece."""
    try:
        return model.tokenize("\uffff")[0].id
    except Exception:  # a Unigram without unk_id cannot segment it  # noqa: BLE001
        return None


def overlapping(tokens: list[str]) -> bool:
    """Whether two of ``tokens`` can overlap in a text (one inside another, or one's end
    the other's start), so that where the tokenizer matches them depends on more than one."""
    return any(a != b and (a in b or any(b.startswith(a[i:]) for i in range(1, len(a))))
               for a in tokens for b in tokens) or any(
        any(a.startswith(a[i:]) for i in range(1, len(a))) for a in tokens)


class PairTooLongError(ValueError):
    """A pair longer than ``max_length`` where truncation was switched off."""

    def __init__(self, document: int | None, max_length: int):
        where = "the query alone" if document is None else f"document {document} with the query"
        super().__init__(f"{where} is more than {max_length} tokens, the limit (--max-length); "
                         "send truncate: true (or omit it) to cut it")
        self.document, self.max_length = document, max_length



class RequestTooLargeError(ValueError):
    """A request's pairs would hold more tokens than ``max_tokens`` (--max-request-tokens)."""

    def __init__(self, max_tokens: int):
        super().__init__(f"this request needs more than {max_tokens} tokens of model input (its pairs, every "
                         f"chunk counted); the limit is {max_tokens} (--max-request-tokens): send fewer or "
                         "shorter documents, or fewer max_chunks_per_doc")
        self.max_tokens = max_tokens


class EncodedPair(list):
    """One pair's token ids (a plain list to the scheduler and engine) and where its token type
    1 begins: ``type_start`` (``len(self)`` when every token is type 0)."""

    __slots__ = ("type_start",)

    def __init__(self, ids: list[int], type_start: int):
        super().__init__(ids)
        self.type_start = type_start


def token_type_start(pair: list[int]) -> int:
    """Where token type 1 begins in ``pair``: an ``EncodedPair``'s own, else nowhere (all 0)."""
    return getattr(pair, "type_start", len(pair))


@dataclass(frozen=True)
class PairTemplate:
    """``prefix query middle document suffix``: the special tokens the tokenizer's post-processor
    puts around a pair, and the token type of each part (types run 0s then 1s)."""

    prefix: list[int]
    middle: list[int]
    suffix: list[int]
    # The token types of [prefix..., query, middle..., document, suffix...] as 5 parts; where type
    # 1 begins: (part, index within it), None if nowhere.
    type_one_at: tuple[int, int] | None

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> PairTemplate:
        """Runs the post-processor of tokenizer.json (TemplateProcessing, RobertaProcessing,
        BertProcessing, or a Sequence of them) on a probe pair and reads the layout back: its
        special-tokens mask marks the template's tokens (a special token typed in a text is not
        masked), its type ids give each part's type."""
        query = tokenizer.encode("a", add_special_tokens=False)
        document = tokenizer.encode("b", add_special_tokens=False)
        if not query.ids or not document.ids:
            raise ValueError("the tokenizer yields no token for the probe texts 'a' and 'b'")
        pair = tokenizer.post_process(query, document, add_special_tokens=True)
        parts: list[list[int]] = [[], [], []]  # prefix, middle, suffix ids
        types: list[list[int]] = [[], [], [], [], []]  # prefix, query, middle, document, suffix
        seen = 0  # ordinary tokens passed: the query's, then the document's
        for token, special, token_type in zip(pair.ids, pair.special_tokens_mask, pair.type_ids, strict=True):
            if not special:
                if seen in (0, len(query.ids)):  # a text's first token gives the text's type
                    types[1 if seen == 0 else 3].append(token_type)
                seen += 1
                continue
            part = 0 if seen == 0 else 1 if seen <= len(query.ids) else 2
            parts[part].append(token)
            types[2 * part].append(token_type)
        if seen != len(query.ids) + len(document.ids) or not any(parts):
            raise ValueError(f"the tokenizer's post-processor ({type(tokenizer.post_processor).__name__}) "
                             "adds no special tokens around a pair; a cross-encoder needs its pair template")
        flat = [t for part in types for t in part]
        if set(flat) - {0, 1} or flat != sorted(flat):
            raise ValueError(f"the pair template's token types {flat} are not 0s then 1s")
        type_one_at = next(((p, part.index(1)) for p, part in enumerate(types) if 1 in part), None)
        return cls(*parts, type_one_at)

    @property
    def num_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    def pair(self, query: list[int], document: list[int]) -> EncodedPair:
        ids = self.prefix + query + self.middle + document + self.suffix
        if self.type_one_at is None:
            return EncodedPair(ids, len(ids))
        part, within = self.type_one_at
        lengths = (len(self.prefix), len(query), len(self.middle), len(document), len(self.suffix))
        return EncodedPair(ids, sum(lengths[:part]) + within)


def longest_first(query_len: int, doc_len: int, room: int) -> tuple[int, int]:
    """-> (query, document) tokens kept so that they fit in ``room``, as the Rust tokenizers'
    LongestFirst does (what transformers' fast tokenizers and sentence-transformers' CrossEncoder
    use): the shorter text whole if the longer still gets the rest, else half each (the document
    gets the odd token)."""
    if query_len + doc_len <= room:
        return query_len, doc_len
    short, long = sorted((query_len, doc_len))
    long = short if short > room else max(short, room - short)
    if short + long > room:
        short, long = room // 2, room - room // 2
    return (short, long) if query_len <= doc_len else (long, short)


class PairTokenizer:
    """Encodes (query, document) pairs in the checkpoint's template, cut to ``max_length``.

    ``truncation`` "only_second" (XLM-RoBERTa): the document side is cut; a query so long that
    it leaves no room is itself cut to 3/4 of ``max_length``, as the model's authors do
    (FlagEmbedding's reranker). "longest_first" (BERT): sentence-transformers' CrossEncoder
    rule, the longer text is cut first (``longest_first``). The query is tokenized once per request.
    Every text is tokenized only as far as its tokens are used (``BoundedTokenizer``)."""

    def __init__(self, tokenizer_file: Path, max_length: int, *, truncation: str = "only_second"):
        check_max_length(max_length)
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        if isinstance(self.tokenizer.model, models.Unigram):
            # SentencePiece drops leading, trailing and repeated whitespace before segmenting
            # (remove_extra_whitespaces); older tokenizer.json files (a bare Metaspace) keep a
            # trailing "▁" token instead. Split on whitespace first, as transformers does.
            self.tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            ])
        self.bounded = BoundedTokenizer(self.tokenizer)
        self.template = PairTemplate.from_tokenizer(self.tokenizer)
        self.max_length, self.truncation = max_length, truncation
        room = max_length - self.template.num_special
        # the most query tokens a pair can hold
        self.max_query_tokens = min(max_length * 3 // 4, room) if truncation == "only_second" else room
        # longest_first gives the room's odd token to the longer text once both exceed half of it:
        # texts are counted this far to tell which is longer (beyond it, they count as equal)
        self.compare_tokens = COMPARE_LENGTHS_PER_MAX_LENGTH * max_length

    def encode_pairs(self, query: str, documents: list[str], max_doc_tokens: int | None = None) -> list[EncodedPair]:
        """-> one token-id list per document, each at most ``max_length`` long; documents are
        cut to ``max_doc_tokens`` first when given."""
        pairs, _ = self.encode_chunked(query, documents, max_doc_tokens, max_chunks=1)
        return pairs

    def fit(self, query_len: int, doc_len: int) -> tuple[int, int]:
        """-> (query tokens kept, document window) for a pair of these lengths under the truncation rule."""
        room = self.max_length - self.template.num_special
        if self.truncation == "longest_first":
            return longest_first(query_len, doc_len, room)
        query_len = min(query_len, self.max_query_tokens)  # the window: all the room beside it
        return query_len, room - query_len

    def encode_chunked(self, query: str, documents: list[str], max_doc_tokens: int | None = None,
                       max_chunks: int = 1, keep_end: bool = False, truncate: bool = True,
                       max_tokens: int | None = None) -> tuple[list[EncodedPair], list[int]]:
        """Splits each document into up to ``max_chunks`` windows of the token budget (the room
        left beside the query, or ``max_doc_tokens`` if smaller), overlapping by 1/8 of a window.
        -> (pairs, owner): ``owner[i]`` is the document index of ``pairs[i]``; a document's
        windows are consecutive. ``max_chunks=1`` is plain truncation. ``keep_end``: windows
        are taken from the document's end (left truncation; the query keeps its start).
        ``truncate=False``: a pair that does not fit in ``max_length`` raises ``PairTooLongError``
        instead of being cut. Each text is tokenized only as far as the widest window reaches
        (one token further with ``truncate=False``, to tell that it is too long).
        ``max_tokens``: the pairs may hold at most this many tokens in all, else
        ``RequestTooLargeError``, raised as soon as it is certain; no document is tokenized
        further than the tokens left could take (a document's windows hold each of its tokens
        they cover at least once), so that the work done for a refused request stays bounded."""
        room = self.max_length - self.template.num_special
        if truncate:
            q = self.bounded.head(query, self.max_query_tokens if self.truncation == "only_second"
                                  else self.compare_tokens)
        else:
            q = self.bounded.head(query, room + 1)
            if len(q) > room:
                raise PairTooLongError(None, self.max_length)
        # the widest window a document can get beside this query (the fit of an endless document:
        # a shorter one gets no more), and the tokens max_chunks such windows cover
        widest = self.fit(len(q), self.max_length)[1] if truncate else room - len(q)
        if max_doc_tokens is not None:
            widest = min(widest, max_doc_tokens)
        span = widest + (max_chunks - 1) * max(1, widest - widest // 8) + (0 if truncate else 1)
        fit_span = 0  # tokens of a document that its windows' size depends on
        if truncate and self.truncation == "longest_first":
            # how longest_first splits the room depends on the document's length up to the room
            # while the query takes at most half of it; beyond that, on which text is longer
            fit_span = room if len(q) <= room // 2 else self.compare_tokens
            span = max(span, fit_span)
        cut = self.bounded.tail if keep_end else self.bounded.head
        pairs, owner, total = [], [], 0
        for index, document in enumerate(documents):
            reach = span
            if max_tokens is not None:
                # more than the tokens left can only be refused: one token past them shows it
                reach = min(span, max(max_tokens - total + 1, fit_span))
            ids = cut(document, reach)
            kept = len(ids) if max_doc_tokens is None else min(len(ids), max_doc_tokens)
            if not truncate and len(q) + kept > room:
                raise PairTooLongError(index, self.max_length)
            query_kept, window = self.fit(len(q), kept) if truncate else (len(q), room - len(q))
            if max_doc_tokens is not None:
                window = min(window, max_doc_tokens)
            stride = max(1, window - window // 8)
            for chunk, start in enumerate(range(0, max(1, len(ids) - window + stride), stride)):
                if chunk == max_chunks:
                    break
                if keep_end:
                    start = max(0, len(ids) - window - start)
                pairs.append(self.template.pair(q[:query_kept], ids[start:start + window]))
                owner.append(index)
                total += len(pairs[-1])
                if max_tokens is not None and total > max_tokens:
                    raise RequestTooLargeError(max_tokens)
        return pairs, owner
