"""The original retro_transformer quick-start API, as thin doors into retro_lit's pipeline.

    bert = BERTForChunkEmbeddings(None, "cpu")                       # bundled all-MiniLM-L6-v2
    index = RetroIndex(workspace, chunk_len, bert=bert)
    build_database(workspace, text_file, bert=bert, chunk_len=chunk_len)          # chunks, keys, index
    n_vocab = build_dataset(workspace, text_file, chunk_len=chunk_len, index=index)  # neighbours
    train(model, workspace, text_file, chunk_len=chunk_len, d_model=d_model)       # Lightning Trainer

`build_database` and `build_dataset` are stages of `database.build_workspace`; `train` runs `RetroLM` on a
`RetroDataModule` with a Lightning `Trainer`, exactly what `retro-lit fit` runs. A plain text file is split
into documents at runs of two or more empty lines (see `retro_lit.corpus`); same-document neighbours are
excluded, so give the file several documents.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from retro_lit.build import build_workspace
from retro_lit.data import RetroDataModule
from retro_lit.embedder import BERTForChunkEmbeddings
from retro_lit.index import RetroIndex
from retro_lit.lit import RetroLM
from retro_lit.model import RetroModel
from retro_lit.workspace import RetroError, read_manifest

log = logging.getLogger(__name__)


def build_database(workspace: str | Path, text_file: str | Path, *, bert: BERTForChunkEmbeddings | None = None,
                   chunk_len: int = 16, tokenizer: str = "bpe:8192", index: str = "auto",
                   split: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0) -> Path:
    """Tokenize and chunk `text_file`, embed every chunk with `bert` and build the faiss index."""
    return build_workspace(workspace, text_file, tokenizer=tokenizer, chunk_len=chunk_len, embedder=bert,
                           index=index, split=split, seed=seed, seq_len=chunk_len, until="index")


def build_dataset(workspace: str | Path, text_file: str | Path, *, chunk_len: int = 16,
                  index: RetroIndex | None = None, chunks_per_sample: int = 32, num_neighbors: int = 2) -> int:
    """Pre-compute the neighbours of every chunk for training sequences of `chunks_per_sample` chunks
    (same-document exclusion); returns the LM vocabulary size."""
    settings = _built_settings(workspace, chunk_len)
    bert = index.bert if index is not None else None
    build_workspace(workspace, text_file, tokenizer=settings["tokenizer"], chunk_len=chunk_len,
                    embedder=bert or settings["embedder"], index=settings["index"], split=tuple(settings["split"]),
                    seed=settings["seed"], num_neighbors=num_neighbors, seq_len=chunk_len * chunks_per_sample)
    return read_manifest(workspace)["counts"]["vocab_size"]


def train(model: RetroModel, workspace: str | Path, text_file: str | Path, chunk_len: int = 16, d_model: int = 128,
          *, chunks_per_sample: int = 32, num_neighbors: int = 2, batch_size: int = 8, lr: float = 1e-3,
          **trainer_options):
    """Train `model` in place with the Lightning Trainer on the workspace built above; returns the Trainer.

    Keyword options after `d_model` go to `RetroDataModule`/`RetroLM`; anything else to `lightning.Trainer`
    (e.g. `max_steps=200`, `accelerator="gpu"`, `precision="bf16-mixed"`). Defaults: one epoch (or
    `max_steps`), logs and checkpoints under `<workspace>/runs`.
    """
    if model.chunk_len != chunk_len or model.d_model != d_model:
        raise RetroError(f"the model has chunk_len {model.chunk_len} and d_model {model.d_model}, "
                         f"but train() was given chunk_len {chunk_len} and d_model {d_model}")
    settings = _built_settings(workspace, chunk_len)
    data = RetroDataModule(str(workspace), corpus=str(text_file), tokenizer=settings["tokenizer"],
                           chunk_size=chunk_len, seq_len=chunk_len * chunks_per_sample, num_neighbors=num_neighbors,
                           embedder=settings["embedder"], index=settings["index"], split=tuple(settings["split"]),
                           seed=settings["seed"], batch_size=batch_size)
    if model.config.vocab_size < data.vocab_size:
        raise RetroError(f"the model has n_vocab {model.config.vocab_size}, but the workspace's tokenizer "
                             f"needs {data.vocab_size}: pass build_dataset(...)'s return value as n_vocab")
    # >= 3 warm-up steps: a full-lr first Adam step can spike the loss of a fresh 16-layer model
    warmup_steps = min(100, max(3, trainer_options.get("max_steps", 100) // 10))
    module = RetroLM(model.config, lr=lr, warmup_steps=warmup_steps)
    module.model = model  # the caller's model trains in place; its config makes the checkpoint reloadable
    trainer_options = {"max_epochs": -1 if "max_steps" in trainer_options else 1, "log_every_n_steps": 1,
                       "default_root_dir": str(Path(workspace) / "runs"), **trainer_options}
    trainer = L.Trainer(**trainer_options)
    trainer.fit(module, data)
    return trainer


def _built_settings(workspace: str | Path, chunk_len: int) -> dict:
    """The settings a workspace was built with; refuses a missing one or one with another chunk_len."""
    manifest = read_manifest(workspace)
    if manifest is None or not manifest["stages"].get("index", {}).get("done"):
        raise RetroError(f"workspace {workspace} has no database yet: call build_database(...) first")
    settings = manifest["settings"]
    if settings["chunk_len"] != chunk_len:
        raise RetroError(f"workspace {workspace} was built with chunk_len {settings['chunk_len']}, "
                             f"not {chunk_len}; use another workspace or the same chunk_len")
    return settings
