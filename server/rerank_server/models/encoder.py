"""XLM-RoBERTa (and RoBERTa and BERT) cross-encoders over unpadded variable-length batches.

Every pair's tokens are concatenated into one ``(total_tokens, hidden)`` tensor
described by ``cu_seqlens`` (batch + 1,) int32 and ``max_seqlen``: no padding, so
no FLOP is spent on it, and every GEMM sees all pairs' tokens in its M dimension.
The memory-bound glue and attention are called through ``rerank_kernels.Ops`` (PyTorch on
the CPU, Triton/FlashAttention on CUDA); each GEMM is built once from its weight by
``ops.pack`` after loading (on the CPU oneDNN with the weight reordered, where it measured
faster) and called as ``linear(x)``; the FFN's up-projection includes bias and GELU.
The families differ only in their ``EncoderConfig`` (positions, token types, LayerNorm eps,
how pairs are truncated) and in checkpoint names, remapped onto one set (``destination``).
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rerank_kernels import Ops, activation_dtype
from rerank_kernels.linear import (
    ATTENTION_OUT,
    FFN_DOWN,
    FFN_UP,
    FIRST_TOKEN_QUERY,
    HEAD_DENSE,
    HEAD_OUT,
    KEY_VALUE,
    QKV,
    feed_forward,
    linear_add_layernorm,
)
from rerank_server.models.registry import (
    ROBERTA,
    EncoderConfigBase,
    EncoderFamily,
    UnsupportedModelError,
    architecture_of,
)
from rerank_server.models.weights import model_tensors, read_safetensors

log = logging.getLogger(__name__)

FFN_ROWS = 4096  # tokens per FFN slice (see CrossEncoder._block)


@dataclass(frozen=True)
class EncoderConfig(EncoderConfigBase):
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    # RoBERTa numbers positions from padding_idx + 1; BERT from 0.
    position_offset: int
    family: str  # the config's model_type (GET /info)
    family_data: EncoderFamily = ROBERTA  # the registry row's data: truncation, checkpoint names

    @property
    def max_tokens(self) -> int:
        """Longest sequence the position table covers (8192 for bge-reranker-v2-m3)."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_hf(cls, hf: dict) -> EncoderConfig:
        """Reads a Hugging Face ``config.json`` dict; refuses what this forward cannot run."""
        family = architecture_of(hf)[1].data
        if family is None:
            raise UnsupportedModelError(f"{hf.get('architectures')} is not a cross-encoder")
        num_labels = len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", 2)
        if num_labels != 1:
            raise UnsupportedModelError(f"a reranker has one output label; this checkpoint has {num_labels}")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise UnsupportedModelError(f"hidden_act {hf['hidden_act']!r} is not supported (only exact 'gelu')")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModelError("only absolute position embeddings are supported")
        if hf["hidden_size"] % hf["num_attention_heads"]:
            raise UnsupportedModelError("hidden_size must be a multiple of num_attention_heads")
        pad = hf.get("pad_token_id", 1 if family.positions_from_padding else 0)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 1),
            layer_norm_eps=hf.get("layer_norm_eps", family.layer_norm_eps),
            pad_token_id=pad,
            position_offset=pad + 1 if family.positions_from_padding else 0,
            family=hf["model_type"],
            family_data=family,
        )


@dataclass
class Layer:
    """One post-norm encoder block; Q, K and V are fused into one (3 * hidden, hidden) GEMM.
    The GEMMs' weights are read into the ``*_weight``/``*_bias`` tensors, then packed into
    ``qkv``, ``out``, ``up`` and ``down`` (see ``CrossEncoder.pack_gemms``) and dropped."""

    qkv_weight: torch.Tensor | None
    qkv_bias: torch.Tensor | None
    out_weight: torch.Tensor | None
    out_bias: torch.Tensor | None
    attn_norm_weight: torch.Tensor
    attn_norm_bias: torch.Tensor
    up_weight: torch.Tensor | None
    up_bias: torch.Tensor | None
    down_weight: torch.Tensor | None
    down_bias: torch.Tensor | None
    ffn_norm_weight: torch.Tensor
    ffn_norm_bias: torch.Tensor
    qkv: Callable | None = None  # (rows, hidden) -> (rows, 3 * hidden); the last layer's: keys, values only
    first_token_query: Callable | None = None  # the last layer's queries, for first tokens only
    out: Callable | None = None
    up: Callable | None = None  # bias and exact GELU included
    down: Callable | None = None


class CrossEncoder:
    """``forward(input_ids, cu_seqlens, max_seqlen, token_type_ids=None) -> logits (batch,) float32``."""

    Config = EncoderConfig

    @classmethod
    def load(cls, model_dir: Path, ops: Ops, device: torch.device, dtype: torch.dtype) -> CrossEncoder:
        return load_cross_encoder(model_dir, ops, device, dtype)

    def __init__(self, config: EncoderConfig, ops: Ops, device: torch.device, dtype: torch.dtype):
        c, self.config, self.ops, self.device, self.dtype = config, config, ops, device, dtype
        H, FF = c.hidden_size, c.intermediate_size

        def empty(*shape: int) -> torch.Tensor:  # int8: read as float32, quantized by ops.pack
            return torch.empty(shape, device=device, dtype=activation_dtype(dtype))

        self.word_embeddings = empty(c.vocab_size, H)
        self.position_embeddings = empty(c.max_position_embeddings, H)
        self.token_type_embeddings = empty(c.type_vocab_size, H)
        self.embed_norm_weight, self.embed_norm_bias = empty(H), empty(H)
        self.layers = [
            Layer(empty(3 * H, H), empty(3 * H), empty(H, H), empty(H), empty(H), empty(H),
                  empty(FF, H), empty(FF), empty(H, FF), empty(H), empty(H), empty(H))
            for _ in range(c.num_layers)
        ]
        # The classification head runs in fp32 on the (batch, hidden) first-token rows: fp16
        # would round logits above ~8 to steps of ~0.008 (near-equal documents would tie).
        def empty32(*shape: int) -> torch.Tensor:
            return torch.empty(shape, device=device, dtype=torch.float32)

        self.head_dense_weight, self.head_dense_bias = empty32(H, H), empty32(H)
        self.head_out_weight, self.head_out_bias = empty32(1, H), empty32(1)
        self.head_dense = self.head_out = None  # packed by pack_gemms
        self.num_parameters = sum(t.numel() for _, t in self.named_weights())
        self.weight_bytes = sum(t.numel() * t.element_size() for _, t in self.named_weights())

    def pack_gemms(self) -> None:
        """Builds every GEMM from its loaded weight through ``ops.pack`` and drops the plain
        weight, layer by layer, so that memory peaks at the weights plus one layer's packed copy.
        The last layer's Q and K/V are packed apart (a packed weight cannot be sliced)."""
        H, pack = self.config.hidden_size, self.ops.pack
        for i, p in enumerate(self.layers):
            if i == len(self.layers) - 1:
                p.first_token_query = pack(FIRST_TOKEN_QUERY, p.qkv_weight[:H], p.qkv_bias[:H])
                p.qkv = pack(KEY_VALUE, p.qkv_weight[H:], p.qkv_bias[H:])
            else:
                p.qkv = pack(QKV, p.qkv_weight, p.qkv_bias)
            p.out = pack(ATTENTION_OUT, p.out_weight, p.out_bias)
            p.up = pack(FFN_UP, p.up_weight, p.up_bias)
            p.down = pack(FFN_DOWN, p.down_weight, p.down_bias)
            p.qkv_weight = p.qkv_bias = p.out_weight = p.out_bias = None
            p.up_weight = p.up_bias = p.down_weight = p.down_bias = None
        self.head_dense = pack(HEAD_DENSE, self.head_dense_weight, self.head_dense_bias)
        self.head_out = pack(HEAD_OUT, self.head_out_weight, self.head_out_bias)
        self.head_dense_weight = self.head_dense_bias = self.head_out_weight = self.head_out_bias = None

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (total,) int64, cu_seqlens (batch + 1,) int32, token_type_ids (total,) int64
        or None (every token type 0; ignored by a model without token types), on the model's device."""
        c, ops = self.config, self.ops
        x = ops.embed_layernorm(
            input_ids, cu_seqlens, self.word_embeddings, self.position_embeddings,
            self.token_type_embeddings, self.embed_norm_weight, self.embed_norm_bias,
            c.layer_norm_eps, c.position_offset, token_type_ids if c.uses_token_types else None,
        )
        for layer in self.layers[:-1]:
            x = self._block(layer, x, cu_seqlens, max_seqlen)
        # Only each sequence's <s> row feeds the head: the last block computes queries,
        # attention output and FFN for those rows alone (keys and values from all tokens).
        x = self._block(self.layers[-1], x, cu_seqlens, max_seqlen, first_token_only=True)
        return self.head(x)

    __call__ = forward

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, hidden) first-token rows in the model's dtype -> (batch,) fp32 logits:
        dense -> tanh -> out_proj (BERT: pooler -> classifier), all in fp32."""
        return self.head_out(torch.tanh(self.head_dense(x.float()))).squeeze(-1)

    def _block(self, p: Layer, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               first_token_only: bool = False) -> torch.Tensor:
        """x (total, hidden) -> (total, hidden), or (batch, hidden) with first_token_only."""
        c, ops, H = self.config, self.ops, self.config.hidden_size
        heads, dim = c.num_heads, c.head_dim
        total = x.shape[0]
        if first_token_only:
            rows = cu_seqlens[:-1].long()
            residual = x[rows]
            q = p.first_token_query(residual).view(-1, heads, dim)
            fused = p.qkv(x).view(total, 2, heads, dim)
            k, v = fused[:, 0], fused[:, 1]
            cu_q = torch.arange(rows.shape[0] + 1, device=x.device, dtype=torch.int32)
            max_q = 1
        else:
            residual = x
            fused = p.qkv(x).view(total, 3, heads, dim)
            q, k, v = fused[:, 0], fused[:, 1], fused[:, 2]
            cu_q, max_q = cu_seqlens, max_seqlen
        attn = ops.varlen_attention(q, k, v, cu_q, cu_seqlens, max_q, max_seqlen, 1.0 / math.sqrt(dim))
        # The views keep the fused (total, 3 * hidden) QKV alive: drop them before the FFN
        # (~400 MB at 64k tokens in fp16).
        del q, k, v, fused
        x = linear_add_layernorm(p.out, attn.reshape(-1, H), residual, p.attn_norm_weight, p.attn_norm_bias,
                                 c.layer_norm_eps, ops.add_layernorm)
        # The FFN in row slices: its (rows, intermediate) activation is the forward's largest
        # tensor; slices of FFN_ROWS keep it bounded while the GEMMs stay large enough. Each
        # slice's LayerNorm is written over the rows it read (no second buffer).
        for start in range(0, x.shape[0], FFN_ROWS):
            feed_forward(p.up, p.down, x[start:start + FFN_ROWS], p.ffn_norm_weight, p.ffn_norm_bias,
                         c.layer_norm_eps, ops.add_layernorm)
        return x

    def named_weights(self):
        """(name, tensor) for every plain weight (those of the GEMMs until ``pack_gemms``), in a stable order."""
        return model_tensors(self)

    def destination(self, name: str) -> torch.Tensor | None:
        """The slice of our weights that the Hugging Face tensor ``name`` fills (None: unused)."""
        for pattern, replacement in self.config.family_data.name_remaps:
            name = re.sub(pattern, replacement, name)
        m = re.fullmatch(r"(?:roberta\.)?encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name)
        if m:
            index, module, kind = int(m.group(1)), m.group(2), m.group(3)
            if index >= len(self.layers):
                return None
            layer, H = self.layers[index], self.config.hidden_size
            qkv = {"attention.self.query": 0, "attention.self.key": 1, "attention.self.value": 2}
            if module in qkv:
                fused = layer.qkv_weight if kind == "weight" else layer.qkv_bias
                return fused[qkv[module] * H:(qkv[module] + 1) * H]
            field = {
                "attention.output.dense": "out", "attention.output.LayerNorm": "attn_norm",
                "intermediate.dense": "up", "output.dense": "down", "output.LayerNorm": "ffn_norm",
            }.get(module)
            return getattr(layer, f"{field}_{kind}") if field else None
        field = {
            "embeddings.word_embeddings.weight": "word_embeddings",
            "embeddings.position_embeddings.weight": "position_embeddings",
            "embeddings.token_type_embeddings.weight": "token_type_embeddings",
            "embeddings.LayerNorm.weight": "embed_norm_weight",
            "embeddings.LayerNorm.bias": "embed_norm_bias",
            "classifier.dense.weight": "head_dense_weight",
            "classifier.dense.bias": "head_dense_bias",
            "classifier.out_proj.weight": "head_out_weight",
            "classifier.out_proj.bias": "head_out_bias",
        }.get(name.removeprefix("roberta."))
        return getattr(self, field) if field else None


def load_cross_encoder(model_dir: Path, ops: Ops, device: torch.device, dtype: torch.dtype) -> CrossEncoder:
    """Builds the model from ``config.json``, fills it from ``*.safetensors``
    (``weights.read_safetensors``), then packs each GEMM's weight through ``ops`` (``select_ops``
    for this device, dtype and shapes)."""
    config = EncoderConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    model = CrossEncoder(config, ops, device, dtype)
    read_safetensors(model, model_dir, dtype)
    model.pack_gemms()
    return model
