"""The on-disk retrieval database (a workspace folder): build stages, manifest, resume, read access.

Stages, each a function that writes files under the workspace and returns their paths:

1. `chunk_corpus`: documents -> split -> (BPE training) -> LM tokens -> `chunks.npy`, `chunk_doc.npy`,
   `doc_offsets.npy`, `documents.jsonl`, `tokenizer.json`. Streams: tokens go to a flat temporary file,
   then into the chunk memmap in split order, so memory does not grow with the corpus.
2. `embed_chunks`: frozen-BERT keys of every chunk, `embeddings/block_XXXXX.npy`, one file per block of
   `block_size` chunks; a block is skipped when its file exists, so a distributed build can hand block
   ranges to ranks and an interrupted build resumes at the first missing block.
3. `retro_lit.index.build_index`: the faiss index over the train chunks, with recall@k vs exact search.
4. `retro_lit.neighbors.compute_neighbors`: k neighbours of every chunk of every split, keyed by (k, T).

Every file is written as `*.tmp` and `os.replace`d into place; a stage is marked done in `manifest.json`
only after its files are on disk. A workspace built with other settings is refused, naming the setting.
"""

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import numpy as np

from retro_lit.corpus import (SPLITS, MinHash, RetroDataError, corpus_fingerprint, iter_documents,
                              near_duplicate_train_documents, split_documents)
from retro_lit.embedder import BERTForChunkEmbeddings
from retro_lit.index import build_index, check_factory
from retro_lit.neighbors import compute_neighbors, neighbors_path
from retro_lit.progress import progress
from retro_lit.tokenizer import LMTokenizer, check_spec, load_tokenizer, train_bpe

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STAGES = ("chunks", "embeddings", "index", "neighbors")
SPLIT_ALIASES = {"validation": "val", "valid": "val", "fit": "train"}
_TOKENIZE_BATCH_CHARS = 4 << 20


# ----------------------------------------------------------------------------------------------- reading


class Workspace:
    """Read-only view of a built workspace; arrays are memmaps opened on first use."""

    def __init__(self, root: str | Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self.chunk_len = int(manifest["settings"]["chunk_len"])  # M

    @cached_property
    def tokenizer(self) -> LMTokenizer:
        return load_tokenizer(self.manifest["settings"]["tokenizer"], self.root)

    @cached_property
    def chunks(self) -> np.ndarray:
        return np.load(self.root / "chunks.npy", mmap_mode="r")  # (n_chunks, M) uint16/uint32

    @cached_property
    def chunk_doc(self) -> np.ndarray:
        return np.load(self.root / "chunk_doc.npy", mmap_mode="r")  # (n_chunks,) int32

    @cached_property
    def doc_offsets(self) -> np.ndarray:
        return np.load(self.root / "doc_offsets.npy", mmap_mode="r")  # (n_docs + 1,) int64

    @cached_property
    def documents(self) -> list[dict]:
        """`documents.jsonl` rows: {"doc", "name", "split", "n_tokens"}, in chunk order."""
        with open(self.root / "documents.jsonl", encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    @property
    def pad_id(self) -> int:
        return int(self.manifest["counts"]["pad_id"])

    def split_range(self, split: str) -> tuple[int, int]:
        """[first_chunk, end_chunk) of a split ('train', 'val' (or 'validation'), 'test')."""
        first, end = self.manifest["splits"][SPLIT_ALIASES.get(split, split)]
        return int(first), int(end)

    def neighbors(self, split: str, k: int, seq_len: int) -> np.ndarray:
        """(n_chunks_of_split, K) int64 global chunk ids, -1 = none."""
        path = neighbors_path(self.root, SPLIT_ALIASES.get(split, split), k, seq_len)
        if not path.exists():
            raise RetroDataError(
                f"no neighbours for k={k}, seq_len={seq_len} in {self.root}; run build-db with them"
            )
        return np.load(path, mmap_mode="r")

    def neighbor_tokens(self, ids: np.ndarray) -> np.ndarray:
        """Chunk ids (...) -> [chunk, continuation] tokens (..., R = 2M) int64, -1 where there is no token.

        The continuation is the next chunk of the same document (else -1s); padding inside chunks -> -1.
        """
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)  # (N,)
        valid = flat >= 0
        safe = np.where(valid, flat, 0)
        nxt = np.minimum(safe + 1, len(self.chunks) - 1)
        has_next = valid & (safe + 1 < len(self.chunks)) & (self.chunk_doc[nxt] == self.chunk_doc[safe])
        tokens = np.concatenate([self.chunks[safe], self.chunks[nxt]], axis=1).astype(np.int64)  # (N, 2M)
        tokens[~valid] = -1
        tokens[~has_next, self.chunk_len :] = -1
        tokens[tokens == self.pad_id] = -1
        return tokens.reshape(*ids.shape, 2 * self.chunk_len)  # (..., R)

    def embeddings(self, start: int, end: int) -> np.ndarray:
        """Keys of chunks [start, end) -> (end - start, E) float32, read from the embedding blocks."""
        size = int(self.manifest["settings"]["block_size"])
        parts = []
        last_block = (end - 1) // size if end > start else start // size - 1  # empty range: no block
        for block in range(start // size, last_block + 1):
            keys = np.load(block_path(self.root, block), mmap_mode="r")
            lo, hi = max(start - block * size, 0), min(end - block * size, size)
            parts.append(np.asarray(keys[lo:hi], dtype=np.float32))
        return np.concatenate(parts) if parts else np.zeros((0, self.embedding_dim), np.float32)

    def embeddings_at(self, ids: np.ndarray) -> np.ndarray:
        """Keys of arbitrary chunk ids (sorted or not) -> (len(ids), E) float32."""
        ids = np.asarray(ids, dtype=np.int64)
        size = int(self.manifest["settings"]["block_size"])
        out = np.empty((len(ids), self.embedding_dim), dtype=np.float32)
        for block in np.unique(ids // size):
            rows = np.flatnonzero(ids // size == block)
            keys = np.load(block_path(self.root, int(block)), mmap_mode="r")
            out[rows] = keys[ids[rows] - block * size]
        return out

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["stages"]["embeddings"]["dim"])


def open_workspace(path: str | Path) -> Workspace:
    """Open a built workspace read-only; fails clearly when it is missing or its chunks are not built."""
    manifest = read_manifest(path)
    if manifest is None or not manifest["stages"].get("chunks", {}).get("done"):
        raise RetroDataError(
            f"no built workspace at {path}: run `retro-lit build-db --workspace {path}` first"
        )
    return Workspace(path, manifest)


def read_manifest(root: str | Path) -> dict | None:
    path = Path(root) / MANIFEST
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_manifest(root: str | Path, manifest: dict) -> Path:
    path = Path(root) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def mark_stage(root: str | Path, name: str, info: dict) -> Path:
    """Record stage `name` as done with `info` (its files must already be on disk); for builds that run a
    stage outside `build_workspace`, such as the distributed one (rank 0 only)."""
    manifest = read_manifest(root)
    manifest["stages"][name] = {**info, "done": True}
    return write_manifest(root, manifest)


def block_path(root: str | Path, block: int) -> Path:
    return Path(root) / "embeddings" / f"block_{block:05d}.npy"


# ------------------------------------------------------------------------------------------------ stages


def chunk_corpus(
    workspace: str | Path,
    corpus: str | Path,
    *,
    tokenizer: str = "bpe:8192",
    chunk_len: int = 64,
    split: tuple[float, float, float] = (0.9, 0.05, 0.05),
    seed: int = 0,
    dedup_threshold: float | None = 0.8,
    quiet: bool = True,
) -> tuple[list[Path], dict]:
    """Stage 1: documents -> tokens -> chunks. Returns (paths written, manifest fields: splits, counts).
    Training documents near-duplicating a held-out one (13-gram Jaccard >= dedup_threshold; None keeps all)
    are left out of the workspace."""
    root = Path(workspace)
    names, signatures, minhash = [], [], MinHash() if dedup_threshold is not None else None
    for doc in progress(iter_documents(corpus), desc="scan", unit="doc", disable=quiet):
        names.append(doc.name)
        if minhash is not None:  # signed in this pass: the split that the comparison needs comes after it
            signatures.append(minhash(doc.text))
    labels = split_documents(len(names), split, seed)  # (n_docs,) int8 split of each doc, corpus order
    drop = np.zeros(len(names), dtype=bool)
    if minhash is not None:
        drop = near_duplicate_train_documents(np.stack(signatures), labels, dedup_threshold)
        log.info("near-duplicates: %d training documents left out (13-gram Jaccard >= %g to a held-out one)",
                 drop.sum(), dedup_threshold)
    if tokenizer.startswith("bpe:"):
        train_texts = (doc.text for doc, label, d in zip(iter_documents(corpus), labels, drop) if label == 0 and not d)
        lm_tokenizer = train_bpe(train_texts, tokenizer)
    else:
        lm_tokenizer = load_tokenizer(tokenizer)
    dtype = np.uint16 if lm_tokenizer.vocab_size <= 1 << 16 else np.uint32
    tmp_tokens = root / "tokens.bin.tmp"
    n_tokens = _tokenize_to_file(corpus, lm_tokenizer, tmp_tokens, dtype, drop, quiet)  # (n_docs,) 0 if dropped
    if n_tokens.sum() < chunk_len:
        tmp_tokens.unlink()
        raise RetroDataError(f"the corpus has {n_tokens.sum()} tokens, shorter than one chunk ({chunk_len})")

    kept = np.flatnonzero(~drop)
    order = kept[np.argsort(labels[kept], kind="stable")]  # train docs, then val, then test; corpus order inside
    doc_chunks = -(-n_tokens[order] // chunk_len)  # (n_docs,) chunks of each doc, chunk order
    doc_offsets = np.concatenate([[0], np.cumsum(doc_chunks)]).astype(np.int64)  # (n_docs + 1,)
    n_chunks = int(doc_offsets[-1])
    paths = {name: root / name for name in ("chunks.npy", "chunk_doc.npy", "doc_offsets.npy")}
    tmp = {name: path.with_name(path.name + ".tmp") for name, path in paths.items()}
    tokens = np.memmap(tmp_tokens, dtype=dtype, mode="r")  # (total_tokens,) corpus order
    chunks = np.lib.format.open_memmap(tmp["chunks.npy"], "w+", dtype, (n_chunks, chunk_len))
    chunk_doc = np.lib.format.open_memmap(tmp["chunk_doc.npy"], "w+", np.int32, (n_chunks,))
    flat = chunks.reshape(-1)  # (n_chunks * M,)
    starts = np.concatenate([[0], np.cumsum(n_tokens)])  # first token of each doc, corpus order
    for doc, src in enumerate(order):
        a, b = doc_offsets[doc], doc_offsets[doc + 1]
        n = n_tokens[src]
        flat[a * chunk_len : a * chunk_len + n] = tokens[starts[src] : starts[src] + n]
        flat[a * chunk_len + n : b * chunk_len] = lm_tokenizer.pad_id
        chunk_doc[a:b] = doc
    chunks.flush(), chunk_doc.flush()
    del tokens, chunks, chunk_doc, flat
    with open(tmp["doc_offsets.npy"], "wb") as f:
        np.save(f, doc_offsets)
    tmp_docs = root / "documents.jsonl.tmp"
    with open(tmp_docs, "w", encoding="utf-8") as f:
        for doc, src in enumerate(order):
            row = {
                "doc": doc,
                "name": names[src],
                "split": SPLITS[labels[src]],
                "n_tokens": int(n_tokens[src]),
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    lm_tokenizer.save(root / "tokenizer.json.tmp")
    for path in [*paths.values(), root / "documents.jsonl", root / "tokenizer.json"]:
        os.replace(path.with_name(path.name + ".tmp"), path)
    tmp_tokens.unlink()

    split_docs = np.bincount(labels[kept], minlength=3)
    first_doc = np.concatenate([[0], np.cumsum(split_docs)])
    splits = {
        name: [int(doc_offsets[first_doc[i]]), int(doc_offsets[first_doc[i + 1]])]
        for i, name in enumerate(SPLITS)
    }
    counts = {
        "documents": len(kept),
        "near_duplicates_dropped": [names[i] for i in np.flatnonzero(drop)],
        "chunks": n_chunks,
        "tokens": int(n_tokens.sum()),
        "vocab_size": lm_tokenizer.vocab_size,
        "pad_id": lm_tokenizer.pad_id,
        "dtype": np.dtype(dtype).name,
        "split_documents": {name: int(n) for name, n in zip(SPLITS, split_docs)},
    }
    return [*paths.values(), root / "documents.jsonl", root / "tokenizer.json"], {
        "splits": splits,
        "counts": counts,
    }


def _tokenize_to_file(
    corpus, tokenizer: LMTokenizer, path: Path, dtype, drop: np.ndarray, quiet: bool
) -> np.ndarray:
    """Append every kept document's tokens to a flat file; returns (n_docs,) token counts, corpus order
    (0 for a dropped document)."""
    n_docs = len(drop)
    counts = np.zeros(n_docs, dtype=np.int64)
    i, batch, chars = 0, [], 0
    with open(path, "wb") as f, progress(total=n_docs, desc="tokenize", unit="doc", disable=quiet) as bar:
        for d, doc in enumerate(iter_documents(corpus)):
            batch.append("" if d < n_docs and drop[d] else doc.text)
            chars += len(doc.text)
            if chars >= _TOKENIZE_BATCH_CHARS:
                i = _write_tokens(tokenizer, batch, f, counts, i, dtype)
                bar.update(len(batch))
                batch, chars = [], 0
        i = _write_tokens(tokenizer, batch, f, counts, i, dtype)
        bar.update(len(batch))
    if i != n_docs:
        raise RetroDataError(f"the corpus changed while it was read ({n_docs} then {i} documents)")
    return counts


def _write_tokens(tokenizer: LMTokenizer, texts: list[str], f, counts: np.ndarray, i: int, dtype) -> int:
    for ids in tokenizer.encode_batch(texts):
        np.asarray(ids, dtype=dtype).tofile(f)
        counts[i] = len(ids)
        i += 1
    return i


def embed_chunks(
    workspace: str | Path,
    embedder: BERTForChunkEmbeddings,
    blocks: range | None = None,
    *,
    quiet: bool = True,
    on_block: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Stage 2: write the keys of every chunk block in `blocks` (default all) that is not on disk yet.

    `on_block(path)` is called after each block file is in place (progress reports, fault injection).

    Block b holds chunks [b * block_size, (b + 1) * block_size); the next block's text is decoded and
    BERT-tokenized in a background thread while the current block runs through BERT.
    """
    ws = open_workspace(workspace)
    size = int(ws.manifest["settings"]["block_size"])
    n_chunks = len(ws.chunks)
    blocks = blocks if blocks is not None else range(math.ceil(n_chunks / size))
    todo = [b for b in blocks if not block_path(ws.root, b).exists()]
    block_path(ws.root, 0).parent.mkdir(exist_ok=True)

    def prepare(block: int, slice_size: int = 1024) -> list[np.ndarray]:
        token_ids = []  # slice by slice, so that no block-sized list of Python strings is ever alive
        for start in range(block * size, min((block + 1) * size, n_chunks), slice_size):
            rows = ws.chunks[start : min(start + slice_size, (block + 1) * size, n_chunks)]  # (s, M)
            token_ids += embedder.tokenize(ws.tokenizer.decode_batch([row[row != ws.pad_id] for row in rows]))
        return token_ids

    written = []
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        progress(
            total=sum(min(size, n_chunks - b * size) for b in todo), desc="embed", unit="chunk", disable=quiet
        ) as bar,
    ):
        pending = pool.submit(prepare, todo[0]) if todo else None
        for j, block in enumerate(todo):
            token_ids = pending.result()
            pending = pool.submit(prepare, todo[j + 1]) if j + 1 < len(todo) else None
            keys = embedder.forward(token_ids, on_batch=bar.update).numpy().astype(np.float16)  # (b, E)
            path = block_path(ws.root, block)
            with open(path.with_name(path.name + ".tmp"), "wb") as f:
                np.save(f, keys)
            os.replace(path.with_name(path.name + ".tmp"), path)
            written.append(path)
            if on_block is not None:
                on_block(path)
    return written


# ------------------------------------------------------------------------------------------ orchestration


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
) -> Path:
    """Build or resume the stages of a workspace up to `until` (default all); returns its path.

    `embedder` is a `BERTForChunkEmbeddings`, a model folder/name, or None for all-MiniLM-L6-v2.
    `until` is one of `STAGES`; e.g. "embeddings" stops before the index. `build_summary(path)` reports.
    """
    root = Path(workspace)
    split = tuple(float(f) for f in split)
    for name, value in (
        ("chunk_len", chunk_len),
        ("num_neighbors", num_neighbors),
        ("block_size", block_size),
    ):
        if value <= 0:
            raise RetroDataError(f"{name} must be > 0, got {value}")
    if seq_len <= 0 or seq_len % chunk_len:
        raise RetroDataError(f"seq_len ({seq_len}) must be a positive multiple of chunk_len ({chunk_len})")
    if until not in STAGES:
        raise RetroDataError(f"until must be one of {STAGES}, got {until!r}")
    check_spec(tokenizer)
    fingerprint = corpus_fingerprint(corpus)
    if not isinstance(embedder, BERTForChunkEmbeddings):
        embedder = BERTForChunkEmbeddings(embedder, device, batch_size=batch_size)
    check_factory(index, embedder.dim)
    settings = {
        "corpus": str(corpus),
        "corpus_fingerprint": fingerprint,
        "tokenizer": tokenizer,
        "chunk_len": chunk_len,
        "embedder": embedder.name,
        "pooling": "mean",
        "index": index,
        "split": list(split),
        "seed": seed,
        "dedup_threshold": dedup_threshold,
        "block_size": block_size,
    }
    manifest = _start_manifest(root, settings)
    times = {}

    def stage(name: str, run) -> dict:
        if manifest["stages"].get(name, {}).get("done"):
            return manifest["stages"][name]
        start = time.perf_counter()
        info = run()
        info.update(done=True, seconds=round(time.perf_counter() - start, 3))
        manifest["stages"][name] = info
        write_manifest(root, manifest)
        times[name] = info["seconds"]
        return info

    def run_chunks() -> dict:
        paths, fields = chunk_corpus(
            root, corpus, tokenizer=tokenizer, chunk_len=chunk_len, split=split, seed=seed,
            dedup_threshold=dedup_threshold, quiet=quiet,
        )
        manifest.update(fields)
        return {"files": [p.name for p in paths]}

    def run_embeddings() -> dict:
        start = time.perf_counter()
        n_new = sum(len(np.load(p, mmap_mode="r")) for p in embed_chunks(root, embedder, quiet=quiet))
        rate = n_new / max(time.perf_counter() - start, 1e-9)
        return {
            "dim": embedder.dim,
            "dtype": "float16",
            "blocks": math.ceil(manifest["counts"]["chunks"] / block_size),
            "chunks_per_s": round(rate, 1),
        }

    stage("chunks", run_chunks)
    if until == "chunks":
        return root
    stage("embeddings", run_embeddings)
    if until == "embeddings":
        return root
    index_info = stage(
        "index", lambda: build_index(open_workspace(root), index, k=num_neighbors, seed=seed, quiet=quiet)[1]
    )
    key = f"neighbors/k{num_neighbors}_t{seq_len}"
    if until == "index":
        return root
    stage(
        key,
        lambda: compute_neighbors(
            open_workspace(root), num_neighbors, seq_len, nprobe=index_info.get("nprobe"), quiet=quiet
        )[1],
    )
    summary = build_summary(root, num_neighbors, seq_len)
    log.info("%s", format_summary(summary, built_now=bool(times)))
    return root


def _start_manifest(root: Path, settings: dict) -> dict:
    """Check the workspace is writable and its settings match; returns the manifest to update.

    A workspace with no finished stage (e.g. the corpus was bad) takes the new settings.
    """
    manifest = read_manifest(root) if root.exists() else None
    if manifest is not None and any(info.get("done") for info in manifest["stages"].values()):
        if manifest.get("format_version") != FORMAT_VERSION:
            raise RetroDataError(
                f"workspace {root} has format_version {manifest.get('format_version')}, not {FORMAT_VERSION}"
            )
        for key, value in settings.items():
            old = manifest["settings"].get(key)
            if old != value:
                raise RetroDataError(
                    f"workspace {root} was built with {key}={old!r}, not {value!r}; "
                    "use another --workspace or the same setting"
                )
        return manifest
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write_probe.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RetroDataError(f"workspace {root} is not writable: {e.strerror}") from None
    manifest = {
        "format_version": FORMAT_VERSION,
        "settings": settings,
        "splits": {},
        "counts": {},
        "stages": {},
    }
    write_manifest(root, manifest)
    return manifest


def build_summary(
    workspace: str | Path, num_neighbors: int | None = None, seq_len: int | None = None
) -> dict:
    """Docs, chunks, tokens, embedding chunks/s, index type, recall@k, time per stage, size on disk."""
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
    key = f"neighbors/k{num_neighbors}_t{seq_len}"
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


def build_db_main(argv: list[str] | None = None) -> int:
    """`retro-lit build-db`: build or resume a workspace, print its summary; bad input -> exit code 2."""
    parser = argparse.ArgumentParser(prog="retro-lit build-db", description=build_db_main.__doc__)
    parser.add_argument(
        "--corpus",
        required=True,
        help="file, folder, .jsonl, .parquet, HF dataset folder, 'python-stdlib[:pkg,...]', 'shakespeare' "
        "or 'linux-doc'",
    )
    parser.add_argument("--workspace", required=True, help="output folder (resumed when it exists)")
    parser.add_argument("--tokenizer", default="bpe:8192", help="bpe:N, bytes, smollm2, or a local tokenizer")
    parser.add_argument("--chunk_len", type=int, default=64, help="tokens per chunk (M)")
    parser.add_argument(
        "--embedder", default=None, help="BERT model folder or cached name (default all-MiniLM-L6-v2)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--index", default="auto", help="'auto' or a faiss index_factory string, e.g. IVF1024,Flat"
    )
    parser.add_argument("--num_neighbors", type=int, default=2, help="neighbours per chunk (K)")
    parser.add_argument(
        "--seq_len", type=int, default=2048, help="training sequence length (T), for neighbour exclusion"
    )
    parser.add_argument("--split", default="0.9,0.05,0.05", help="train,val,test fractions of the documents")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document split and index sampling")
    parser.add_argument("--dedup_threshold", type=float, default=0.8,
                        help="leave out training documents with 13-gram Jaccard >= this to a held-out one; <= 0: keep all")
    parser.add_argument("--batch_size", type=int, default=128, help="embedder batch size")
    parser.add_argument(
        "--block_size", type=int, default=16384, help="chunks per embedding block / query part"
    )
    parser.add_argument(
        "--index_shards",
        type=int,
        default=1,
        help="write the index as N shards (faiss IndexShards at search)",
    )
    placement = parser.add_argument_group("placement (Lightning-style; see docs/scaling.md)")
    placement.add_argument(
        "--trainer.accelerator",
        dest="accelerator",
        default=None,
        help="cpu, gpu or auto (default: from --device)",
    )
    placement.add_argument(
        "--trainer.devices", dest="devices", default="1", help="processes per node (one per GPU), or auto"
    )
    placement.add_argument(
        "--trainer.num_nodes",
        dest="num_nodes",
        type=int,
        default=1,
        help="nodes (MASTER_ADDR, NODE_RANK set)",
    )
    placement.add_argument(
        "--trainer.strategy",
        dest="strategy",
        default="auto",
        help="auto, ddp, ddp_spawn, fsdp, ...: all DDP-style",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        split = tuple(float(f) for f in args.split.split(","))
        if len(split) != 3:
            raise ValueError
    except ValueError:
        print(f"error: --split must be three comma-separated fractions, got {args.split!r}", file=sys.stderr)
        return 2
    from retro_lit.distributed import Placement, build_workspace_distributed

    accelerator = args.accelerator or ("gpu" if args.device.startswith("cuda") else args.device)
    placement = Placement(accelerator, args.devices, args.num_nodes, args.strategy)
    try:
        build_workspace_distributed(
            args.workspace,
            args.corpus,
            placement=placement,
            index_shards=args.index_shards,
            tokenizer=args.tokenizer,
            chunk_len=args.chunk_len,
            embedder=args.embedder,
            index=args.index,
            num_neighbors=args.num_neighbors,
            seq_len=args.seq_len,
            split=split,
            seed=args.seed,
            dedup_threshold=args.dedup_threshold if args.dedup_threshold > 0 else None,
            batch_size=args.batch_size,
            block_size=args.block_size,
            quiet=args.quiet,
        )
    except (RetroDataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
