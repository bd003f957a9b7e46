"""Pair encoding with the fast (Rust) tokenizer, in the checkpoint's own pair template:
``<s> query </s></s> document </s>`` (XLM-RoBERTa), ``[CLS] query [SEP] document [SEP]`` (BERT)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

TRUNCATIONS = ("only_second", "longest_first")


class PairTooLongError(ValueError):
    """A pair longer than ``max_length`` where truncation was switched off."""

    def __init__(self, document: int | None, tokens: int, max_length: int):
        where = "the query alone" if document is None else f"document {document} with the query"
        super().__init__(f"{where} is {tokens} tokens, more than the limit of {max_length} (--max-length); "
                         "send truncate: true (or omit it) to cut it")
        self.document, self.tokens, self.max_length = document, tokens, max_length


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
    rule, the longer text is cut first (``longest_first``). The query is tokenized once per request."""

    def __init__(self, tokenizer_file: Path, max_length: int, *, truncation: str = "only_second"):
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
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
        self.template = PairTemplate.from_tokenizer(self.tokenizer)
        self.max_length, self.truncation = max_length, truncation
        room = max_length - self.template.num_special
        # the most query tokens a pair can hold
        self.max_query_tokens = min(max_length * 3 // 4, room) if truncation == "only_second" else room

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
                       max_chunks: int = 1, keep_end: bool = False,
                       truncate: bool = True) -> tuple[list[EncodedPair], list[int]]:
        """Splits each document into up to ``max_chunks`` windows of the token budget (the room
        left beside the query, or ``max_doc_tokens`` if smaller), overlapping by 1/8 of a window.
        -> (pairs, owner): ``owner[i]`` is the document index of ``pairs[i]``; a document's
        windows are consecutive. ``max_chunks=1`` is plain truncation. ``keep_end``: windows
        are taken from the document's end (left truncation; the query keeps its start).
        ``truncate=False``: a pair that does not fit in ``max_length`` raises ``PairTooLongError``
        instead of being cut."""
        q = self.tokenizer.encode(query, add_special_tokens=False).ids
        special = self.template.num_special
        if not truncate and len(q) + special > self.max_length:
            raise PairTooLongError(None, len(q) + special, self.max_length)
        pairs, owner = [], []
        for index, doc in enumerate(self.tokenizer.encode_batch(documents, add_special_tokens=False)):
            ids = doc.ids
            kept = len(ids) if max_doc_tokens is None else min(len(ids), max_doc_tokens)
            if not truncate and len(q) + kept + special > self.max_length:
                raise PairTooLongError(index, len(q) + kept + special, self.max_length)
            if truncate:
                query_kept, window = self.fit(len(q), kept)
            else:  # it fits, as checked
                query_kept, window = len(q), self.max_length - special - len(q)
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
        return pairs, owner
