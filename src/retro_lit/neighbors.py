"""Stage 4: pre-computed neighbours of every chunk of every split, with same-document exclusion.

Training sequences are chunk-aligned windows of L = T // M chunks inside a split's range. A chunk's
neighbours may not come from any document that its window contains (not only its own document), so a
training sequence never retrieves the tokens it predicts. Documents are contiguous in chunk order, so the
excluded chunks of a window are one range [lo, hi): from the first chunk of the window's first document
to the last chunk of its last document, and the chunk right after the window (it holds the window's last
target token, and may open another document). The last partial window of a split is treated as a window too.

Output: `neighbors/k{K}_t{T}/<split>.npy`, (n_chunks_of_split, K) int64 global chunk ids, -1 = none. The
database searched is the index's: the train split and the documents added before the search (its manifest
entry's `additions` counts them); documents added later are not in these files (`retro_lit.additions`).

Queries run in *parts* of `block_size` chunks of a split (searched in batches of at most QUERY_BATCH), in
one process (`compute_neighbors`) or spread over ranks (`compute_neighbor_parts` writes one file per part
under `parts/`, skipped when on disk; `merge_neighbor_parts` assembles the split files). The batches are
the same either way, so a distributed build writes the same bytes as a single-process one.
"""

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from retro_lit.index import index_files, load_index, search_excluding
from retro_lit.progress import progress
from retro_lit.workspace import SPLITS, Workspace, atomic_save, neighbors_path, save_npy

log = logging.getLogger(__name__)

QUERY_BATCH = 8192


def excluded_ranges(
    ws: Workspace, split: str, seq_len: int, start: int = 0, stop: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) chunk range excluded for each chunk of `split` (or of its rows [start, stop)): all chunks
    of its window's documents."""
    first, end = ws.split_range(split)
    n_window = seq_len // ws.chunk_len  # L
    chunks = np.arange(first + start, end if stop is None else first + stop)
    window_start = first + (chunks - first) // n_window * n_window
    window_last = np.minimum(window_start + n_window, end) - 1
    lo = ws.doc_offsets[ws.chunk_doc[window_start]]
    hi = ws.doc_offsets[ws.chunk_doc[window_last] + 1]
    # the window's last target is the first token of the chunk after it, which may open the next document
    hi = np.maximum(hi, np.minimum(window_last + 2, end))
    return np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)


def neighbor_parts(ws: Workspace) -> list[tuple[str, int, int]]:
    """Every query part (split, a, b): rows [a, b) of the split, `block_size` rows each, splits in order."""
    size = int(ws.manifest["settings"]["block_size"])
    parts = []
    for split in SPLITS:
        first, end = ws.split_range(split)
        parts += [(split, a, min(a + size, end - first)) for a in range(0, end - first, size)]
    return parts


def part_path(root: str | Path, split: str, a: int, k: int, seq_len: int) -> Path:
    return neighbors_path(root, split, k, seq_len).parent / "parts" / f"{split}_{a:012d}.npy"


def search_part(ws: Workspace, index, split: str, a: int, b: int, k: int, seq_len: int) -> np.ndarray:
    """Neighbours of rows [a, b) of a split -> (b - a, K) int64, in batches of at most QUERY_BATCH."""
    first = ws.split_range(split)[0]
    lo, hi = excluded_ranges(ws, split, seq_len, a, b)  # (b - a,) each
    out = np.empty((b - a, k), dtype=np.int64)  # (b - a, K)
    for c in range(a, b, QUERY_BATCH):
        d = min(c + QUERY_BATCH, b)
        xq = ws.embeddings(first + c, first + d)  # (q, E)
        lo_b, hi_b = lo[c - a : d - a], hi[c - a : d - a]
        out[c - a : d - a], _ = search_excluding(
            index, xq, k, lambda rows, i: (i >= lo_b[rows, None]) & (i < hi_b[rows, None])
        )
    return out


def _load_workspace_index(ws: Workspace, nprobe: int | None, device: int | None = None):
    return load_index(index_files(ws.root, ws.manifest["stages"].get("index", {})), nprobe, device)


def compute_neighbors(
    ws: Workspace, k: int, seq_len: int, *, nprobe: int | None = None, quiet: bool = True, splits=SPLITS
) -> tuple[list[Path], dict]:
    """Write the neighbours of every split (or of `splits`); returns (paths, info with queries_per_s)."""
    index = _load_workspace_index(ws, nprobe)
    paths, n_queries, start = [], 0, time.perf_counter()
    parts = neighbor_parts(ws)
    for split in splits:
        first, end = ws.split_range(split)
        mine = [(a, b) for s, a, b in parts if s == split]

        def fill(out: np.ndarray) -> None:  # (n_split, K)
            for a, b in progress(mine, desc=f"neighbors {split}", unit="part", disable=quiet):
                out[a:b] = search_part(ws, index, split, a, b, k, seq_len)

        paths.append(_write_split_file(neighbors_path(ws.root, split, k, seq_len), (end - first, k), fill))
        n_queries += end - first
    rate = n_queries / max(time.perf_counter() - start, 1e-9)
    log.info("neighbours: %d queries at %.0f queries/s", n_queries, rate)
    return paths, {
        "k": k,
        "seq_len": seq_len,
        "files": [str(p.relative_to(ws.root)) for p in paths],
        "queries_per_s": round(rate, 1),
        "additions": len(ws.additions),  # the database searched: the train split and this many additions
    }


def compute_neighbor_parts(
    ws: Workspace,
    k: int,
    seq_len: int,
    parts: list[tuple[str, int, int]],
    *,
    nprobe: int | None = None,
    device: int | None = None,
    on_part: Callable[[Path], None] | None = None,
) -> list[Path]:
    """One rank's share of stage 4: write `parts/<split>_<a>.npy` for each part not on disk yet."""
    todo = [(s, a, b) for s, a, b in parts if not part_path(ws.root, s, a, k, seq_len).exists()]
    if not todo:
        return []
    index = _load_workspace_index(ws, nprobe, device)
    written = []
    for split, a, b in todo:
        path = part_path(ws.root, split, a, k, seq_len)
        path.parent.mkdir(parents=True, exist_ok=True)
        written.append(save_npy(path, search_part(ws, index, split, a, b, k, seq_len)))
        if on_part is not None:
            on_part(path)
    return written


def merge_neighbor_parts(ws: Workspace, k: int, seq_len: int) -> list[Path]:
    """Assemble each split's file from its parts (tmp + os.replace); the caller removes `parts/` after it
    has marked the stage done. Raises FileNotFoundError naming a missing part."""
    parts = neighbor_parts(ws)
    paths = []
    for split in SPLITS:
        first, end = ws.split_range(split)
        mine = [(a, b) for s, a, b in parts if s == split]

        def fill(out: np.ndarray) -> None:  # (n_split, K)
            for a, b in mine:
                out[a:b] = np.load(part_path(ws.root, split, a, k, seq_len))

        paths.append(_write_split_file(neighbors_path(ws.root, split, k, seq_len), (end - first, k), fill))
    return paths


def _write_split_file(path: Path, shape: tuple[int, int], fill: Callable[[np.ndarray], None]) -> Path:
    """Write an int64 .npy of `shape` that `fill(memmap)` fills piece by piece, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_save(path) as tmp:
        out = np.lib.format.open_memmap(tmp, "w+", np.int64, shape)
        if hasattr(os, "posix_fallocate"):  # a full disk fails here, as ENOSPC, not as a SIGBUS inside `fill`
            with open(tmp, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        fill(out)
        out.flush()
        del out  # closed before the file is renamed
    return path
