"""Checkpoint loading: straight from safetensors, refusals with clear messages, hub resolution."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from rerank_kernels import TORCH_OPS
from rerank_server.checkpoint import write_random_checkpoint
from rerank_server.engine import Engine, ModelNotFoundError, resolve_model_dir
from rerank_server.models.encoder import EncoderConfig, UnsupportedModelError, load_cross_encoder

CPU = torch.device("cpu")


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_weights_land_where_transformers_puts_them(tiny_checkpoint):
    model = load_cross_encoder(tiny_checkpoint, TORCH_OPS, CPU, torch.float32)
    sd = load_file(tiny_checkpoint / "model.safetensors")
    H = model.config.hidden_size
    first, last = model.layers  # the last layer's queries (first tokens only) are packed apart from K/V
    assert torch.equal(first.qkv.weight[H:2 * H], sd["roberta.encoder.layer.0.attention.self.key.weight"])
    assert torch.equal(last.first_token_query.weight, sd["roberta.encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(last.qkv.weight[:H], sd["roberta.encoder.layer.1.attention.self.key.weight"])
    assert torch.equal(last.qkv.bias[H:], sd["roberta.encoder.layer.1.attention.self.value.bias"])
    assert torch.equal(model.head_out.weight, sd["classifier.out_proj.weight"])
    assert model.config.position_offset == 2 and model.config.max_tokens == 8192


def test_fp16_checkpoint_loads_into_fp32(tmp_path):
    path = write_random_checkpoint(tmp_path, "tiny", seed=2, dtype=torch.float16)
    model = load_cross_encoder(path, TORCH_OPS, CPU, torch.float32)
    sd = load_file(path / "model.safetensors")
    assert model.word_embeddings.dtype == torch.float32
    assert torch.equal(model.word_embeddings, sd["roberta.embeddings.word_embeddings.weight"].float())


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["ElectraForSequenceClassification"], model_type="electra"), "unsupported model"),
    (dict(architectures=["BertModel"], model_type="bert"), "unsupported model"),  # an encoder without a head
    (dict(id2label={"0": "NO", "1": "YES"}), "one output label"),
    (dict(hidden_act="gelu_new"), "hidden_act"),
])
def test_unsupported_checkpoints_are_refused(tiny_checkpoint, tmp_path, changes, message):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    edit_config(path, **changes)
    with pytest.raises(UnsupportedModelError, match=message):
        load_cross_encoder(path, TORCH_OPS, CPU, torch.float32)


def test_missing_and_misshapen_tensors_are_named(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    sd = load_file(path / "model.safetensors")
    del sd["roberta.encoder.layer.0.attention.self.key.bias"]
    save_file(sd, path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="layers.0.qkv_bias"):
        load_cross_encoder(path, TORCH_OPS, CPU, torch.float32)
    sd["roberta.encoder.layer.0.attention.self.key.bias"] = torch.zeros(3)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="shape"):
        load_cross_encoder(path, TORCH_OPS, CPU, torch.float32)


def test_roberta_config_reads_positions_from_padding_idx():
    config = EncoderConfig.from_hf(dict(
        architectures=["RobertaForSequenceClassification"], model_type="roberta", vocab_size=50265,
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=514, num_labels=1, pad_token_id=1))
    assert config.position_offset == 2 and config.max_tokens == 512 and config.head_dim == 64


def test_offline_hub_id_without_cache_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError, match="--model /path/to/dir") as e:
        resolve_model_dir("some-org/some-reranker")
    # the offline route is named, and it works: the command it gives writes a directory --model takes
    message = str(e.value)
    assert "rerank-server checkpoint --size full --out DIR, then --model DIR" in message
    command = message.split("rerank-server checkpoint ", 1)[1].split(",", 1)[0].split()
    assert command == ["--size", "full", "--out", "DIR"]
    out = tmp_path / "DIR"
    subprocess.run([sys.executable, "-m", "rerank_server", "checkpoint", "--size", "tiny", "--out", str(out)],
                   check=True, capture_output=True)  # tiny: the same writer, 1/100 of the disk
    assert resolve_model_dir(str(out)) == out


def test_unreachable_hub_names_the_offline_route(tmp_path, monkeypatch):
    """Online but the hub cannot be reached (no network): the same message, with the route."""
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ModelNotFoundError, match="could not be downloaded") as e:
        resolve_model_dir("some-org/some-reranker")
    assert "rerank-server checkpoint --size full --out DIR, then --model DIR" in str(e.value)


def test_hub_id_resolves_from_the_hf_cache(tiny_checkpoint, tmp_path, monkeypatch):
    """A snapshot in the cache layout (models--org--name/snapshots/<rev>) is found offline."""
    import huggingface_hub.constants as c
    snapshot = tmp_path / "hub" / "models--acme--tiny-reranker" / "snapshots" / ("0" * 40)
    copy_checkpoint(tiny_checkpoint, snapshot)
    (tmp_path / "hub" / "models--acme--tiny-reranker" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-reranker" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_dir("acme/tiny-reranker") == snapshot


def test_engine_scores_and_limits_max_length(tiny_checkpoint):
    engine = Engine.load(str(tiny_checkpoint), "cpu", max_length=32)
    pairs = engine.tokenizer.encode_pairs("query", ["a document " * 50, "short"])
    assert [len(p) for p in pairs][0] == 32
    scores = engine.forward(pairs)
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    # one pair alone scores the same as inside a batch
    assert abs(engine.forward(pairs[1:])[0] - scores[1]) < 1e-5
    with pytest.raises(ValueError, match="--max-length"):
        Engine.load(str(tiny_checkpoint), "cpu", max_length=9000)
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        Engine.load("./no/such/dir", "cpu")
