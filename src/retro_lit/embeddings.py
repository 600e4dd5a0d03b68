"""Stage 2: the frozen-BERT key of every chunk, `embeddings/block_XXXXX.npy`, one file per block.

Block b holds the (block_size, E) float16 keys of chunks [b * block_size, (b + 1) * block_size). A block
is skipped when its file exists, so a distributed build hands block ranges to ranks and an interrupted
build resumes at the first missing block.
"""

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from retro_lit.embedder import BERTForChunkEmbeddings
from retro_lit.progress import progress
from retro_lit.tokenizer import workspace_tokenizer
from retro_lit.workspace import block_path, open_workspace, save_npy


def embed_chunks(
    workspace: str | Path,
    embedder: BERTForChunkEmbeddings,
    blocks: range | None = None,
    *,
    quiet: bool = True,
    on_block: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write the keys of every chunk block in `blocks` (default all) that is not on disk yet.

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
    lm_tokenizer = workspace_tokenizer(ws)

    def prepare(block: int, slice_size: int = 1024) -> list[np.ndarray]:
        token_ids = []  # slice by slice, so that no block-sized list of Python strings is ever alive
        for start in range(block * size, min((block + 1) * size, n_chunks), slice_size):
            rows = ws.chunks[start : min(start + slice_size, (block + 1) * size, n_chunks)]  # (s, M)
            token_ids += embedder.tokenize(lm_tokenizer.decode_batch([row[row != ws.pad_id] for row in rows]))
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
            path = save_npy(block_path(ws.root, block), keys)
            written.append(path)
            if on_block is not None:
                on_block(path)
    return written
