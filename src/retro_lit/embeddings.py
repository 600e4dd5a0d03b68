"""Stage 2: the frozen-BERT key of every chunk, `embeddings/block_XXXXX.npy`, one file per block.

Block b holds the (block_size, E) float16 keys of chunks [b * block_size, (b + 1) * block_size). A block
is skipped when its file holds all its chunks, so a distributed build hands block ranges to ranks and an
interrupted build resumes at the first missing block. When the database has grown (`retro_lit.additions`),
the last block of the old chunks is short: its keys are kept as they are and the new chunks' keys follow.
"""

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from retro_lit.embedder import BERTForChunkEmbeddings
from retro_lit.progress import progress
from retro_lit.tokenizer import LMTokenizer, workspace_tokenizer
from retro_lit.workspace import Workspace, block_path, open_workspace, save_npy


def embed_chunks(
    workspace: str | Path,
    embedder: BERTForChunkEmbeddings,
    blocks: range | None = None,
    *,
    end: int | None = None,
    quiet: bool = True,
    on_block: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write the keys of every chunk block in `blocks` (default all) that is not complete on disk yet.

    `on_block(path)` is called after each block file is in place (progress reports, fault injection). `end`: keys
    of the chunks before it only (default all), as a smaller database had them (`retro_lit.repair`).

    Block b holds chunks [b * block_size, (b + 1) * block_size); a block file with fewer rows (written before
    the database grew) keeps them bit for bit and gets the keys of the rest. The next block's text is decoded
    and BERT-tokenized in a background thread while the current block runs through BERT.
    """
    ws = open_workspace(workspace)
    size = int(ws.manifest["settings"]["block_size"])
    n_chunks = len(ws.chunks) if end is None else end
    blocks = blocks if blocks is not None else range(math.ceil(n_chunks / size))
    block_path(ws.root, 0).parent.mkdir(exist_ok=True)
    on_disk = {b: keys_on_disk(ws.root, b) for b in blocks}  # keys of chunks [b * size, b * size + that)
    todo = {b: done for b, done in on_disk.items() if done < min(size, n_chunks - b * size)}
    lm_tokenizer = workspace_tokenizer(ws)

    def prepare(block: int) -> list[np.ndarray]:
        return bert_token_ids(ws, embedder, lm_tokenizer, block * size + todo[block], min((block + 1) * size, n_chunks))

    written, order = [], list(todo)
    total = sum(min(size, n_chunks - b * size) - done for b, done in todo.items())
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        progress(total=total, desc="embed", unit="chunk", disable=quiet) as bar,
    ):
        pending = pool.submit(prepare, order[0]) if order else None
        for j, block in enumerate(order):
            token_ids = pending.result()
            pending = pool.submit(prepare, order[j + 1]) if j + 1 < len(order) else None
            keys = embedder.forward(token_ids, on_batch=bar.update).numpy().astype(np.float16)  # (b, E)
            if todo[block]:  # the short block of a smaller database: its keys stay as they are
                keys = np.concatenate([np.load(block_path(ws.root, block)), keys])  # (b, E)
            path = save_npy(block_path(ws.root, block), keys)
            written.append(path)
            if on_block is not None:
                on_block(path)
    return written


def bert_token_ids(ws: Workspace, embedder: BERTForChunkEmbeddings, lm_tokenizer: LMTokenizer, start: int, end: int,
                   slice_size: int = 1024) -> list[np.ndarray]:
    """BERT token ids of the text of chunks [start, end), decoded slice by slice, so that no block-sized list of
    Python strings is ever alive."""
    token_ids = []
    for a in range(start, end, slice_size):
        rows = ws.chunks[a : min(a + slice_size, end)]  # (s, M)
        token_ids += embedder.tokenize(lm_tokenizer.decode_batch([row[row != ws.pad_id] for row in rows]))
    return token_ids


def chunk_keys(ws: Workspace, embedder: BERTForChunkEmbeddings, start: int, end: int) -> np.ndarray:
    """Keys of chunks [start, end) -> (end - start, E) float16, computed as `embed_chunks` computes a block's
    chunks [start, end) (the same texts in one call: the embedder's length-sorted batches are the same)."""
    token_ids = bert_token_ids(ws, embedder, workspace_tokenizer(ws), start, end)
    return embedder.forward(token_ids).numpy().astype(np.float16)


def embedding_info(embedder: BERTForChunkEmbeddings) -> dict:
    """The embeddings stage's record of how its keys were made: a recomputation (`retro_lit.repair`) needs the same
    batches (`batch_size`: the length-sorted batches' padding) and the same `precision` to get the same bits."""
    return {"dim": embedder.dim, "dtype": "float16", "batch_size": embedder.batch_size,
            "precision": embedder.precision}


def keys_on_disk(root: str | Path, block: int) -> int:
    """Keys in block `block`'s file (0 when there is none yet): chunks [block * size, block * size + that)."""
    path = block_path(root, block)
    return len(np.load(path, mmap_mode="r")) if path.exists() else 0
