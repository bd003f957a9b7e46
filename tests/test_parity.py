"""Our unpadded forward against transformers' XLMRobertaForSequenceClassification on the
same weights: fp32 logits within 1e-4, same order, over random lengths up to long sequences,
with the CPU's oneDNN GEMMs (weights reordered once) as the server runs them where they
measure faster; bf16 logits within 3x the error of transformers' own bf16 model."""
import json

import pytest
import torch
from transformers import XLMRobertaForSequenceClassification

import rerank_kernels
from rerank_kernels import ModelShapes, select_ops
from rerank_server.checkpoint import write_random_checkpoint
from rerank_server.models.encoder import EncoderConfig, load_cross_encoder

NATIVE_BF16 = rerank_kernels.native_bf16_missing() is None


def load_ours(path, dtype=torch.float32, cpu_gemm="onednn"):
    """Our model with the ops the server would choose for it, here pinned to oneDNN's GEMMs."""
    c = EncoderConfig.from_hf(json.loads((path / "config.json").read_text()))
    ops = select_ops("cpu", dtype=dtype, cpu_gemm=cpu_gemm,
                     shapes=ModelShapes(c.hidden_size, c.intermediate_size, c.num_heads))
    return load_cross_encoder(path, ops, torch.device("cpu"), dtype)

CONFIGS = {
    # the default tiny shape
    "tiny": dict(size="tiny", seed=11),
    # odd sizes: 3 layers, 6 heads of 16, FFN 200
    "odd": dict(size="tiny", seed=12, hidden_size=96, num_attention_heads=6, num_hidden_layers=3,
                intermediate_size=200),
}


def random_batch(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    # real sequences start with <s> (0) and end with </s> (2); ids in between are ordinary pieces
    seqs = [torch.cat([torch.tensor([0]), torch.randint(5, 250000, (n - 2,), generator=g), torch.tensor([2])])
            if n >= 2 else torch.tensor([0]) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return seqs, torch.cat(seqs), cu


def hf_logits(hf, seqs):
    with torch.inference_mode():
        return torch.stack([hf(input_ids=s[None]).logits[0, 0] for s in seqs])


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request, tmp_path_factory):
    spec = dict(CONFIGS[request.param])
    path = write_random_checkpoint(tmp_path_factory.mktemp(request.param), spec.pop("size"), spec.pop("seed"), **spec)
    ours = load_ours(path)
    hf = XLMRobertaForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    return ours, hf, path


def test_random_lengths_match_transformers(models):
    ours, hf, _ = models
    g = torch.Generator().manual_seed(3)
    lengths = [1, 2, 3, 2048 + 77] + torch.randint(4, 700, (12,), generator=g).tolist()
    seqs, ids, cu = random_batch(lengths, seed=5)
    got = ours(ids, cu, max(lengths))
    want = hf_logits(hf, seqs)
    assert got.shape == (len(lengths),)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, f"max abs logit diff {diff}"
    order = torch.argsort(want, descending=True, stable=True)
    assert torch.equal(torch.argsort(got, descending=True, stable=True), order)
    assert want.std() > 1e-3  # the check means something only if the logits differ


def test_padded_hf_batch_matches_unpadded(models):
    """HF's own padded batch (attention mask) agrees with our concatenated one."""
    ours, hf, _ = models
    lengths = [5, 40, 9, 130]
    seqs, ids, cu = random_batch(lengths, seed=7)
    padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=1)
    mask = (torch.arange(padded.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    with torch.inference_mode():
        want = hf(input_ids=padded, attention_mask=mask).logits[:, 0]
    assert (ours(ids, cu, max(lengths)) - want).abs().max().item() <= 1e-4


def test_full_context_8192_tokens(tmp_path):
    """The last position embedding (8193) is used by an 8192-token pair: positions start at 2."""
    path = write_random_checkpoint(tmp_path, "tiny", seed=13, hidden_size=32, num_attention_heads=2,
                                   num_hidden_layers=1, intermediate_size=64)
    ours = load_ours(path)
    hf = XLMRobertaForSequenceClassification.from_pretrained(path, attn_implementation="sdpa").eval()
    lengths = [8192, 3]
    seqs, ids, cu = random_batch(lengths, seed=9)
    assert (ours(ids, cu, 8192) - hf_logits(hf, seqs)).abs().max().item() <= 1e-4


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bfloat16 (--dtype bfloat16 is refused)")
def test_bfloat16_error_within_3x_transformers_own(models):
    """--dtype bfloat16 on the CPU: our logits' error against transformers fp32 is at most 3x
    the error of transformers' own bf16 model against its fp32, over random lengths and one
    sequence of 4,100 tokens, with the GEMMs the server would choose (measured)."""
    _, hf32, path = models
    ours = load_ours(path, torch.bfloat16, cpu_gemm="auto")
    hf16 = XLMRobertaForSequenceClassification.from_pretrained(path, attn_implementation="eager",
                                                               dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(4)
    lengths = [4100, 1, 3] + torch.randint(4, 500, (12,), generator=g).tolist()
    seqs, ids, cu = random_batch(lengths, seed=6)
    want = hf_logits(hf32, seqs)
    hf_error = (hf_logits(hf16, seqs).float() - want).abs().max().item()
    our_error = (ours(ids, cu, max(lengths)) - want).abs().max().item()
    assert hf_error > 0 and our_error <= 3 * hf_error, f"ours {our_error:.3g} vs transformers bf16 {hf_error:.3g}"
    long_error = (ours(ids[:4100], cu[:2], 4100) - want[:1]).abs().item()
    assert long_error <= 3 * hf_error, f"the 4,100-token sequence: {long_error:.3g} vs {hf_error:.3g}"
