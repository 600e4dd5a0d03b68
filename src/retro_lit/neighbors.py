"""Stage 4: pre-computed neighbours of every chunk of every split, with same-document exclusion.

Training sequences are chunk-aligned windows of L = T // M chunks inside a split's range. A chunk's
neighbours may not come from any document that its window contains (not only its own document), so a
training sequence never retrieves the tokens it predicts. Documents are contiguous in chunk order, so the
excluded chunks of a window are one range [lo, hi): from the first chunk of the window's first document
to the last chunk of its last document. The last partial window of a split is treated as a window too.

Output: `neighbors/k{K}_t{T}/<split>.npy`, (n_chunks_of_split, K) int64 global chunk ids, -1 = none.
"""

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from retro_lit.corpus import SPLITS
from retro_lit.index import load_index, search_excluding

if TYPE_CHECKING:
    from retro_lit.database import Workspace

log = logging.getLogger(__name__)

QUERY_BATCH = 8192


def neighbors_path(root: str | Path, split: str, k: int, seq_len: int) -> Path:
    return Path(root) / "neighbors" / f"k{k}_t{seq_len}" / f"{split}.npy"


def excluded_ranges(ws: "Workspace", split: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) chunk range excluded for each chunk of `split`: all chunks of its window's documents."""
    first, end = ws.split_range(split)
    n_window = seq_len // ws.chunk_len  # L
    chunks = np.arange(first, end)
    window_start = first + (chunks - first) // n_window * n_window
    window_last = np.minimum(window_start + n_window, end) - 1
    lo = ws.doc_offsets[ws.chunk_doc[window_start]]
    hi = ws.doc_offsets[ws.chunk_doc[window_last] + 1]
    return np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)


def compute_neighbors(
    ws: "Workspace", k: int, seq_len: int, *, nprobe: int | None = None, quiet: bool = True
) -> tuple[list[Path], dict]:
    """Write the neighbours of every split; returns (paths, info with queries_per_s)."""
    index = load_index(ws.root / "index.faiss", nprobe)
    paths, n_queries, start = [], 0, time.perf_counter()
    for split in SPLITS:
        first, end = ws.split_range(split)
        path = neighbors_path(ws.root, split, k, seq_len)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        out = np.lib.format.open_memmap(tmp, "w+", np.int64, (end - first, k))  # (n_split, K)
        lo, hi = excluded_ranges(ws, split, seq_len)
        for a in tqdm(
            range(0, end - first, QUERY_BATCH), desc=f"neighbors {split}", unit="batch", disable=quiet
        ):
            b = min(a + QUERY_BATCH, end - first)
            xq = ws.embeddings(first + a, first + b)  # (q, E)
            lo_b, hi_b = lo[a:b], hi[a:b]
            out[a:b], _ = search_excluding(
                index, xq, k, lambda rows, i: (i >= lo_b[rows, None]) & (i < hi_b[rows, None])
            )
        out.flush()
        del out
        os.replace(tmp, path)
        paths.append(path)
        n_queries += end - first
    rate = n_queries / max(time.perf_counter() - start, 1e-9)
    log.info("neighbours: %d queries at %.0f queries/s", n_queries, rate)
    return paths, {
        "k": k,
        "seq_len": seq_len,
        "files": [str(p.relative_to(ws.root)) for p in paths],
        "queries_per_s": round(rate, 1),
    }
