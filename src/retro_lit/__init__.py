"""retro_lit: RETRO (Borgeaud et al. 2022) as a PyTorch Lightning research framework.

The public names are imported lazily so that `import retro_lit` stays cheap (no faiss, transformers or
lightning until you touch something that needs them).
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    # the original retro_transformer quick-start names
    "BERTForChunkEmbeddings": "retro_lit.embedder",
    "RetroIndex": "retro_lit.index",
    "build_database": "retro_lit.quickstart",
    "build_dataset": "retro_lit.quickstart",
    "train": "retro_lit.quickstart",
    "RetroModel": "retro_lit.model",
    "NearestNeighborEncoder": "retro_lit.model",
    # the framework
    "RetroConfig": "retro_lit.model",
    "RetroCache": "retro_lit.model",
    "build_workspace": "retro_lit.build",
    "open_workspace": "retro_lit.workspace",
    "load_tokenizer": "retro_lit.tokenizer",
    "RetroDataset": "retro_lit.data",
    "RetroDataModule": "retro_lit.data",
    "RetroLM": "retro_lit.lit",
    "generate": "retro_lit.generate",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'retro_lit' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
