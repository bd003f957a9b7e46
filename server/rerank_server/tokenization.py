"""Pair encoding ``<s> query </s></s> document </s>`` with the fast (Rust) tokenizer."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

MIN_MAX_LENGTH = 8  # <s> query </s></s> document </s> with room for a few tokens of each


def check_max_length(max_length: int, model_limit: int | None = None) -> None:
    """--max-length's one rule: at least MIN_MAX_LENGTH and (once the model is known) at most
    its limit; ValueError otherwise."""
    if not MIN_MAX_LENGTH <= max_length <= (model_limit or max_length):
        most = f" and at most the model's {model_limit}" if model_limit else ""
        raise ValueError(f"--max-length must be at least {MIN_MAX_LENGTH}{most}, got {max_length}")


class PairTooLongError(ValueError):
    """A pair longer than ``max_length`` where truncation was switched off."""

    def __init__(self, document: int | None, tokens: int, max_length: int):
        where = "the query alone" if document is None else f"document {document} with the query"
        super().__init__(f"{where} is {tokens} tokens, more than the limit of {max_length} (--max-length); "
                         "send truncate: true (or omit it) to cut it")
        self.document, self.tokens, self.max_length = document, tokens, max_length


class PairTokenizer:
    """Truncates the document side to fit ``max_length`` (``only_second``); a query so long
    that it leaves no room is itself cut to 3/4 of ``max_length``, as the model's authors do
    (FlagEmbedding's reranker). The query is tokenized once per request."""

    def __init__(self, tokenizer_file: Path, max_length: int, bos_id: int, eos_id: int):
        check_max_length(max_length)
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
        self.max_length, self.bos, self.eos = max_length, bos_id, eos_id
        self.max_query_tokens = min(max_length * 3 // 4, max_length - 4)

    def encode_pairs(self, query: str, documents: list[str], max_doc_tokens: int | None = None) -> list[list[int]]:
        """-> one token-id list per document, each at most ``max_length`` long; documents are
        cut to ``max_doc_tokens`` first when given."""
        pairs, _ = self.encode_chunked(query, documents, max_doc_tokens, max_chunks=1)
        return pairs

    def encode_chunked(self, query: str, documents: list[str], max_doc_tokens: int | None = None,
                       max_chunks: int = 1, keep_end: bool = False,
                       truncate: bool = True) -> tuple[list[list[int]], list[int]]:
        """Splits each document into up to ``max_chunks`` windows of the token budget (the room
        left beside the query, or ``max_doc_tokens`` if smaller), overlapping by 1/8 of a window.
        -> (pairs, owner): ``owner[i]`` is the document index of ``pairs[i]``; a document's
        windows are consecutive. ``max_chunks=1`` is plain truncation. ``keep_end``: windows
        are taken from the document's end (left truncation). ``truncate=False``: a pair that
        does not fit in ``max_length`` raises ``PairTooLongError`` instead of being cut."""
        q = self.tokenizer.encode(query, add_special_tokens=False).ids
        if truncate:
            q = q[: self.max_query_tokens]
        elif len(q) + 4 > self.max_length:
            raise PairTooLongError(None, len(q) + 4, self.max_length)
        window = self.max_length - len(q) - 4
        if max_doc_tokens is not None:
            window = min(window, max_doc_tokens)
        stride = max(1, window - window // 8)
        head = [self.bos, *q, self.eos, self.eos]
        pairs, owner = [], []
        for index, doc in enumerate(self.tokenizer.encode_batch(documents, add_special_tokens=False)):
            ids = doc.ids
            kept = len(ids) if max_doc_tokens is None else min(len(ids), max_doc_tokens)
            if not truncate and len(head) + kept + 1 > self.max_length:
                raise PairTooLongError(index, len(head) + kept + 1, self.max_length)
            for chunk, start in enumerate(range(0, max(1, len(ids) - window + stride), stride)):
                if chunk == max_chunks:
                    break
                if keep_end:
                    start = max(0, len(ids) - window - start)
                pairs.append(head + ids[start:start + window] + [self.eos])
                owner.append(index)
        return pairs, owner
