"""Model + tokenizer on one device: token-id lists in, logits out.

``Engine.launch`` is the one entry point that takes pairs and returns their scores (through
a wait, so that on a GPU the next batch can be queued while this one runs); the scheduler
calls it from its forward thread. ``Engine.forward`` is launch-and-wait.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate, chain
from pathlib import Path

import numpy as np
import torch

from rerank_kernels import ModelShapes, resolve_dtype, select_ops
from rerank_kernels.attention import QUERY_TIERS
from rerank_kernels.cpu_memory import keep_freed_memory
from rerank_server.models.encoder import FFN_ROWS, CrossEncoder
from rerank_server.models.qwen3 import Qwen3Reranker, build_batch
from rerank_server.models.registry import config_from_hf, model_class
from rerank_server.prompts import PromptTokenizer
from rerank_server.scheduler import Wait, launch_now
from rerank_server.tokenization import PairTokenizer, check_max_length, token_type_start

log = logging.getLogger(__name__)


class ModelNotFoundError(RuntimeError):
    """The --model value is neither a directory nor a hub id we can resolve."""


CHECKPOINT_FILES = ("config.json", "tokenizer.json", "*.safetensors")
# what a checkpoint may hold instead of a file we read, and how to make the one we read
NOT_READ = {
    "tokenizer.json": ("vocab.txt", "a slow tokenizer's vocabulary; save the fast one with "
                       "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"),
    "*.safetensors": ("pytorch_model.bin", "pickled weights, which this server does not load; convert them "
                      "with AutoModelForSequenceClassification.from_pretrained(dir).save_pretrained(dir)"),
}
# what to run where no hub is reachable at all: a random-weight checkpoint of the real shapes and
# tokenizer, which serves every route (its scores rank nothing)
OFFLINE_ROUTE = ("With no hub access, try the service on random weights: rerank-server checkpoint --size full "
                 "--out DIR, then --model DIR (make serve MODEL=DIR)")


def check_checkpoint_dir(path: Path) -> Path:
    """``path`` if it holds a checkpoint; else ModelNotFoundError naming the missing file."""
    missing = [name for name in CHECKPOINT_FILES if not any(path.glob(name))]
    if missing:
        instead = [f"it has {NOT_READ[name][0]} ({NOT_READ[name][1]})" for name in missing
                   if name in NOT_READ and (path / NOT_READ[name][0]).exists()]
        raise ModelNotFoundError(f"--model {path}: the directory has no {' and no '.join(missing)} "
                                 f"(a checkpoint directory holds {', '.join(CHECKPOINT_FILES)})"
                                 + "".join(f"; {line}" for line in instead))
    return path


def could_be_hub_id(model: str) -> bool:
    """"name" or "org/name"; a path such as ./x, /x or a/b/c cannot be one."""
    return not model.startswith((".", "/", "~")) and model.count("/") <= 1


def resolve_model_dir(model: str) -> Path:
    """A local directory as is; otherwise a Hugging Face hub id through the HF cache
    (``HF_HOME``, ``HF_HUB_OFFLINE`` honoured by huggingface_hub)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return check_checkpoint_dir(path)
    where = f"no such directory {path.absolute()}"
    if path.exists():
        raise ModelNotFoundError(f"--model {model!r}: {path.absolute()} is a file, not a checkpoint directory")
    if not could_be_hub_id(model):
        raise ModelNotFoundError(f"--model {model!r}: {where}")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    log.info("resolving %s through the Hugging Face cache %s%s (download progress in bytes below)", model,
             constants.HF_HUB_CACHE, " offline" if constants.HF_HUB_OFFLINE else "")
    try:
        return check_checkpoint_dir(Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors"])))
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:
        how = ("offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE
               else f"and could not be downloaded ({e.__class__.__name__})")
        raise ModelNotFoundError(
            f"--model {model!r}: {where}, and not in the Hugging Face cache {constants.HF_HUB_CACHE} {how}: "
            f"download it where the hub is reachable, or pass --model /path/to/dir holding "
            f"{', '.join(CHECKPOINT_FILES)}. {OFFLINE_ROUTE}") from None
    except HFValidationError as e:
        raise ModelNotFoundError(f"--model {model!r}: {where}, and not a valid hub id ({e})") from None


def resolve_device(device: str = "auto") -> torch.device:
    """--device: auto is CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_shapes(config) -> ModelShapes:
    """What ``select_ops`` measures kernels at for this model (a model with GEMM kinds of its own
    names them: decoders, ModernBERT, DeBERTa-v2)."""
    gemms = config.gemm_shapes() if hasattr(config, "gemm_shapes") else None
    return ModelShapes(config.hidden_size, config.intermediate_size, config.num_heads, FFN_ROWS, gemms)


def describe_choices(choices: dict) -> str:
    """Ops.choices in one line: op (kind or tier chosen, ...); ..."""
    parts = []
    for op, report in choices.items():
        entries = report.get("by_kind", report)
        parts.append(f"{op}: " + ", ".join(f"{key} {entry['chosen']}" for key, entry in entries.items()))
    return "; ".join(parts) or "nothing measured"


def token_type_ids(pairs: list[list[int]], lengths: list[int]) -> torch.Tensor:
    """(total,) int64: 0 before each pair's ``token_type_start``, 1 from it (BERT: the document)."""
    lengths = np.asarray(lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    type_starts = np.repeat(np.fromiter(map(token_type_start, pairs), dtype=np.int64, count=len(pairs)), lengths)
    return torch.from_numpy((np.arange(starts.shape[0]) - starts >= type_starts).astype(np.int64))


@dataclass
class Engine:
    model: CrossEncoder | Qwen3Reranker
    tokenizer: PairTokenizer | PromptTokenizer
    model_dir: Path
    # called with the pair tokens a shared prefix spared in each decoder batch (the service's metric)
    on_shared_tokens: Callable[[int], None] | None = None

    @staticmethod
    def load_tokenizer(model_dir: Path, max_length: int | None = None) -> PairTokenizer:
        """The pair tokenizer of a checkpoint directory, cut at ``max_length`` (default: the
        model's limit). Parsing tokenizer.json holds the GIL for about a second (tokenizers
        does not release it), so a server does this before its listeners answer health."""
        config = config_from_hf(json.loads((model_dir / "config.json").read_text()))
        limit = config.max_tokens
        if max_length is not None:
            check_max_length(max_length, limit)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.exists():
            raise ModelNotFoundError(f"{model_dir} has no tokenizer.json (the fast tokenizer is required)")
        if config.architecture == "decoder":
            return PromptTokenizer(tokenizer_file, max_length or limit, config.template)
        return PairTokenizer(tokenizer_file, max_length or limit, truncation=config.truncation)

    @classmethod
    def load(cls, model: str, device: str = "auto", max_length: int | None = None,
             attention: str | None = None, tokenizer: PairTokenizer | None = None, dtype: str = "auto",
             cpu_gemm: str = "auto") -> Engine:
        """``tokenizer``: one already loaded by ``load_tokenizer`` from the same directory.
        ``dtype``: --dtype (rerank_kernels.resolve_dtype); ``cpu_gemm``: --cpu-gemm. The ops are
        chosen (and measured) for the model's shapes before the model is built."""
        started = time.perf_counter()
        model_dir = resolve_model_dir(model)
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dev, dtype)
        tokenizer = tokenizer or cls.load_tokenizer(model_dir, max_length)  # checks max_length before the weights
        hf = json.loads((model_dir / "config.json").read_text())
        c = config_from_hf(hf)
        family = model_class(hf, torch_dtype)  # before any measuring: a dtype the family lacks is refused at once
        ops = select_ops(dev, attention, dtype=torch_dtype, shapes=model_shapes(c), cpu_gemm=cpu_gemm)
        encoder = family.load(model_dir, ops, dev, torch_dtype)
        if dev.type == "cpu":
            keep_freed_memory()  # after loading: see rerank_kernels.cpu_memory
        log.info("loaded %s from %s: %d layers, hidden %d, %.0fM parameters, %s on %s, attention %s, "
                 "max length %d, in %.1fs; kernels: %s", model, model_dir, c.num_layers, c.hidden_size,
                 encoder.num_parameters / 1e6, str(torch_dtype).removeprefix("torch."), dev, ops.attention_backend,
                 tokenizer.max_length, time.perf_counter() - started, describe_choices(ops.choices))
        return cls(encoder, tokenizer, model_dir)

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    @property
    def asynchronous(self) -> bool:
        """Whether ``launch`` returns before the forward is computed (CUDA)."""
        return self.model.device.type == "cuda"

    def launch(self, pairs: list[list[int]]) -> Wait:
        """Token-id lists -> a wait for one logit each, as one unpadded batch.

        ``cu_seqlens`` is built on the host, so nothing waits on the device before or during
        the forward: on CUDA this queues the copies and kernels and returns; the logits come
        back to pinned memory behind an event, and only the returned wait blocks on it."""
        device = self.model.device
        if self.model.config.architecture == "decoder":
            batch = build_batch(pairs)
            if self.on_shared_tokens:
                self.on_shared_tokens(batch.shared_rows)
            if device.type == "cpu":
                return launch_now(lambda _: self.model(batch).tolist())(pairs)
            return self._wait_for(self.model(batch.to(device)))
        lengths = [len(p) for p in pairs]
        total = sum(lengths)
        ids = torch.from_numpy(np.fromiter(chain.from_iterable(pairs), dtype=np.int64, count=total))
        cu_seqlens = torch.tensor([0, *accumulate(lengths)], dtype=torch.int32)
        types = token_type_ids(pairs, lengths) if self.model.config.uses_token_types else None
        if device.type == "cpu":  # computes now; the wait hands the logits over
            return launch_now(lambda _: self.model(ids, cu_seqlens, max(lengths), types).tolist())(pairs)
        ids = ids.pin_memory().to(device, non_blocking=True)
        cu_seqlens = cu_seqlens.pin_memory().to(device, non_blocking=True)
        if types is not None:
            types = types.pin_memory().to(device, non_blocking=True)
        return self._wait_for(self.model(ids, cu_seqlens, max(lengths), types))

    @staticmethod
    def _wait_for(on_device: torch.Tensor) -> Wait:
        """The logits queued back to pinned host memory behind an event, and the wait for them."""
        on_host = torch.empty(on_device.shape, dtype=on_device.dtype, pin_memory=True)
        on_host.copy_(on_device, non_blocking=True)
        # blocking: the wait sleeps in the driver instead of spinning a core
        copied = torch.cuda.Event(blocking=True)
        copied.record()

        def wait() -> list[float]:
            copied.synchronize()
            return on_host.tolist()
        return wait

    def forward(self, pairs: list[list[int]]) -> list[float]:
        """Token-id lists -> one logit each (``launch`` and wait)."""
        return self.launch(pairs)()

    def warm_up_batches(self) -> list[list[list[int]]]:
        """The batches ``warm_up`` runs. On CUDA they reach every compiled Triton variant the
        server can meet: each attention query tier (longest sequence <= 16, <= 64, longer),
        the first-token-only last layer, and pair counts of 1, odd and a multiple of 16 (the
        per-batch integers are not specialized, but this proves it at start-up). On the CPU
        one short and one long forward (allocator, BLAS) are enough."""
        short = self.tokenizer.encode_pairs("warm-up query", ["warm-up document"])[0]

        def pair(n: int) -> list[int]:  # a pair of n tokens (at most the model's max length)
            n = max(len(short), min(n, self.max_length))
            return short[:-1] + [5] * (n - len(short)) + short[-1:]
        longest = pair(512)
        if not self.asynchronous:
            return [[short] * 4, [longest]]
        return [[short], [pair(QUERY_TIERS[0])] * 16, [pair(QUERY_TIERS[1])] * 3, [longest, short]]

    def warm_up(self) -> None:
        """Forwards that compile and allocate before the first request (see ``warm_up_batches``)."""
        for batch in self.warm_up_batches():
            self.forward(batch)
