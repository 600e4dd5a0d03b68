"""The database build: the ordered table of stages, run or resumed in one process.

| stage        | module                 | writes                                             |
|--------------|------------------------|----------------------------------------------------|
| `chunks`     | retro_lit.chunks       | chunks, documents, tokenizer                       |
| `embeddings` | retro_lit.embeddings   | frozen-BERT keys, one file per block               |
| `index`      | retro_lit.index        | the faiss index over the train chunks, recall@k    |
| `neighbors`  | retro_lit.neighbors    | k neighbours of every chunk, keyed by (k, T)       |

A stage is skipped when the manifest records it done; it is recorded done only after its files are in place,
so rerunning the same build resumes where it stopped. A workspace built with other settings is refused,
naming the setting. retro_lit.distributed runs the same stages over several processes.
"""

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from retro_lit.chunks import chunk_corpus
from retro_lit.corpus import corpus_fingerprint
from retro_lit.embedder import PRECISIONS, BERTForChunkEmbeddings, recorded_precision
from retro_lit.embeddings import embed_chunks, embedding_info
from retro_lit.index import build_index, check_factory
from retro_lit.neighbors import compute_neighbors
from retro_lit.tokenizer import check_spec
from retro_lit.verify import check_workspace
from retro_lit.workspace import (FORMAT_VERSION, MANIFEST, STAGES, RetroError, check_settings, finish_stage,
                                 holding_lock, neighbors_key, open_workspace, read_manifest, write_manifest)

log = logging.getLogger(__name__)


@dataclass
class Build:
    """What the stages of one build read: where, from what, and how."""

    root: Path
    corpus: str | Path
    embedder: BERTForChunkEmbeddings
    tokenizer: str = "bpe:8192"
    chunk_len: int = 64
    index: str = "auto"
    num_neighbors: int = 2
    seq_len: int = 2048
    split: tuple[float, float, float] = (0.9, 0.05, 0.05)
    seed: int = 0
    dedup_threshold: float | None = 0.8
    block_size: int = 16384
    quiet: bool = False

    def settings(self, fingerprint: str) -> dict:
        """The manifest's `settings` (`fingerprint`: the corpus's): a resumed build must match them all."""
        return {
            "corpus": str(self.corpus),
            "corpus_fingerprint": fingerprint,
            "tokenizer": self.tokenizer,
            "chunk_len": self.chunk_len,
            "embedder": self.embedder.name,
            "embedder_precision": self.embedder.precision,
            "pooling": "mean",
            "index": self.index,
            "split": list(self.split),
            "seed": self.seed,
            "dedup_threshold": self.dedup_threshold,
            "block_size": self.block_size,
        }

    def stage_key(self, stage: str) -> str:
        """The stage's name in the manifest: neighbours are kept per (k, T)."""
        return neighbors_key(self.num_neighbors, self.seq_len) if stage == "neighbors" else stage


def run_chunks(build: Build, manifest: dict) -> dict:
    paths, fields = chunk_corpus(
        build.root, build.corpus, tokenizer=build.tokenizer, chunk_len=build.chunk_len, split=build.split,
        seed=build.seed, dedup_threshold=build.dedup_threshold, quiet=build.quiet,
    )
    manifest.update(fields)  # splits and counts
    return {"files": [p.name for p in paths]}


def run_embeddings(build: Build, manifest: dict) -> dict:
    start = time.perf_counter()
    n_new = sum(len(np.load(p, mmap_mode="r")) for p in embed_chunks(build.root, build.embedder, quiet=build.quiet))
    return {
        **embedding_info(build.embedder),
        "blocks": math.ceil(manifest["counts"]["chunks"] / build.block_size),
        "chunks_per_s": round(n_new / max(time.perf_counter() - start, 1e-9), 1),
    }


def run_index(build: Build, manifest: dict) -> dict:
    ws = open_workspace(build.root)
    return build_index(ws, build.index, k=build.num_neighbors, seed=build.seed, quiet=build.quiet)[1]


def run_neighbors(build: Build, manifest: dict) -> dict:
    ws, nprobe = open_workspace(build.root), manifest["stages"]["index"].get("nprobe")
    paths, info = compute_neighbors(ws, build.num_neighbors, build.seq_len, nprobe=nprobe, quiet=build.quiet)
    shutil.rmtree(paths[0].parent / "parts", ignore_errors=True)  # the query parts of a killed distributed build
    return info


BUILD_STAGES: tuple[tuple[str, Callable[[Build, dict], dict]], ...] = (
    ("chunks", run_chunks),
    ("embeddings", run_embeddings),
    ("index", run_index),
    ("neighbors", run_neighbors),
)


@holding_lock  # a second build of the same workspace is refused, never interleaved
def build_workspace(
    workspace: str | Path,
    corpus: str | Path,
    *,
    tokenizer: str = "bpe:8192",
    chunk_len: int = 64,
    embedder: BERTForChunkEmbeddings | str | None = None,
    device: str = "auto",
    index: str = "auto",
    num_neighbors: int = 2,
    seq_len: int = 2048,
    split: tuple[float, float, float] = (0.9, 0.05, 0.05),
    seed: int = 0,
    dedup_threshold: float | None = 0.8,
    batch_size: int = 128,
    block_size: int = 16384,
    until: str = "neighbors",
    quiet: bool = False,
    embedder_precision: str = "auto",
) -> Path:
    """Build or resume the stages of a workspace up to `until` (default all); returns its path.

    `embedder` is a `BERTForChunkEmbeddings`, a model folder/name, or None for all-MiniLM-L6-v2; when it is not
    an object, `embedder_precision` (`bf16`, `32` or `auto`: the workspace's own on a resume, else bf16 where
    the CPU has bf16 units or on CUDA, fp32 on other CPUs) sets its dtype. A resume at another precision is refused.
    `until` is one of `STAGES`; e.g. "embeddings" stops before the index. `build_summary(path)` reports.
    """
    for name, value in (("chunk_len", chunk_len), ("num_neighbors", num_neighbors), ("block_size", block_size)):
        if value <= 0:
            raise RetroError(f"{name} must be > 0, got {value}")
    if seq_len <= 0 or seq_len % chunk_len:
        raise RetroError(f"seq_len ({seq_len}) must be a positive multiple of chunk_len ({chunk_len})")
    if until not in STAGES:
        raise RetroError(f"until must be one of {STAGES}, got {until!r}")
    check_spec(tokenizer)
    fingerprint = corpus_fingerprint(corpus)  # (a missing corpus fails here, before BERT loads)
    if not isinstance(embedder, BERTForChunkEmbeddings):
        embedder = BERTForChunkEmbeddings(embedder, device, batch_size=batch_size,
                                          dtype=embedder_dtype(workspace, embedder_precision))
    check_factory(index, embedder.dim)
    build = Build(
        Path(workspace), corpus, embedder, tokenizer, chunk_len, index, num_neighbors, seq_len,
        tuple(float(f) for f in split), seed, dedup_threshold, block_size, quiet,
    )
    manifest = start_manifest(build.root, build.settings(fingerprint))
    built_now = False
    for name, run in BUILD_STAGES:
        key = build.stage_key(name)
        if not manifest["stages"].get(key, {}).get("done"):
            start = time.perf_counter()
            info = run(build, manifest)
            finish_stage(build.root, manifest, key, info | {"seconds": round(time.perf_counter() - start, 3)})
            built_now = True
        if name == until:
            break
    if until == "neighbors" and (first_report(build.root) or built_now):
        log.info("%s", format_summary(build_summary(build.root, num_neighbors, seq_len), built_now=built_now))
    return build.root


_reported: set[tuple[str, int]] = set()  # (workspace, manifest mtime) summaries this process has logged


def first_report(root: Path) -> bool:
    """True the first time this process asks about workspace `root` as it is now: a run that fits several models
    on one workspace (the demo, the benchmarks) logs its summary once, not once per fit."""
    key = (str(root.resolve()), (root / MANIFEST).stat().st_mtime_ns)
    first = key not in _reported
    _reported.add(key)
    return first


def embedder_dtype(workspace: str | Path, precision: str) -> torch.dtype | None:
    """`--embedder_precision` -> the embedder's dtype; `auto` is the workspace's own precision when it has built
    a stage, else None (the embedder's default for its device)."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise RetroError(f"--embedder_precision must be auto, bf16 or 32, got {precision!r}")
        return getattr(torch, PRECISIONS[precision])
    manifest = read_manifest(workspace)
    return getattr(torch, recorded_precision(manifest)) if has_built_stage(manifest) else None


def has_built_stage(manifest: dict | None) -> bool:
    """Has this workspace finished a stage? Until then a build may take new settings."""
    return manifest is not None and any(info.get("done") for info in manifest["stages"].values())


def start_manifest(root: Path, settings: dict) -> dict:
    """Check the workspace is writable and its settings match; returns the manifest to update.

    A workspace with no finished stage (e.g. the corpus was bad) takes the new settings.
    """
    manifest = read_manifest(root) if root.exists() else None
    if has_built_stage(manifest):
        if manifest.get("format_version") != FORMAT_VERSION:
            raise RetroError(
                f"workspace {root} has format_version {manifest.get('format_version')}, not {FORMAT_VERSION}"
            )
        manifest["settings"].setdefault("embedder_precision", recorded_precision(manifest))  # (older workspaces)
        check_settings(root, manifest["settings"], settings)
        check_workspace(root, manifest)  # a resumed build stands on its finished stages' files: are they whole?
        return manifest
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write_probe.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RetroError(f"workspace {root} is not writable: {e.strerror}") from None
    manifest = {"format_version": FORMAT_VERSION, "settings": settings, "splits": {}, "counts": {}, "stages": {}}
    write_manifest(root, manifest)
    return manifest


def build_summary(
    workspace: str | Path, num_neighbors: int | None = None, seq_len: int | None = None
) -> dict:
    """Docs, chunks, tokens, embedding chunks/s, index type, recall@k, time per stage, size on disk, and the
    documents and chunks added since the build."""
    root = Path(workspace)
    manifest = read_manifest(root)
    stages = manifest["stages"]
    summary = {
        "workspace": str(root),
        "documents": manifest["counts"]["documents"],
        "near_duplicates_dropped": len(manifest["counts"].get("near_duplicates_dropped", [])),
        "chunks": manifest["counts"]["chunks"],
        "tokens": manifest["counts"]["tokens"],
        "embedding_chunks_per_s": stages["embeddings"]["chunks_per_s"],
        "index": stages["index"]["factory"],
        f"recall@{stages['index']['k']}": stages["index"]["recall"],
        "seconds": {name: info["seconds"] for name, info in stages.items()},
        "size_mb": round(sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20, 1),
    }
    added = [entry for entry in manifest.get("additions", []) if entry["done"]]  # retro_lit.additions
    if added:
        summary["added_documents"] = sum(entry["documents"] for entry in added)
        summary["added_chunks"] = sum(entry["chunks"] for entry in added)
        summary[f"recall@{stages['index']['k']}"] = added[-1]["stages"]["index"]["recall"]  # over the grown database
    key = neighbors_key(num_neighbors, seq_len)
    if key in stages:
        summary["neighbor_queries_per_s"] = stages[key]["queries_per_s"]
    return summary


def format_summary(summary: dict, built_now: bool = True) -> str:
    lines = [f"workspace {summary['workspace']}" + ("" if built_now else " (already built; nothing to do)")]
    for key, value in summary.items():
        if key == "seconds":
            value = ", ".join(f"{name} {s:.1f}s" for name, s in value.items())
        if key != "workspace":
            lines.append(f"  {key:<24} {value}")
    return "\n".join(lines)
