"""DeBERTa-v2 / v3 cross-encoders (``DebertaV2ForSequenceClassification``, e.g. mxbai-rerank-*-v1) over
unpadded variable-length batches (the encoder's convention: ``(total, hidden)``, ``cu_seqlens``).

transformers' ``modeling_deberta_v2.py`` is the reference: word embeddings (+ absolute positions
only where ``position_biased_input``, + token types where the config has them, projected when
``embedding_size`` differs) -> LayerNorm; post-norm blocks as BERT's, but the attention is
disentangled (``rerank_kernels.disentangled_attention``): c2p and p2c terms from relative position
embeddings (LayerNorm'd where ``norm_rel_ebd`` says so) projected by the layer's own key and query
projections (``share_att_key``) or by its ``pos_*_proj``, indexed by log-bucketed distances
(``position_buckets``, ``max_relative_positions``), every score divided by
sqrt(head_dim * (1 + len(pos_att_type))). The projected relative embeddings do not depend on the
input: they are computed once at load. Head: the pooler (dense + GELU on the first token), then the
classifier, in fp32.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rerank_kernels import Ops
from rerank_kernels.disentangled_attention import disentangled_attention_torch, relative_index
from rerank_kernels.linear import GemmShape
from rerank_server.models.registry import EncoderConfigBase, EncoderFamily, UnsupportedModelError, architecture_of
from rerank_server.models.weights import model_tensors, read_safetensors

# GEMM kinds (rerank_kernels.linear): each gets one measured choice on the CPU
QKV = "deberta_qkv"  # 3 * hidden <- hidden
POSITION = "deberta_position"  # hidden <- hidden: pos_key_proj / pos_query_proj (once, at load)
OUT = "deberta_out"  # hidden <- hidden
UP = "deberta_up"  # intermediate <- hidden, bias and GELU included
DOWN = "deberta_down"  # hidden <- intermediate
EMBED_PROJ = "deberta_embed_proj"  # hidden <- embedding_size
POOLER = "deberta_pooler"  # hidden <- hidden, fp32, GELU included
CLASSIFIER = "deberta_classifier"  # 1 <- hidden, fp32


@dataclass(frozen=True)
class DebertaV2Config(EncoderConfigBase):
    vocab_size: int
    hidden_size: int
    embedding_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    position_biased_input: bool
    relative_attention: bool
    c2p: bool
    p2c: bool
    share_att_key: bool
    norm_rel_embeddings: bool
    span: int  # relative embedding rows per side: position_buckets, else max_relative_positions
    position_buckets: int
    max_relative_positions: int
    family_data: EncoderFamily
    family: str = "deberta-v2"

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings

    @property
    def scale(self) -> float:
        """What every attention score is divided by."""
        return math.sqrt(self.head_dim * (1 + self.c2p + self.p2c))

    @classmethod
    def from_hf(cls, hf: dict) -> DebertaV2Config:
        """Reads a Hugging Face ``config.json`` dict; refuses what this forward cannot run."""
        name, row = architecture_of(hf)
        labels = len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", 2)
        if labels != 1:
            raise UnsupportedModelError(f"a reranker has one output label; this checkpoint has {labels}")
        for field in ("hidden_act", "pooler_hidden_act"):
            if hf.get(field, "gelu") != "gelu":
                raise UnsupportedModelError(f"{field} {hf[field]!r} is not supported (only exact 'gelu')")
        if hf.get("conv_kernel_size", 0) > 0:
            raise UnsupportedModelError("conv_kernel_size > 0 (DeBERTa-v2's convolution layer) is not supported")
        if hf.get("pooler_hidden_size", hf["hidden_size"]) != hf["hidden_size"]:
            raise UnsupportedModelError("pooler_hidden_size must equal hidden_size")
        if hf["hidden_size"] % hf["num_attention_heads"] or hf.get("attention_head_size", hf["hidden_size"] // hf[
                "num_attention_heads"]) * hf["num_attention_heads"] != hf["hidden_size"]:
            raise UnsupportedModelError("hidden_size must be num_attention_heads x attention_head_size")
        kinds = hf.get("pos_att_type") or []
        if isinstance(kinds, str):  # older configs: "p2c|c2p"
            kinds = [kind.strip() for kind in kinds.lower().split("|")]
        if set(kinds) - {"c2p", "p2c"}:
            raise UnsupportedModelError(f"pos_att_type {kinds} is not supported (c2p and p2c)")
        relative = hf.get("relative_attention", False)
        max_relative = hf.get("max_relative_positions", -1)
        max_relative = max_relative if max_relative >= 1 else hf.get("max_position_embeddings", 512)
        buckets = hf.get("position_buckets", -1)
        norm_rel = [x.strip() for x in hf.get("norm_rel_ebd", "none").lower().split("|")]
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            embedding_size=hf.get("embedding_size") or hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 0), layer_norm_eps=hf.get("layer_norm_eps", 1e-7),
            position_biased_input=hf.get("position_biased_input", True), relative_attention=relative,
            c2p=relative and "c2p" in kinds, p2c=relative and "p2c" in kinds,
            share_att_key=hf.get("share_att_key", False), norm_rel_embeddings="layer_norm" in norm_rel,
            span=buckets if buckets > 0 else max_relative, position_buckets=buckets,
            max_relative_positions=max_relative, family_data=row.data, family=hf["model_type"])

    def gemm_shapes(self) -> tuple[GemmShape, ...]:
        """Every GEMM kind of this forward, for the CPU's measured choice (rerank_kernels.linear)."""
        H, E, FF = self.hidden_size, self.embedding_size, self.intermediate_size
        return (GemmShape(QKV, 3 * H, H), GemmShape(POSITION, H, H), GemmShape(OUT, H, H),
                GemmShape(UP, FF, H, gelu=True), GemmShape(DOWN, H, FF), GemmShape(EMBED_PROJ, H, E),
                GemmShape(POOLER, H, H, gelu=True, fp32=True), GemmShape(CLASSIFIER, 1, H, fp32=True))


@dataclass
class Layer:
    """One post-norm block; Q, K and V fused into one GEMM. ``pos_query``/``pos_key``: the
    relative embeddings projected by this layer, (2 * span, heads, head_dim), set at load."""

    qkv_weight: torch.Tensor | None
    qkv_bias: torch.Tensor | None
    pos_key_weight: torch.Tensor | None  # without share_att_key
    pos_key_bias: torch.Tensor | None
    pos_query_weight: torch.Tensor | None
    pos_query_bias: torch.Tensor | None
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
    pos_query: torch.Tensor | None = None
    pos_key: torch.Tensor | None = None
    qkv: object = None
    out: object = None
    up: object = None
    down: object = None


class DebertaV2Reranker:
    """``forward(input_ids, cu_seqlens, max_seqlen, token_type_ids=None) -> logits (batch,) float32``."""

    Config = DebertaV2Config

    def __init__(self, config: DebertaV2Config, ops: Ops, device: torch.device, dtype: torch.dtype):
        c, self.config, self.ops, self.device, self.dtype = config, config, ops, device, dtype
        H, E, FF = c.hidden_size, c.embedding_size, c.intermediate_size
        own_positions = c.relative_attention and not c.share_att_key

        def empty(*shape: int, present: bool = True, dtype: torch.dtype = dtype) -> torch.Tensor | None:
            return torch.empty(shape, device=device, dtype=dtype) if present else None

        self.word_embeddings = empty(c.vocab_size, E)
        self.position_embeddings = empty(c.max_position_embeddings, E, present=c.position_biased_input)
        self.token_type_embeddings = empty(c.type_vocab_size, E, present=c.type_vocab_size > 0)
        self.embed_proj_weight = empty(H, E, present=E != H)
        self.embed_norm_weight, self.embed_norm_bias = empty(H), empty(H)
        self.rel_embeddings = empty(2 * c.span, H, present=c.relative_attention)
        self.rel_norm_weight = empty(H, present=c.relative_attention and c.norm_rel_embeddings)
        self.rel_norm_bias = empty(H, present=c.relative_attention and c.norm_rel_embeddings)
        self.layers = [
            Layer(empty(3 * H, H), empty(3 * H), empty(H, H, present=own_positions and c.c2p),
                  empty(H, present=own_positions and c.c2p), empty(H, H, present=own_positions and c.p2c),
                  empty(H, present=own_positions and c.p2c), empty(H, H), empty(H), empty(H), empty(H),
                  empty(FF, H), empty(FF), empty(H, FF), empty(H), empty(H), empty(H))
            for _ in range(c.num_layers)]
        f32 = torch.float32
        self.pooler_weight, self.pooler_bias = empty(H, H, dtype=f32), empty(H, dtype=f32)
        self.classifier_weight, self.classifier_bias = empty(1, H, dtype=f32), empty(1, dtype=f32)
        self.embed_proj = self.pooler = self.classifier = None
        c2p, p2c = relative_index(c.max_tokens, c.span, c.position_buckets, c.max_relative_positions)
        self.c2p_index, self.p2c_index = c2p.to(device), p2c.to(device)
        self.num_parameters = sum(t.numel() for _, t in self.named_weights())
        self.weight_bytes = sum(t.numel() * t.element_size() for _, t in self.named_weights())

    @classmethod
    def load(cls, model_dir: Path, ops: Ops, device: torch.device, dtype: torch.dtype) -> DebertaV2Reranker:
        """Builds the model from ``config.json``, fills it from ``*.safetensors``, packs the GEMMs and
        projects the relative embeddings."""
        model = cls(DebertaV2Config.from_hf(json.loads((model_dir / "config.json").read_text())), ops, device, dtype)
        read_safetensors(model, model_dir, dtype)
        model.pack_gemms()
        return model

    def named_weights(self):
        """(name, tensor) for every weight the checkpoint fills, in a stable order."""
        # the index tables and each layer's projected relative embeddings are computed at load
        return model_tensors(self, skip={n for n in vars(self) if n.endswith("_index")},
                             skip_in_layers={"pos_query", "pos_key"})

    def destination(self, name: str) -> torch.Tensor | None:
        """The weight (or the slice of the fused QKV) that the Hugging Face tensor ``name`` fills."""
        name = name.removeprefix("deberta.")
        parts = name.split(".")
        if parts[:2] == ["encoder", "layer"] and len(parts) >= 5:
            index, module, kind = int(parts[2]), ".".join(parts[3:-1]), parts[-1]
            if index >= len(self.layers):
                return None
            layer, H = self.layers[index], self.config.hidden_size
            thirds = {"attention.self.query_proj": 0, "attention.self.key_proj": 1, "attention.self.value_proj": 2}
            if module in thirds:
                fused = layer.qkv_weight if kind == "weight" else layer.qkv_bias
                return fused[thirds[module] * H:(thirds[module] + 1) * H]
            field = {"attention.self.pos_key_proj": "pos_key", "attention.self.pos_query_proj": "pos_query",
                     "attention.output.dense": "out", "attention.output.LayerNorm": "attn_norm",
                     "intermediate.dense": "up", "output.dense": "down", "output.LayerNorm": "ffn_norm"}.get(module)
            return getattr(layer, f"{field}_{kind}", None) if field else None
        return {
            "embeddings.word_embeddings.weight": self.word_embeddings,
            "embeddings.position_embeddings.weight": self.position_embeddings,
            "embeddings.token_type_embeddings.weight": self.token_type_embeddings,
            "embeddings.embed_proj.weight": self.embed_proj_weight,
            "embeddings.LayerNorm.weight": self.embed_norm_weight, "embeddings.LayerNorm.bias": self.embed_norm_bias,
            "encoder.rel_embeddings.weight": self.rel_embeddings,
            "encoder.LayerNorm.weight": self.rel_norm_weight, "encoder.LayerNorm.bias": self.rel_norm_bias,
            "pooler.dense.weight": self.pooler_weight, "pooler.dense.bias": self.pooler_bias,
            "classifier.weight": self.classifier_weight, "classifier.bias": self.classifier_bias,
        }.get(name)

    def pack_gemms(self) -> None:
        """Builds every GEMM through ``ops.pack``, projects the relative embeddings through each
        layer's (as transformers does on every forward), and drops the plain weights."""
        c, ops, H = self.config, self.ops, self.config.hidden_size
        rel = None
        if c.relative_attention:
            rel = self.rel_embeddings
            if c.norm_rel_embeddings:
                rel = F.layer_norm(rel, (H,), self.rel_norm_weight, self.rel_norm_bias, c.layer_norm_eps)
        shape = (2 * c.span, c.num_heads, c.head_dim)
        for p in self.layers:
            if rel is not None:
                if c.share_att_key:  # the content projections, with their biases
                    key_w, key_b, query_w, query_b = p.qkv_weight[H:2 * H], p.qkv_bias[H:2 * H], \
                        p.qkv_weight[:H], p.qkv_bias[:H]
                else:
                    key_w, key_b, query_w, query_b = p.pos_key_weight, p.pos_key_bias, p.pos_query_weight, \
                        p.pos_query_bias
                if c.c2p:
                    p.pos_key = ops.pack(POSITION, key_w, key_b)(rel).view(shape)
                if c.p2c:
                    p.pos_query = ops.pack(POSITION, query_w, query_b)(rel).view(shape)
            p.qkv, p.out = ops.pack(QKV, p.qkv_weight, p.qkv_bias), ops.pack(OUT, p.out_weight, p.out_bias)
            p.up, p.down = ops.pack_gelu(UP, p.up_weight, p.up_bias), ops.pack(DOWN, p.down_weight, p.down_bias)
            p.qkv_weight = p.qkv_bias = p.out_weight = p.out_bias = p.up_weight = p.up_bias = None
            p.down_weight = p.down_bias = p.pos_key_weight = p.pos_key_bias = None
            p.pos_query_weight = p.pos_query_bias = None
        if self.embed_proj_weight is not None:
            self.embed_proj = ops.pack(EMBED_PROJ, self.embed_proj_weight, None)
        self.pooler = ops.pack_gelu(POOLER, self.pooler_weight, self.pooler_bias)
        self.classifier = ops.pack(CLASSIFIER, self.classifier_weight, self.classifier_bias)
        self.pooler_weight = self.pooler_bias = self.classifier_weight = self.classifier_bias = None
        self.embed_proj_weight = self.rel_embeddings = self.rel_norm_weight = self.rel_norm_bias = None

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.config.layer_norm_eps)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (total,) int64, cu_seqlens (batch + 1,) int32, token_type_ids (total,) int64 or
        None (all type 0), on the model's device."""
        c = self.config
        x = self.word_embeddings[input_ids]
        if self.position_embeddings is not None:  # absolute positions from 0 in each sequence
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths, output_size=x.shape[0])
            x = x + self.position_embeddings[torch.arange(x.shape[0], device=x.device) - starts]
        if self.token_type_embeddings is not None:
            x = x + (self.token_type_embeddings[token_type_ids] if token_type_ids is not None and c.uses_token_types
                     else self.token_type_embeddings[0])
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = self._norm(x, self.embed_norm_weight, self.embed_norm_bias)
        for p in self.layers:
            x = self._block(p, x, cu_seqlens)
        first = x[cu_seqlens[:-1].long()].float()
        return self.classifier(self.pooler(first)).squeeze(-1)

    __call__ = forward

    def _block(self, p: Layer, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """x (total, hidden) -> (total, hidden): LayerNorm(x + attention), then LayerNorm(. + FFN)."""
        c = self.config
        total = x.shape[0]
        qkv = p.qkv(x).view(total, 3, c.num_heads, c.head_dim)
        attn = disentangled_attention_torch(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, p.pos_query, p.pos_key,
                                            self.c2p_index, self.p2c_index, c.scale)
        del qkv
        x = self._norm(p.out(attn.reshape(total, c.hidden_size)).add_(x), p.attn_norm_weight, p.attn_norm_bias)
        return self._norm(p.down(p.up(x)).add_(x), p.ffn_norm_weight, p.ffn_norm_bias)
