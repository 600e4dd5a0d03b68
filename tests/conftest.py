"""Shared fixtures. Each is tiny, CPU-only and seeded; the session-scoped ones are shared, so don't change them.

- `tiny_config(**overrides)`: a `RetroConfig` of V = 40, M = 4, D = 32, 2 layers, H = 2 heads of 16, CCA at
  layer 1 and a 1-layer encoder; overrides are RetroConfig fields.
- `tiny_corpus(name="corpus.txt", **kw)`: writes `helpers.make_corpus(tmp_path / name, **kw)` (n_docs,
  words_per_doc, seed, one_file_per_doc) and returns its path.
- `tiny_bert` (session): one random 1-layer BERT (E = 16) with the MiniLM WordPiece tokenizer, a
  `BERTForChunkEmbeddings` in float32 (bf16 autocast is ~7x slower on a CPU for a model this small). Code that
  moves or changes an embedder builds its own with `helpers.tiny_bert()`: the same weights, in bf16 by default.
- `tiny_bert_path` (session): the same BERT saved as a local model folder, for `--embedder <folder>`.
- `tiny_workspace` (session): a built workspace (bytes, M = 4, K = 2, T = 16, Flat) and a random checkpoint for
  it, as (root, ckpt, embedder, corpus). Read it only: a test that writes there copies it or builds its own.
- `one_thread`: one torch thread for the test; `_hermetic` (autouse) seeds and restores torch's global state.

Plain helpers (`make_corpus`, `snapshot`, the tiny database's `build`) are in helpers.py.
"""
import functools
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import helpers
from retro_lit.embedder import BERTForChunkEmbeddings
from retro_lit.model import RetroConfig


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch):
    """Seed, keep W&B and the HF hub off, and restore torch's global state after each test."""
    monkeypatch.setattr(sys, "argv", ["retro-lit"])  # in-process runs get their arguments from args= only, not pytest's
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(0)
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One torch thread: tiny models run fastest so, and don't fight other jobs on a busy box (_hermetic restores
    the count). A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_config():
    return functools.partial(RetroConfig, vocab_size=40, chunk_size=4, d_model=32, n_layer=2, n_head=2, head_dim=16,
                             d_ff=64, cca_layers=(1,), enc_n_layer=1)


@pytest.fixture
def tiny_corpus(tmp_path):
    return lambda name="corpus.txt", **kw: helpers.make_corpus(tmp_path / name, **kw)


@pytest.fixture(scope="session")
def tiny_bert() -> BERTForChunkEmbeddings:
    return helpers.tiny_bert(dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory, tiny_bert):
    return helpers.save_bert(tiny_bert, tmp_path_factory.mktemp("bert") / "tiny-bert")


class TinyWorkspace(NamedTuple):
    root: Path
    ckpt: Path  # a random RetroLM for it
    embedder: BERTForChunkEmbeddings  # the one that built it: patch `retro_lit.index.workspace_embedder` to return it
    corpus: Path


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory, tiny_config, tiny_bert) -> TinyWorkspace:
    import lightning  # here, not at the top: it takes seconds, and the model tests never need it

    from retro_lit.build import build_workspace
    from retro_lit.lit import RetroLM

    tmp = tmp_path_factory.mktemp("tiny_workspace")
    corpus = helpers.make_corpus(tmp / "corpus.txt", n_docs=14, words_per_doc=16)
    root = build_workspace(tmp / "ws", corpus, tokenizer="bytes", chunk_len=4, embedder=tiny_bert, index="Flat",
                           num_neighbors=2, seq_len=16, split=(0.7, 0.15, 0.15), quiet=True)
    torch.manual_seed(0)
    lm = RetroLM(tiny_config(vocab_size=257, d_model=16, head_dim=8, d_ff=32))
    ckpt = tmp / "model.ckpt"
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams),
                "pytorch-lightning_version": lightning.__version__,
                "datamodule_hyper_parameters": {"seq_len": 16, "num_neighbors": 2}}, ckpt)
    return TinyWorkspace(root, ckpt, tiny_bert, corpus)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
