"""Pair encoding for LLM rerankers: a prompt template (a row of rerank_server.models.registry)
around each (instruction, query, document), the model card's way.

    ids = ids(prefix) + ids(middle)[:room] + ids(suffix),  room = max_length - |prefix| - |suffix|

where ``middle = template.middle.format(instruction, query, document)`` is tokenized as one
string (so the tokens at the document's boundary are the ones the model was trained on) and
cut from its end (the document's end goes first). Each pair also says where its own tokens
begin (``EncodedPair.type_start``): after the prefix and the tokens its middle shares with the
middle's head (the template up to the document, tokenized alone). That split depends on the
pair alone, so a pair is computed the same way whatever else the request holds (bitwise on the
CPU), and the engine computes the prefix once for every pair of the batch that shares it
(rerank_server.models.qwen3).
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from rerank_server.models.registry import PromptTemplate
from rerank_server.tokenization import (
    BoundedTokenizer,
    EncodedPair,
    PairTooLongError,
    RequestTooLargeError,
    check_max_length,
)


def common_length(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PromptTokenizer:
    """The ``PairTokenizer`` interface (``encode_pairs``, ``encode_chunked``, ``max_length``) for a
    prompt template, with an ``instruction`` (absent: the template's default)."""

    takes_instruction = True
    truncation = "middle"

    def __init__(self, tokenizer_file: Path, max_length: int, template: PromptTemplate):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.bounded = BoundedTokenizer(self.tokenizer)
        self.template = template
        self.prefix, self.suffix = self.ids(template.prefix), self.ids(template.suffix)
        self.max_length = max_length
        self.room = max_length - len(self.prefix) - len(self.suffix)
        check_max_length(max_length)
        if self.room < 2:
            raise ValueError(f"--max-length {max_length} leaves no room for the text beside the prompt template's "
                             f"{len(self.prefix) + len(self.suffix)} tokens")

    def ids(self, text: str) -> list[int]:
        return self.bounded.ids(text)  # lets go of the GIL while it works (see BoundedTokenizer.encode)

    def describe(self) -> dict:
        """The template, for GET /info."""
        t = self.template
        return {"prefix": t.prefix, "middle": t.middle, "suffix": t.suffix,
                "default_instruction": t.default_instruction, "answer_tokens": [t.yes, t.no]}

    def encode_pairs(self, query: str, documents: list[str], max_doc_tokens: int | None = None,
                     instruction: str | None = None) -> list[EncodedPair]:
        pairs, _ = self.encode_chunked(query, documents, max_doc_tokens, max_chunks=1, instruction=instruction)
        return pairs

    def encode_chunked(self, query: str, documents: list[str], max_doc_tokens: int | None = None,
                       max_chunks: int = 1, keep_end: bool = False, truncate: bool = True,
                       instruction: str | None = None,
                       max_tokens: int | None = None) -> tuple[list[EncodedPair], list[int]]:
        """As ``PairTokenizer.encode_chunked``: -> (pairs, owner). Without chunking, a cut
        document or a left cut, a pair is exactly the model card's. The document part of a pair
        is the middle's tokens after its head: chunks (``max_chunks``, overlapping by 1/8),
        ``max_doc_tokens`` and ``keep_end`` (the document's last tokens) apply to it.
        ``max_tokens``: as ``PairTokenizer.encode_chunked`` (RequestTooLargeError beyond it; no
        document tokenized further than the tokens left could take: a pair's windows hold each
        document token they cover at least once, so tokens past those left can only refuse)."""
        instruction = self.template.default_instruction if instruction is None else instruction
        head_text = self.template.middle.format(instruction=instruction, query=query, document="")
        head = self.ids(head_text)
        pairs, owner, total = [], [], 0
        for index, document in enumerate(documents):
            middle = self.template.middle.format(instruction=instruction, query=query, document=document)
            # the head's tokens, as many document tokens as max_chunks windows can cover, and one
            # more to tell that it goes on
            wanted = len(head) + self.room * max_chunks + 1
            left = None if max_tokens is None else max_tokens - total + 1  # past it: refused
            if left is not None:
                wanted = min(wanted, len(head) + left)
            ids = self.bounded.head(middle, wanted)
            shared = common_length(ids, head)  # the head's tokens this pair has (a merge may take the last)
            if not truncate and len(ids) > self.room:
                raise PairTooLongError(None if len(head) > self.room else index, self.max_length)
            window = self.room - shared
            if max_doc_tokens is not None:
                window = min(window, max_doc_tokens)
            if window <= 0:  # the head alone fills the room: the card's cut, no document left
                pairs.append(self.pair(ids[:self.room], min(shared, self.room - 1)))
                owner.append(index)
                total = self._count(total, pairs[-1], max_tokens)
                continue
            document_ids = ids[shared:]
            if keep_end and len(ids) >= wanted:  # a long document: its last tokens
                reach = max(window, 1) * max_chunks
                document_ids = self.bounded.tail(middle, reach if left is None else min(reach, left))
            stride = max(1, window - window // 8)
            for chunk, start in enumerate(range(0, max(1, len(document_ids) - window + stride), stride)):
                if chunk == max_chunks:
                    break
                if keep_end:
                    start = max(0, len(document_ids) - window - start)
                pairs.append(self.pair(ids[:shared] + document_ids[start:start + window], shared))
                owner.append(index)
                total = self._count(total, pairs[-1], max_tokens)
        return pairs, owner

    @staticmethod
    def _count(total: int, pair: list[int], max_tokens: int | None) -> int:
        total += len(pair)
        if max_tokens is not None and total > max_tokens:
            raise RequestTooLargeError(max_tokens)
        return total

    def pair(self, middle: list[int], shared: int) -> EncodedPair:
        """prefix + middle + suffix; its own tokens begin after the prefix and ``shared`` middle tokens."""
        return EncodedPair(self.prefix + middle + self.suffix, len(self.prefix) + shared)
