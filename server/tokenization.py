"""Pair encoding ``<s> query </s></s> document </s>`` with the fast (Rust) tokenizer."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers


class PairTokenizer:
    """Truncates the document side to fit ``max_length`` (``only_second``); a query so long
    that it leaves no room is itself cut to 3/4 of ``max_length``, as the model's authors do
    (FlagEmbedding's reranker). The query is tokenized once per request."""

    def __init__(self, tokenizer_file: Path, max_length: int, bos_id: int, eos_id: int):
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {max_length}")
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

    def encode_pairs(self, query: str, documents: list[str]) -> list[list[int]]:
        """-> one token-id list per document, each at most ``max_length`` long."""
        q = self.tokenizer.encode(query, add_special_tokens=False).ids[: self.max_query_tokens]
        room = self.max_length - len(q) - 4
        docs = self.tokenizer.encode_batch(documents, add_special_tokens=False)
        head = [self.bos, *q, self.eos, self.eos]
        return [head + d.ids[:room] + [self.eos] for d in docs]
