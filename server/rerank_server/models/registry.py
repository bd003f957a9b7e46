"""One table from a checkpoint's ``architectures`` name to the model class that runs it and the
family's data (vLLM's ``models/registry.py`` is the model of it).

A row names its model class lazily (``"module:Class"``), so reading the table imports no model;
each model class has ``Config.from_hf(hf, row)`` and ``load(model_dir, ops, device, dtype)``.
What differs between families that one class serves (positions, LayerNorm eps, checkpoint names,
a prompt template, answer tokens) is data in the row, not branches in the code: another
reranker of a served architecture is a row.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


class UnsupportedModelError(ValueError):
    """The checkpoint is not one that a row of ``ARCHITECTURES`` serves (the message says why)."""


@dataclass(frozen=True)
class EncoderFamily:
    """What a cross-encoder's ``model_type`` brings beyond the sizes its config.json states."""

    # How a pair too long for the model is cut (rerank_server.tokenization.PairTokenizer):
    # "only_second" (the document; a query leaving no room is capped at 3/4: FlagEmbedding's
    # rule for bge-reranker) or "longest_first" (sentence-transformers' CrossEncoder).
    truncation: str
    positions_from_padding: bool  # RoBERTa numbers positions from padding_idx + 1, BERT from 0
    layer_norm_eps: float  # when config.json omits it
    # checkpoint name -> the RoBERTa name ``CrossEncoder.destination`` reads (regexes, in order)
    name_remaps: tuple[tuple[str, str], ...] = ()


class EncoderConfigBase:
    """What every cross-encoder's config derives alike from its fields (``hidden_size``,
    ``num_heads``, ``type_vocab_size``, ``family_data``); each family's dataclass subclasses it."""

    architecture = "encoder"  # what the engine builds pairs for

    @property
    def uses_token_types(self) -> bool:
        """A type row per token (query 0, document 1) where the table has more than one row; a
        one-row table (RoBERTa) is added to every token (transformers passes no token_type_ids)."""
        return self.type_vocab_size > 1

    @property
    def truncation(self) -> str:
        return self.family_data.truncation

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class PromptTemplate:
    """An LLM reranker's text around a pair, scored by two answer tokens (the model card's way):
    ``prefix + middle.format(instruction, query, document) + suffix``; the middle is tokenized as
    one string and cut from its end to fit; the score is z[yes] - z[no] at the last position."""

    prefix: str
    middle: str  # with {instruction}, {query} and {document}
    suffix: str
    default_instruction: str
    yes: str  # the answer tokens, looked up in the tokenizer (never hard-coded ids)
    no: str
    max_length: int = 8192  # the model card's (the positions may allow more)


@dataclass(frozen=True)
class Architecture:
    """One row: the class that runs an ``architectures`` name, and the family's data."""

    model_class: str  # "module:Class", imported on use
    family: str  # what GET /info reports; for encoders, the config's model_type must be one of model_types
    model_types: tuple[str, ...]
    data: EncoderFamily | None = None  # encoders
    template: PromptTemplate | None = None  # LLM rerankers
    head: str = "classifier"  # "classifier" (encoders), "answer_tokens" (lm_head rows), "score" (seq-cls)
    int8: bool = False  # whether --dtype int8 is implemented for it (the CPU's int8 GEMMs)

    def model(self) -> type:
        module, name = self.model_class.split(":")
        return getattr(importlib.import_module(module), name)


ROBERTA = EncoderFamily("only_second", True, 1e-5)
# BERT's head is the pooler (dense + tanh on the first token) then a one-output Linear:
# RoBERTa's classifier.dense -> tanh -> classifier.out_proj in other names.
BERT = EncoderFamily("longest_first", False, 1e-12, name_remaps=(
    (r"^classifier\.(weight|bias)$", r"classifier.out_proj.\1"),
    (r"^(?:bert\.)?pooler\.dense\.", "classifier.dense."),
    (r"^bert\.", ""),
))
# ModernBERT (gte-reranker-modernbert-base) and DeBERTa-v2 (mxbai-rerank-*-v1): sentence-transformers'
# CrossEncoder cuts pairs longest_first; their own forwards read the rest from config.json.
MODERNBERT = EncoderFamily("longest_first", False, 1e-5)
DEBERTA_V2 = EncoderFamily("longest_first", False, 1e-7)

# Qwen3-Reranker's model card (format_instruction: single newlines between the parts).
QWEN3_RERANKER = PromptTemplate(
    prefix="<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
           "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n",
    middle="<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
    suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    default_instruction="Given a web search query, retrieve relevant passages that answer the query",
    yes="yes", no="no",
)

ENCODER = "rerank_server.models.encoder:CrossEncoder"
QWEN3 = "rerank_server.models.qwen3:Qwen3Reranker"
MODERNBERT_MODEL = "rerank_server.models.modernbert:ModernBertReranker"
DEBERTA_V2_MODEL = "rerank_server.models.deberta_v2:DebertaV2Reranker"
ARCHITECTURES: dict[str, Architecture] = {
    # XLM-RoBERTa and RoBERTa are one model in two names
    "XLMRobertaForSequenceClassification": Architecture(ENCODER, "xlm-roberta", ("xlm-roberta", "roberta"), ROBERTA,
                                                        int8=True),
    "RobertaForSequenceClassification": Architecture(ENCODER, "roberta", ("roberta", "xlm-roberta"), ROBERTA,
                                                     int8=True),
    "BertForSequenceClassification": Architecture(ENCODER, "bert", ("bert",), BERT, int8=True),
    "ModernBertForSequenceClassification": Architecture(MODERNBERT_MODEL, "modernbert", ("modernbert",), MODERNBERT),
    "DebertaV2ForSequenceClassification": Architecture(DEBERTA_V2_MODEL, "deberta-v2", ("deberta-v2",), DEBERTA_V2),
    # a causal LM scored by its answer tokens (Qwen3-Reranker as published)
    "Qwen3ForCausalLM": Architecture(QWEN3, "qwen3", ("qwen3",), template=QWEN3_RERANKER, head="answer_tokens"),
    # the community's converted "seq-cls" checkpoints: one label, a score head at the last token
    "Qwen3ForSequenceClassification": Architecture(QWEN3, "qwen3", ("qwen3",), template=QWEN3_RERANKER,
                                                   head="score"),
}


def architecture_of(hf: dict) -> tuple[str, Architecture]:
    """The (name, row) that serves a config.json dict; UnsupportedModelError naming why not."""
    archs = hf.get("architectures") or []
    for name in archs:
        row = ARCHITECTURES.get(name)
        if row is not None:
            if hf.get("model_type") not in row.model_types:
                raise UnsupportedModelError(f"architecture {name} with model_type {hf.get('model_type')!r}: "
                                            f"expected model_type {' or '.join(map(repr, row.model_types))}")
            return name, row
    raise UnsupportedModelError(
        f"unsupported model (architectures={archs}, model_type={hf.get('model_type')!r}): this server runs "
        f"{', '.join(ARCHITECTURES)} (one-label sequence classifiers, or a causal LM as an LLM reranker)")


def config_from_hf(hf: dict):
    """The model class's config for a config.json dict (its ``Config.from_hf``)."""
    return architecture_of(hf)[1].model().Config.from_hf(hf)


def model_class(hf: dict, dtype=None) -> type:
    """The class that runs a config.json dict in ``dtype`` (a torch dtype; UnsupportedModelError
    where the family does not implement it: int8 is the encoders' only, so far)."""
    name, row = architecture_of(hf)
    if dtype is not None and str(dtype) == "torch.int8" and not row.int8:
        raise UnsupportedModelError(f"--dtype int8 is implemented for the XLM-RoBERTa, RoBERTa and BERT "
                                    f"cross-encoders, not yet for {name}: use float32 or bfloat16")
    return row.model()
