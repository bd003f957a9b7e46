"""ModernBERT cross-encoders (``ModernBertForSequenceClassification``, e.g. gte-reranker-modernbert-base)
over unpadded variable-length batches (the encoder's convention: one ``(total, hidden)`` tensor,
``cu_seqlens`` (batch + 1,) int32, ``max_seqlen``).

transformers' ``modeling_modernbert.py`` is the reference: token embeddings -> LayerNorm (no
positions: rotary in attention); pre-norm blocks, the first layer's attention norm an identity;
fused ``Wqkv``; global layers (index % global_attn_every_n_layers == 0) attend to the whole
sequence with one RoPE theta, the others within a window (distance <= local_attention // 2, the
edge included, within each sequence) with another; a GeGLU MLP (gelu(first half) * second half);
a final norm; the head pools the first token or the mean of the sequence (``classifier_pooling``),
then dense -> activation -> LayerNorm -> classifier, here in fp32. Biases only where the config has
them (``attention_bias``, ``mlp_bias``, ``norm_bias``, ``classifier_bias``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rerank_kernels import Ops
from rerank_kernels.linear import GemmShape
from rerank_kernels.rotary import rope_table
from rerank_server.models.registry import EncoderConfigBase, EncoderFamily, UnsupportedModelError, architecture_of
from rerank_server.models.weights import model_tensors, read_safetensors

# GEMM kinds (rerank_kernels.linear): each gets one measured choice on the CPU
QKV = "modernbert_qkv"  # 3 * hidden <- hidden
OUT = "modernbert_out"  # hidden <- hidden
UP = "modernbert_up"  # intermediate <- hidden: the GeGLU's input half (Wi's first rows), GELU included
GATE = "modernbert_gate"  # intermediate <- hidden: its gate (Wi's last rows)
DOWN = "modernbert_down"  # hidden <- intermediate
HEAD_DENSE = "modernbert_head_dense"  # hidden <- hidden, fp32, its activation included
CLASSIFIER = "modernbert_classifier"  # 1 <- hidden, fp32

FFN_ROWS = 4096  # tokens per MLP slice: bounds the (rows, 2 * intermediate) activation
# transformers' ACT2FN names -> the GELU form
GELU = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}


@dataclass(frozen=True)
class ModernBertConfig(EncoderConfigBase):
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    norm_bias: bool
    attention_bias: bool
    mlp_bias: bool
    classifier_bias: bool
    hidden_gelu: str  # "none" (exact erf) or "tanh"
    classifier_gelu: str
    pooling: str  # "cls" or "mean"
    global_layers: tuple[bool, ...]  # per layer: full attention (True) or the window
    global_theta: float
    local_theta: float
    window: int  # a local layer's token attends to distance <= window: local_attention // 2
    family_data: EncoderFamily
    family: str = "modernbert"

    uses_token_types = False  # no token type embeddings

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf: dict) -> ModernBertConfig:
        """Reads a Hugging Face ``config.json`` dict (the hub's fields, ``global_rope_theta`` and
        ``global_attn_every_n_layers``, or transformers 5's ``rope_parameters`` and ``layer_types``);
        refuses what this forward cannot run."""
        name, row = architecture_of(hf)
        labels = len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", 2)
        if labels != 1:
            raise UnsupportedModelError(f"a reranker has one output label; this checkpoint has {labels}")
        for field in ("hidden_activation", "classifier_activation"):
            if hf.get(field, "gelu") not in GELU:
                raise UnsupportedModelError(f"{field} {hf[field]!r} is not supported (one of {', '.join(GELU)})")
        if hf.get("classifier_pooling", "cls") not in ("cls", "mean"):
            raise UnsupportedModelError(f"classifier_pooling {hf['classifier_pooling']!r} is not supported "
                                        "(cls or mean)")
        if hf["hidden_size"] % hf["num_attention_heads"]:
            raise UnsupportedModelError("hidden_size must be a multiple of num_attention_heads")
        layers = hf["num_hidden_layers"]
        every = hf.get("global_attn_every_n_layers", 3)
        types = hf.get("layer_types") or ["full_attention" if i % every == 0 else "sliding_attention"
                                          for i in range(layers)]
        if len(types) != layers or set(types) - {"full_attention", "sliding_attention"}:
            raise UnsupportedModelError(f"layer_types {types} is not one of full_attention/sliding_attention "
                                        "per layer")
        rope = hf.get("rope_parameters") or {}
        for params in (rope.get("full_attention"), rope.get("sliding_attention"), hf.get("rope_scaling")):
            if params and params.get("rope_type", params.get("type", "default")) != "default":
                raise UnsupportedModelError(f"rope type {params.get('rope_type', params.get('type'))!r} is not "
                                            "supported (only the default rotary embedding)")
        global_theta = (rope.get("full_attention") or {}).get("rope_theta", hf.get("global_rope_theta", 160000.0))
        local_theta = (rope.get("sliding_attention") or {}).get("rope_theta", hf.get("local_rope_theta", 10000.0))
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=layers,
            num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 8192), norm_eps=hf.get("norm_eps", 1e-5),
            norm_bias=hf.get("norm_bias", False), attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False), classifier_bias=hf.get("classifier_bias", False),
            hidden_gelu=GELU[hf.get("hidden_activation", "gelu")],
            classifier_gelu=GELU[hf.get("classifier_activation", "gelu")],
            pooling=hf.get("classifier_pooling", "cls"), global_layers=tuple(t == "full_attention" for t in types),
            global_theta=float(global_theta), local_theta=float(local_theta),
            window=hf.get("local_attention", 128) // 2, family_data=row.data, family=hf["model_type"])

    def gemm_shapes(self) -> tuple[GemmShape, ...]:
        """Every GEMM kind of this forward, for the CPU's measured choice (rerank_kernels.linear)."""
        H, FF = self.hidden_size, self.intermediate_size
        return (GemmShape(QKV, 3 * H, H), GemmShape(OUT, H, H), GemmShape(UP, FF, H, gelu=self.hidden_gelu == "none"),
                GemmShape(GATE, FF, H), GemmShape(DOWN, H, FF),
                GemmShape(HEAD_DENSE, H, H, gelu=self.classifier_gelu == "none", fp32=True),
                GemmShape(CLASSIFIER, 1, H, fp32=True))


@dataclass
class Layer:
    """One pre-norm block; the GEMMs' ``*_weight``/``*_bias`` are packed into ``qkv``, ``out``,
    ``up``, ``down`` by ``ModernBertReranker.pack_gemms`` and dropped. Absent biases are None."""

    attn_norm: torch.Tensor | None  # None in layer 0 (an identity)
    attn_norm_bias: torch.Tensor | None
    qkv_weight: torch.Tensor | None
    qkv_bias: torch.Tensor | None
    out_weight: torch.Tensor | None
    out_bias: torch.Tensor | None
    mlp_norm: torch.Tensor
    mlp_norm_bias: torch.Tensor | None
    up_weight: torch.Tensor | None
    up_bias: torch.Tensor | None
    down_weight: torch.Tensor | None
    down_bias: torch.Tensor | None
    is_global: bool = True
    qkv: object = None
    out: object = None
    up: object = None
    gate: object = None
    down: object = None


def positions_in_sequences(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64: each token's position within its sequence, from 0 (no host sync)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


class ModernBertReranker:
    """``forward(input_ids, cu_seqlens, max_seqlen, token_type_ids=None) -> logits (batch,) float32``."""

    Config = ModernBertConfig

    def __init__(self, config: ModernBertConfig, ops: Ops, device: torch.device, dtype: torch.dtype):
        c, self.config, self.ops, self.device, self.dtype = config, config, ops, device, dtype
        H, FF = c.hidden_size, c.intermediate_size

        def empty(*shape: int, present: bool = True, dtype: torch.dtype = dtype) -> torch.Tensor | None:
            return torch.empty(shape, device=device, dtype=dtype) if present else None

        self.embeddings = empty(c.vocab_size, H)
        self.embed_norm, self.embed_norm_bias = empty(H), empty(H, present=c.norm_bias)
        self.layers = [
            Layer(empty(H, present=i > 0), empty(H, present=i > 0 and c.norm_bias),
                  empty(3 * H, H), empty(3 * H, present=c.attention_bias),
                  empty(H, H), empty(H, present=c.attention_bias),
                  empty(H), empty(H, present=c.norm_bias),
                  empty(2 * FF, H), empty(2 * FF, present=c.mlp_bias),
                  empty(H, FF), empty(H, present=c.mlp_bias), is_global=c.global_layers[i])
            for i in range(c.num_layers)]
        self.final_norm, self.final_norm_bias = empty(H), empty(H, present=c.norm_bias)
        # the head in fp32 (as the encoder's: near-equal documents must not tie by rounding)
        f32 = torch.float32
        self.head_dense_weight = empty(H, H, dtype=f32)
        self.head_dense_bias = empty(H, present=c.classifier_bias, dtype=f32)
        self.head_norm, self.head_norm_bias = empty(H, dtype=f32), empty(H, present=c.norm_bias, dtype=f32)
        self.classifier_weight, self.classifier_bias = empty(1, H, dtype=f32), empty(1, dtype=f32)
        self.head_dense = self.classifier = None
        # (cos, sin) tables by attention kind, (max positions, head_dim / 2) fp32 each
        self.rope = {True: rope_table(c.max_tokens, c.head_dim, c.global_theta, device),
                     False: rope_table(c.max_tokens, c.head_dim, c.local_theta, device)}
        self.num_parameters = sum(t.numel() for _, t in self.named_weights())
        self.weight_bytes = sum(t.numel() * t.element_size() for _, t in self.named_weights())

    @classmethod
    def load(cls, model_dir: Path, ops: Ops, device: torch.device, dtype: torch.dtype) -> ModernBertReranker:
        """Builds the model from ``config.json``, fills it from ``*.safetensors``, packs the GEMMs."""
        model = cls(ModernBertConfig.from_hf(json.loads((model_dir / "config.json").read_text())), ops, device, dtype)
        read_safetensors(model, model_dir, dtype)
        model.pack_gemms()
        return model

    def named_weights(self):
        """(name, tensor) for every weight the checkpoint fills, in a stable order."""
        return model_tensors(self)

    def destination(self, name: str) -> torch.Tensor | None:
        """The weight that the Hugging Face tensor ``name`` fills (None: unused)."""
        parts = name.removeprefix("model.").split(".")
        if parts[0] == "layers" and len(parts) >= 4:
            index, module, kind = int(parts[1]), ".".join(parts[2:-1]), parts[-1]
            if index >= len(self.layers):
                return None
            weight, bias = {"attn_norm": ("attn_norm", "attn_norm_bias"), "attn.Wqkv": ("qkv_weight", "qkv_bias"),
                            "attn.Wo": ("out_weight", "out_bias"), "mlp_norm": ("mlp_norm", "mlp_norm_bias"),
                            "mlp.Wi": ("up_weight", "up_bias"), "mlp.Wo": ("down_weight", "down_bias"),
                            }.get(module, (None, None))
            attr = {"weight": weight, "bias": bias}.get(kind)
            return getattr(self.layers[index], attr) if attr else None
        return {
            "embeddings.tok_embeddings.weight": self.embeddings, "embeddings.norm.weight": self.embed_norm,
            "embeddings.norm.bias": self.embed_norm_bias, "final_norm.weight": self.final_norm,
            "final_norm.bias": self.final_norm_bias, "head.dense.weight": self.head_dense_weight,
            "head.dense.bias": self.head_dense_bias, "head.norm.weight": self.head_norm,
            "head.norm.bias": self.head_norm_bias, "classifier.weight": self.classifier_weight,
            "classifier.bias": self.classifier_bias,
        }.get(".".join(parts))

    def pack_gemms(self) -> None:
        """Builds every GEMM through ``ops.pack`` and drops the plain weights, layer by layer;
        Wi is packed as two GEMMs (the GELU half, the gate half)."""
        c, pack, FF = self.config, self.ops.pack, self.config.intermediate_size
        for p in self.layers:
            p.qkv, p.out = pack(QKV, p.qkv_weight, p.qkv_bias), pack(OUT, p.out_weight, p.out_bias)
            halves = (None, None) if p.up_bias is None else (p.up_bias[:FF], p.up_bias[FF:])
            p.up = self.ops.pack_gelu(UP, p.up_weight[:FF], halves[0], c.hidden_gelu)
            p.gate, p.down = pack(GATE, p.up_weight[FF:], halves[1]), pack(DOWN, p.down_weight, p.down_bias)
            p.qkv_weight = p.qkv_bias = p.out_weight = p.out_bias = None
            p.up_weight = p.up_bias = p.down_weight = p.down_bias = None
        self.head_dense = self.ops.pack_gelu(HEAD_DENSE, self.head_dense_weight, self.head_dense_bias,
                                             c.classifier_gelu)
        self.classifier = pack(CLASSIFIER, self.classifier_weight, self.classifier_bias)
        self.head_dense_weight = self.head_dense_bias = self.classifier_weight = self.classifier_bias = None

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.config.norm_eps)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (total,) int64, cu_seqlens (batch + 1,) int32 on the model's device; token
        types are ignored (ModernBERT has none)."""
        total = input_ids.shape[0]
        positions = positions_in_sequences(cu_seqlens, total)
        x = self._norm(self.embeddings[input_ids], self.embed_norm, self.embed_norm_bias)
        for p in self.layers:
            x = self._block(p, x, cu_seqlens, max_seqlen, positions, *self.rope[p.is_global])
        x = self._norm(x, self.final_norm, self.final_norm_bias)
        return self.head(x, cu_seqlens)

    __call__ = forward

    def head(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """(total, hidden) final-norm rows -> (batch,) fp32 logits: pool each sequence (its first
        token, or the mean of its tokens in fp32, summed in token order: batch invariant on the
        CPU), then dense -> activation -> LayerNorm -> classifier."""
        starts = cu_seqlens[:-1].long()
        if self.config.pooling == "cls":
            pooled = x[starts].float()
        else:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            owner = torch.repeat_interleave(torch.arange(lengths.shape[0], device=x.device), lengths,
                                            output_size=x.shape[0])
            pooled = torch.zeros(lengths.shape[0], x.shape[1], device=x.device, dtype=torch.float32)
            pooled.index_add_(0, owner, x.float()).div_(lengths[:, None])
        h = self.head_dense(pooled)
        return self.classifier(self._norm(h, self.head_norm, self.head_norm_bias)).squeeze(-1)

    def _block(self, p: Layer, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, positions: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (total, hidden) -> (total, hidden): x + attention(norm(x)), then + MLP(norm(x))."""
        c, ops = self.config, self.ops
        total, heads, dim = x.shape[0], c.num_heads, c.head_dim
        h = x if p.attn_norm is None else self._norm(x, p.attn_norm, p.attn_norm_bias)
        qkv = p.qkv(h).view(total, 3, heads, dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        ops.rope(q, positions, cos, sin)
        ops.rope(k, positions, cos, sin)
        scale = 1.0 / math.sqrt(dim)
        if p.is_global:
            attn = ops.varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale)
        else:
            attn = ops.local_attention(q, k, v, cu_seqlens, max_seqlen, c.window, scale)
        del q, k, v, qkv
        x = x + p.out(attn.reshape(total, c.hidden_size))
        for start in range(0, total, FFN_ROWS):  # the MLP in row slices, written over the rows it read
            rows = x[start:start + FFN_ROWS]
            h = self._norm(rows, p.mlp_norm, p.mlp_norm_bias)
            rows += p.down(p.up(h).mul_(p.gate(h)))
        return x
