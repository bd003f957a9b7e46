"""Qwen3 as an LLM reranker (Qwen3-Reranker) over unpadded variable-length batches.

A pair is scored the model card's way: the logits of the answer tokens ``yes`` and ``no`` at the
last position; only their difference is needed, so the head is one fp32 row,
``lm_head[yes] - lm_head[no]`` (tied embeddings: from ``embed_tokens``), and the score is
z_yes - z_no (P(yes) = sigmoid of it). ``Qwen3ForSequenceClassification`` (one label, the
community's converted checkpoints) scores with its ``score`` row at the last token instead.

The forward is transformers' ``Qwen3ForCausalLM``: pre-norm blocks with RMSNorm, per-head RMSNorm
on q and k then rotary embeddings, grouped-query causal attention, a SwiGLU MLP, no biases.
All rows of a batch are one ``(rows, hidden)`` tensor. A batch is made of *segments*: a shared
prefix (computed once, positions from 0), or a pair's own tokens, whose keys are its prefix's
followed by its own (positions continue at the prefix's length; a pair without a prefix is one
segment from 0). In a causal model the prefix's keys and values do not depend on what follows,
so a pair scores what it scores alone. The last layer computes queries, attention output and
MLP for each pair's last token only.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from rerank_kernels import Ops
from rerank_kernels.linear import GemmShape
from rerank_kernels.rotary import rope_table
from rerank_server.models.registry import PromptTemplate, UnsupportedModelError, architecture_of
from rerank_server.models.weights import Rows, model_tensors, read_safetensors

# GEMM kinds (rerank_kernels.linear): each gets one measured choice on the CPU
QKV = "decoder_qkv"  # (heads + 2 * kv_heads) * head_dim <- hidden, every layer but the last
LAST_QUERY = "decoder_last_query"  # heads * head_dim <- hidden: the last layer, last tokens only
KEY_VALUE = "decoder_key_value"  # 2 * kv_heads * head_dim <- hidden: the last layer
OUT = "decoder_out"  # hidden <- heads * head_dim
GATE_UP = "decoder_gate_up"  # 2 * intermediate <- hidden (gate rows first)
DOWN = "decoder_down"  # hidden <- intermediate
HEAD = "decoder_head"  # 1 <- hidden, fp32


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    head: str  # "answer_tokens" (lm_head rows) or "score" (a sequence classifier's row)
    template: PromptTemplate
    family: str = "qwen3"

    architecture = "decoder"
    uses_token_types = False
    truncation = "middle"  # the template's middle is cut from its end (the model card)

    @property
    def max_tokens(self) -> int:
        return min(self.template.max_length, self.max_position_embeddings)

    @classmethod
    def from_hf(cls, hf: dict) -> Qwen3Config:
        """Reads a Hugging Face ``config.json`` dict; refuses what this forward cannot run."""
        name, row = architecture_of(hf)
        if row.template is None:
            raise UnsupportedModelError(f"{name} is not a decoder reranker")
        if row.head == "score":
            labels = len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", 2)
            if labels != 1:
                raise UnsupportedModelError(f"{name}: a reranker has one output label; this checkpoint has {labels}")
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {hf['hidden_act']!r} is not supported (Qwen3 uses 'silu')")
        if hf.get("attention_bias"):
            raise UnsupportedModelError("attention_bias: true is not supported (Qwen3 has no biases)")
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError("use_sliding_window: true is not supported (full causal attention only)")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise UnsupportedModelError(f"rope type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                                        "(only the default rotary embedding)")
        heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
        if heads % kv_heads:
            raise UnsupportedModelError(f"num_attention_heads {heads} is not a multiple of "
                                        f"num_key_value_heads {kv_heads}")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=kv_heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            intermediate_size=hf["intermediate_size"], max_position_embeddings=hf["max_position_embeddings"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            tie_word_embeddings=hf.get("tie_word_embeddings", True), head=row.head, template=row.template)

    def gemm_shapes(self) -> tuple[GemmShape, ...]:
        """Every GEMM kind of this forward, for the CPU's measured choice (rerank_kernels.linear)."""
        H, D, q, kv, FF = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, self.intermediate_size
        return (GemmShape(QKV, (q + 2 * kv) * D, H), GemmShape(LAST_QUERY, q * D, H),
                GemmShape(KEY_VALUE, 2 * kv * D, H), GemmShape(OUT, H, q * D), GemmShape(GATE_UP, 2 * FF, H),
                GemmShape(DOWN, H, FF), GemmShape(HEAD, 1, H, fp32=True))


@dataclass
class DecoderBatch:
    """A batch's host-built index tensors (see the module docstring). Rows are segments in order."""

    input_ids: torch.Tensor  # (rows,) int64
    positions: torch.Tensor  # (rows,) int64: from 0 per pair, a prefix's pairs continue after it
    cu_q: torch.Tensor  # (segments + 1,) int32: each segment's rows
    cu_k: torch.Tensor  # (segments + 1,) int32: each segment's keys (its prefix's rows, then its own)
    key_rows: torch.Tensor | None  # (keys,) int64 rows of the keys in that order; None: the segments' own rows
    max_q: int
    max_k: int
    last_rows: torch.Tensor  # (pairs,) int64: each pair's last row
    last_cu_k: torch.Tensor  # (pairs + 1,) int32: each pair's keys
    last_key_rows: torch.Tensor | None  # (keys,) int64; None: the pairs' own rows (no prefixes)
    last_max_k: int
    shared_rows: int  # rows that a prefix spared (every pair's tokens minus the rows computed)

    def to(self, device: torch.device) -> DecoderBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else value
        return DecoderBatch(**moved)


def shared_groups(pairs: list[list[int]]) -> list[tuple[int, list[int]]]:
    """-> (prefix length, pair indices) for runs of consecutive pairs that share a prefix. Each
    pair names where its own tokens begin (``EncodedPair.type_start``, set by the prompt
    tokenizer from the pair alone); pairs that agree on it and on the token ids before it share
    it (checked id by id here, so sharing is never inexact). 0: no prefix."""
    groups: list[tuple[int, list[int]]] = []
    for i, pair in enumerate(pairs):
        start = getattr(pair, "type_start", 0)
        start = start if 0 < start < len(pair) else 0
        if groups and start and groups[-1][0] == start and pairs[groups[-1][1][0]][:start] == pair[:start]:
            groups[-1][1].append(i)
        else:
            groups.append((start, [i]))
    return groups


def build_batch(pairs: list[list[int]]) -> DecoderBatch:
    """Token-id lists (with their shared-prefix starts) -> the batch's index tensors, on the host."""
    ids, positions, q_lens, keys, key_lens = [], [], [], [], []
    last_rows, last_keys, last_key_lens = [], [], []
    row = 0
    for start, members in shared_groups(pairs):
        prefix_rows = np.arange(row, row + start)
        if start:  # the prefix: a segment of its own, its keys its own rows
            ids.append(np.asarray(pairs[members[0]][:start], dtype=np.int64))
            positions.append(np.arange(start))
            q_lens.append(start)
            keys.append(prefix_rows)
            key_lens.append(start)
            row += start
        for i in members:
            own = len(pairs[i]) - start
            ids.append(np.asarray(pairs[i][start:], dtype=np.int64))
            positions.append(np.arange(start, start + own))
            q_lens.append(own)
            pair_keys = np.concatenate([prefix_rows, np.arange(row, row + own)])
            keys.append(pair_keys)
            key_lens.append(len(pair_keys))
            last_keys.append(pair_keys)
            last_key_lens.append(len(pair_keys))
            row += own
            last_rows.append(row - 1)

    def cu(lengths: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    shared = any(start for start, _ in shared_groups(pairs))
    return DecoderBatch(
        input_ids=torch.from_numpy(np.concatenate(ids)), positions=torch.from_numpy(np.concatenate(positions)),
        cu_q=cu(q_lens), cu_k=cu(key_lens), key_rows=torch.from_numpy(np.concatenate(keys)) if shared else None,
        max_q=max(q_lens), max_k=max(key_lens), last_rows=torch.tensor(last_rows, dtype=torch.int64),
        last_cu_k=cu(last_key_lens), last_key_rows=torch.from_numpy(np.concatenate(last_keys)) if shared else None,
        last_max_k=max(last_key_lens), shared_rows=sum(map(len, pairs)) - row)


@dataclass
class Layer:
    """One pre-norm decoder block; q, k and v are one GEMM (the last layer: the last tokens'
    queries apart from everyone's keys and values), gate and up another. The GEMMs' weights are
    read into the ``*_weight`` tensors, packed by ``Qwen3Reranker.pack_gemms`` and dropped."""

    attn_norm: torch.Tensor  # (hidden,)
    qkv_weight: torch.Tensor | None  # (q + k + v, hidden)
    q_norm: torch.Tensor  # (head_dim,)
    k_norm: torch.Tensor
    out_weight: torch.Tensor | None
    mlp_norm: torch.Tensor
    gate_up_weight: torch.Tensor | None  # (2 * intermediate, hidden)
    down_weight: torch.Tensor | None
    qkv: object = None
    last_query: object = None
    out: object = None
    gate_up: object = None
    down: object = None


class Qwen3Reranker:
    """``forward(batch: DecoderBatch) -> scores (pairs,) float32``: z_yes - z_no, or the score head."""

    Config = Qwen3Config

    def __init__(self, config: Qwen3Config, ops: Ops, device: torch.device, dtype: torch.dtype,
                 answer_ids: tuple[int, int]):
        c, self.config, self.ops, self.device, self.dtype = config, config, ops, device, dtype
        H, D, FF = c.hidden_size, c.head_dim, c.intermediate_size
        qkv = (c.num_heads + 2 * c.num_kv_heads) * D

        def empty(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
            return torch.empty(shape, device=device, dtype=dtype)

        self.answer_ids = answer_ids  # (yes, no) from the tokenizer
        self.embed_tokens = empty(c.vocab_size, H)
        self.layers = [Layer(empty(H), empty(qkv, H), empty(D), empty(D), empty(H, c.num_heads * D), empty(H),
                             empty(2 * FF, H), empty(H, FF)) for _ in range(c.num_layers)]
        self.final_norm = empty(H)
        # The head in fp32: the answer rows (yes, no) of an untied lm_head, or the score row.
        if c.head == "score":
            self.head_rows = empty(1, H, dtype=torch.float32)
        elif not c.tie_word_embeddings:
            self.head_rows = empty(2, H, dtype=torch.float32)
        else:
            self.head_rows = None  # from embed_tokens, after loading
        self.head = None
        self.cos, self.sin = (t.to(device) for t in rope_table(c.max_tokens, D, c.rope_theta))
        self.num_parameters = sum(t.numel() for _, t in self.named_weights())

    def named_weights(self):
        """(name, tensor) for every weight the checkpoint fills, in a stable order."""
        return model_tensors(self, skip={"cos", "sin"})  # the rotation tables are computed, not read

    def destination(self, name: str):
        """Where the Hugging Face tensor ``name`` goes (a ``Rows`` for the lm_head's answer rows), or None."""
        c = self.config
        name = name.removeprefix("model.")
        parts = name.split(".")
        if parts[0] == "layers" and len(parts) >= 4:
            index = int(parts[1])
            if index >= len(self.layers):
                return None
            layer, module = self.layers[index], ".".join(parts[2:-1])
            q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            ff = c.intermediate_size
            return {
                "input_layernorm": layer.attn_norm, "post_attention_layernorm": layer.mlp_norm,
                "self_attn.q_norm": layer.q_norm, "self_attn.k_norm": layer.k_norm,
                "self_attn.q_proj": layer.qkv_weight[:q] if layer.qkv_weight is not None else None,
                "self_attn.k_proj": layer.qkv_weight[q:q + kv] if layer.qkv_weight is not None else None,
                "self_attn.v_proj": layer.qkv_weight[q + kv:] if layer.qkv_weight is not None else None,
                "self_attn.o_proj": layer.out_weight,
                "mlp.gate_proj": layer.gate_up_weight[:ff] if layer.gate_up_weight is not None else None,
                "mlp.up_proj": layer.gate_up_weight[ff:] if layer.gate_up_weight is not None else None,
                "mlp.down_proj": layer.down_weight,
            }.get(module) if parts[-1] == "weight" else None
        if name == "embed_tokens.weight":
            return self.embed_tokens
        if name == "norm.weight":
            return self.final_norm
        if name == "lm_head.weight" and c.head == "answer_tokens" and not c.tie_word_embeddings:
            return Rows(self.head_rows, self.answer_ids)
        if name == "score.weight" and c.head == "score":
            return self.head_rows
        return None

    def pack_gemms(self) -> None:
        """Builds every GEMM through ``ops.pack`` and drops the plain weights, layer by layer.
        The head: one fp32 row, (lm_head[yes] - lm_head[no]) or the score row."""
        c, pack = self.config, self.ops.pack
        q = c.num_heads * c.head_dim
        for i, p in enumerate(self.layers):
            if i == len(self.layers) - 1:
                p.last_query = pack(LAST_QUERY, p.qkv_weight[:q], None)
                p.qkv = pack(KEY_VALUE, p.qkv_weight[q:], None)
            else:
                p.qkv = pack(QKV, p.qkv_weight, None)
            p.out = pack(OUT, p.out_weight, None)
            p.gate_up = pack(GATE_UP, p.gate_up_weight, None)
            p.down = pack(DOWN, p.down_weight, None)
            p.qkv_weight = p.out_weight = p.gate_up_weight = p.down_weight = None
        if c.head == "score":
            row = self.head_rows
        else:
            rows = self.head_rows if self.head_rows is not None else self.embed_tokens[list(self.answer_ids)]
            row = (rows[0].float() - rows[1].float())[None]
        self.head = pack(HEAD, row.contiguous(), None)
        self.head_rows = None

    @classmethod
    def load(cls, model_dir: Path, ops: Ops, device: torch.device, dtype: torch.dtype) -> Qwen3Reranker:
        """Builds the model from ``config.json``, the answer tokens' ids from ``tokenizer.json``,
        fills it from ``*.safetensors`` and packs the GEMMs."""
        config = Qwen3Config.from_hf(json.loads((model_dir / "config.json").read_text()))
        model = cls(config, ops, device, dtype, answer_token_ids(model_dir / "tokenizer.json", config.template))
        read_safetensors(model, model_dir, dtype)
        model.pack_gemms()
        return model

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.named_weights())

    @torch.inference_mode()
    def forward(self, b: DecoderBatch) -> torch.Tensor:
        c, ops = self.config, self.ops
        x, residual = self.embed_tokens[b.input_ids], None
        rope = self.cos[b.positions], self.sin[b.positions]  # every layer's rotation of each row
        for layer in self.layers[:-1]:
            x, residual = self._block(layer, x, residual, b, rope)
        x, residual = self._last_block(self.layers[-1], x, residual, b, rope)
        x, _ = ops.add_rmsnorm(x, residual, self.final_norm, c.rms_norm_eps)
        return self.head(x.float()).squeeze(-1)

    __call__ = forward

    def _attention_inputs(self, x: torch.Tensor, key_rows: torch.Tensor | None) -> torch.Tensor:
        return x if key_rows is None else x.index_select(0, key_rows)

    def _block(self, p: Layer, x: torch.Tensor, residual: torch.Tensor | None, b: DecoderBatch,
               rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """x (rows, hidden): the previous block's output, and the residual stream before it
        (None before the first block); rope: (cos, sin) (rows, head_dim / 2) -> the same after this block."""
        c, ops = self.config, self.ops
        rows, D, q = x.shape[0], c.head_dim, c.num_heads * c.head_dim
        h, residual = ops.add_rmsnorm(x, residual, p.attn_norm, c.rms_norm_eps)
        qkv = p.qkv(h)
        queries = qkv[:, :q].view(rows, c.num_heads, D)
        keys = qkv[:, q:q + c.num_kv_heads * D].view(rows, c.num_kv_heads, D)
        values = qkv[:, q + c.num_kv_heads * D:].view(rows, c.num_kv_heads, D)
        ops.norm_rope(queries, p.q_norm, *rope, c.rms_norm_eps)
        ops.norm_rope(keys, p.k_norm, *rope, c.rms_norm_eps)
        attn = ops.causal_attention(queries, self._attention_inputs(keys, b.key_rows),
                                    self._attention_inputs(values, b.key_rows), b.cu_q, b.cu_k, b.max_q, b.max_k,
                                    1.0 / math.sqrt(D))
        del qkv, queries, keys, values
        h, residual = ops.add_rmsnorm(p.out(attn.reshape(rows, q)), residual, p.mlp_norm, c.rms_norm_eps)
        return p.down(ops.swiglu(p.gate_up(h))), residual

    def _last_block(self, p: Layer, x: torch.Tensor, residual: torch.Tensor | None, b: DecoderBatch,
                    rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``_block`` with every row's keys and values, but queries, attention output and MLP
        for each pair's last row only -> (pairs, hidden) twice."""
        c, ops = self.config, self.ops
        rows, D, kv = x.shape[0], c.head_dim, c.num_kv_heads * c.head_dim
        h, residual = ops.add_rmsnorm(x, residual, p.attn_norm, c.rms_norm_eps)
        key_value = p.qkv(h)
        keys = key_value[:, :kv].view(rows, c.num_kv_heads, D)
        values = key_value[:, kv:].view(rows, c.num_kv_heads, D)
        ops.norm_rope(keys, p.k_norm, *rope, c.rms_norm_eps)
        last = b.last_rows
        queries = p.last_query(h.index_select(0, last)).view(-1, c.num_heads, D)
        ops.norm_rope(queries, p.q_norm, *(t.index_select(0, last) for t in rope), c.rms_norm_eps)
        cu_q = torch.arange(last.shape[0] + 1, device=x.device, dtype=torch.int32)
        attn = ops.causal_attention(queries, self._attention_inputs(keys, b.last_key_rows),
                                    self._attention_inputs(values, b.last_key_rows), cu_q, b.last_cu_k, 1,
                                    b.last_max_k, 1.0 / math.sqrt(D))
        del key_value, keys, values
        h, residual = ops.add_rmsnorm(p.out(attn.reshape(-1, c.num_heads * D)), residual.index_select(0, last),
                                      p.mlp_norm, c.rms_norm_eps)
        return p.down(ops.swiglu(p.gate_up(h))), residual


def answer_token_ids(tokenizer_file: Path, template: PromptTemplate) -> tuple[int, int]:
    """(yes, no) token ids from the checkpoint's tokenizer (never hard-coded)."""
    if not tokenizer_file.exists():
        raise UnsupportedModelError(f"{tokenizer_file.parent} has no tokenizer.json (the answer tokens' ids come "
                                    "from it)")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    ids = tuple(tokenizer.token_to_id(t) for t in (template.yes, template.no))
    if None in ids:
        raise UnsupportedModelError(f"the tokenizer has no token {template.yes!r} or {template.no!r} "
                                    "(the answer tokens of the prompt template)")
    return ids
