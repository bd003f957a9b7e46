"""The forward benchmark's workloads (token ids, packed as ours and Hugging Face run them)
and their FLOP counts."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from rerank_server.models.encoder import EncoderConfig
from rerank_server.scheduler import MAX_BATCH_PAIRS

MIXED_MEDIAN, MIXED_SIGMA, MIN_LEN, MAX_LEN = 192, 0.9, 16, 2048
BOS, EOS, PAD, FIRST_ORDINARY_ID = 0, 2, 1, 4  # <s> <pad> </s> <unk> are 0..3
WORKLOADS = ("uniform", "mixed", "long", "latency")


@dataclass
class Workload:
    name: str
    lengths: list[int]
    docs: list[np.ndarray]  # token ids per document, <s> ... </s>
    description: str
    latency: bool = False  # one request, timed --latency-repeats times
    ours_batches: list[tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=list)
    hf_batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def hf_padded_tokens(self, batch_size: int) -> int:
        return sum(len(g) * max(g) for g in chunks(self.lengths, batch_size))

    def padding_fraction(self, batch_size: int) -> float:
        return 1.0 - self.tokens / self.hf_padded_tokens(batch_size)

    def pack(self, max_batch_tokens: int, hf_batch_size: int, device: torch.device) -> None:
        self.ours_batches = pack_ours(self.docs, max_batch_tokens, device)
        self.hf_batches = pack_hf(self.docs, hf_batch_size, device)


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def make_docs(lengths: list[int], vocab_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    docs = []
    for n in lengths:
        body = rng.integers(FIRST_ORDINARY_ID, vocab_size - 1, size=n - 2)  # excludes <mask> (last id)
        docs.append(np.concatenate([[BOS], body, [EOS]]).astype(np.int64))
    return docs


def mixed_lengths(rng: np.random.Generator, n: int) -> list[int]:
    lengths = np.clip(np.rint(rng.lognormal(math.log(MIXED_MEDIAN), MIXED_SIGMA, n)), MIN_LEN, MAX_LEN)
    return [int(x) for x in lengths]


def mixed_description(n_docs: int, seed: int | str) -> str:
    return (f"{n_docs} docs, lognormal(median {MIXED_MEDIAN}, sigma {MIXED_SIGMA}) clipped to "
            f"{MIN_LEN}..{MAX_LEN}, seed {seed}")


def make_workloads(n_docs: int, vocab_size: int, uniform_len: int, seed: int) -> list[Workload]:
    """uniform and mixed (one generator, in this order of draws: the CPU figures depend on it)."""
    rng = np.random.default_rng(seed)
    uniform = [uniform_len] * n_docs
    mixed = mixed_lengths(rng, n_docs)
    return [
        Workload("uniform", uniform, make_docs(uniform, vocab_size, rng), f"{n_docs} docs x {uniform_len} tokens"),
        Workload("mixed", mixed, make_docs(mixed, vocab_size, rng), mixed_description(n_docs, seed)),
    ]


def make_long_workload(n_docs: int, length: int, vocab_size: int, seed: int) -> Workload:
    rng = np.random.default_rng([seed, 1])
    lengths = [length] * n_docs
    return Workload("long", lengths, make_docs(lengths, vocab_size, rng), f"{n_docs} docs x {length} tokens")


def make_latency_workload(n_docs: int, vocab_size: int, seed: int) -> Workload:
    rng = np.random.default_rng([seed, 2])
    lengths = mixed_lengths(rng, n_docs)
    return Workload("latency", lengths, make_docs(lengths, vocab_size, rng),
                    f"one request: {mixed_description(n_docs, f'({seed}, 2)')}", latency=True)


def lengths_summing_to(total: int, rng: np.random.Generator) -> list[int]:
    """Mixed lengths whose sum is exactly ``total`` (the last one takes the remainder)."""
    lengths, left = [], total
    while left >= MIN_LEN:
        n = min(mixed_lengths(rng, 1)[0], left)
        lengths.append(left if left - n < MIN_LEN else n)
        left -= lengths[-1]
    return lengths


def pack_ours(docs: list[np.ndarray], max_tokens: int, device: torch.device,
              max_pairs: int = MAX_BATCH_PAIRS) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Arrival order, greedily into unpadded batches of at most ``max_tokens`` tokens and
    ``max_pairs`` pairs (a longer single document gets a batch of its own): the batches the
    server's scheduler forms for the same pairs queued at once."""
    groups: list[list[np.ndarray]] = [[]]
    for d in docs:
        if groups[-1] and (sum(map(len, groups[-1])) + len(d) > max_tokens or len(groups[-1]) >= max_pairs):
            groups.append([])
        groups[-1].append(d)
    batches = []
    for g in groups:
        lengths = [len(d) for d in g]
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ids = torch.from_numpy(np.concatenate(g)).to(device)
        batches.append((ids, torch.from_numpy(cu).to(device), max(lengths)))
    return batches


def pack_hf(docs: list[np.ndarray], batch_size: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Arrival order, micro-batches of ``batch_size`` padded to their longest member."""
    batches = []
    for g in chunks(docs, batch_size):
        width = max(len(d) for d in g)
        ids = torch.full((len(g), width), PAD, dtype=torch.int64)
        mask = torch.zeros((len(g), width), dtype=torch.int64)
        for i, d in enumerate(g):
            ids[i, :len(d)] = torch.from_numpy(d)
            mask[i, :len(d)] = 1
        batches.append((ids.to(device), mask.to(device)))
    return batches



# --------------------------------------------------------------------------- FLOPs

def matmul_params(c: EncoderConfig) -> int:
    """Weights touched per token by the encoder's GEMMs (302M for bge-reranker-v2-m3)."""
    return c.num_layers * (4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size)


def useful_flops(c: EncoderConfig, lengths: list[int]) -> float:
    """GUIDE section 5: the full model on the real tokens, no padding, no last-layer saving."""
    return (2 * matmul_params(c) * sum(lengths)
            + 4 * c.num_layers * c.hidden_size * sum(n * n for n in lengths))


def ours_executed_flops(c: EncoderConfig, lengths: list[int]) -> float:
    """What our forward really runs: L-1 full layers; the last computes K and V for every
    token but Q, attention, output projection and FFN for each first token only; plus the head."""
    H, FF, L = c.hidden_size, c.intermediate_size, c.num_layers
    T, B, S2 = sum(lengths), len(lengths), sum(n * n for n in lengths)
    full_layer = 4 * H * H + 2 * H * FF
    return (2 * (L - 1) * full_layer * T + 4 * (L - 1) * H * S2
            + 2 * (2 * H * H) * T + 2 * (2 * H * H + 2 * H * FF) * B + 4 * H * T
            + 2 * (H * H + H) * B)


def hf_executed_flops(c: EncoderConfig, lengths: list[int], batch_size: int) -> float:
    """Hugging Face runs every padded position through every layer."""
    H, L = c.hidden_size, c.num_layers
    total = 0.0
    for g in chunks(lengths, batch_size):
        w = max(g)
        total += 2 * matmul_params(c) * len(g) * w + 4 * L * H * len(g) * w * w + 2 * (H * H + H) * len(g)
    return total

