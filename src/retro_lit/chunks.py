"""Stage 1: documents -> split -> near-duplicate filter -> (BPE training) -> LM tokens -> chunks.

Writes `chunks.npy`, `chunk_doc.npy`, `doc_offsets.npy`, `documents.jsonl` and `tokenizer.json` (see
retro_lit.workspace for the layout). Streams: tokens go to a flat temporary file, then into the chunk
memmap in split order, so memory does not grow with the corpus.
"""

import contextlib
import json
import logging
from pathlib import Path

import numpy as np

from retro_lit.corpus import MinHash, iter_documents, near_duplicate_train_documents, split_documents
from retro_lit.progress import progress
from retro_lit.tokenizer import LMTokenizer, load_tokenizer, train_bpe
from retro_lit.workspace import SPLITS, RetroError, atomic_save

log = logging.getLogger(__name__)

_TOKENIZE_BATCH_CHARS = 4 << 20
CHUNK_FILES = ("chunks.npy", "chunk_doc.npy", "doc_offsets.npy", "documents.jsonl", "tokenizer.json")
_COPY_ROWS = 1 << 20  # chunks copied at a time when a database grows


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
    n_tokens = tokenize_to_file(corpus, lm_tokenizer, tmp_tokens, dtype, drop, quiet)  # (n_docs,) 0 if dropped
    if n_tokens.sum() < chunk_len:
        tmp_tokens.unlink()
        raise RetroError(f"the corpus has {n_tokens.sum()} tokens, shorter than one chunk ({chunk_len})")

    kept = np.flatnonzero(~drop)
    order = kept[np.argsort(labels[kept], kind="stable")]  # train docs, then val, then test; corpus order inside
    rows = [{"name": names[src], "split": SPLITS[labels[src]], "n_tokens": int(n_tokens[src])} for src in order]
    paths, doc_offsets = write_chunk_files(root, tmp_tokens, n_tokens, order, rows, chunk_len=chunk_len,
                                           dtype=dtype, pad_id=lm_tokenizer.pad_id, tokenizer=lm_tokenizer)
    tmp_tokens.unlink()
    n_chunks = int(doc_offsets[-1])

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
    return paths, {
        "splits": splits,
        "counts": counts,
    }


def write_chunk_files(
    root: Path,
    tokens_path: Path,
    n_tokens: np.ndarray,
    order: np.ndarray,
    rows: list[dict],
    *,
    chunk_len: int,
    dtype,
    pad_id: int,
    keep: tuple[int, int] = (0, 0),
    tokenizer: LMTokenizer | None = None,
) -> tuple[list[Path], np.ndarray]:
    """Lay documents out as chunks: write `chunks.npy`, `chunk_doc.npy`, `doc_offsets.npy`, `documents.jsonl`
    (and `tokenizer.json` when `tokenizer` is given); each file replaces its name only once all are written.

    The documents are `order`, indices into the flat token file `tokens_path` whose documents hold `n_tokens`
    (n_docs,) tokens each, with their `documents.jsonl` fields but "doc" in `rows`. They come after the first
    `keep` = (chunks, documents) of the workspace's present files, copied as they are (a growing database),
    so document j gets id keep[1] + j. Returns (paths, doc_offsets (keep[1] + len(order) + 1,) int64).
    """
    n_keep, d_keep = keep
    doc_chunks = -(-n_tokens[order] // chunk_len)  # (n_new,) chunks of each new doc
    new_offsets = n_keep + np.cumsum(doc_chunks)
    old_offsets = np.load(root / "doc_offsets.npy")[: d_keep + 1] if d_keep else np.zeros(1, np.int64)
    doc_offsets = np.concatenate([old_offsets, new_offsets]).astype(np.int64)  # (n_docs + 1,)
    n_chunks = int(doc_offsets[-1])
    names = CHUNK_FILES if tokenizer is not None else CHUNK_FILES[:-1]
    with contextlib.ExitStack() as files:
        tmp = {name: files.enter_context(atomic_save(root / name)) for name in names}
        tokens = np.memmap(tokens_path, dtype=dtype, mode="r")  # (total_tokens,) token-file order
        chunks = np.lib.format.open_memmap(tmp["chunks.npy"], "w+", dtype, (n_chunks, chunk_len))
        chunk_doc = np.lib.format.open_memmap(tmp["chunk_doc.npy"], "w+", np.int32, (n_chunks,))
        if n_keep:
            old_chunks = np.load(root / "chunks.npy", mmap_mode="r")  # (>= n_keep, M)
            old_doc = np.load(root / "chunk_doc.npy", mmap_mode="r")  # (>= n_keep,)
            for a in range(0, n_keep, _COPY_ROWS):
                b = min(a + _COPY_ROWS, n_keep)
                chunks[a:b], chunk_doc[a:b] = old_chunks[a:b], old_doc[a:b]
            del old_chunks, old_doc
        flat = chunks.reshape(-1)  # (n_chunks * M,)
        starts = np.concatenate([[0], np.cumsum(n_tokens)])  # first token of each doc, token-file order
        for j, src in enumerate(order):
            doc = d_keep + j
            a, b = doc_offsets[doc], doc_offsets[doc + 1]
            n = n_tokens[src]
            flat[a * chunk_len : a * chunk_len + n] = tokens[starts[src] : starts[src] + n]
            flat[a * chunk_len + n : b * chunk_len] = pad_id
            chunk_doc[a:b] = doc
        chunks.flush(), chunk_doc.flush()
        del tokens, chunks, chunk_doc, flat
        with open(tmp["doc_offsets.npy"], "wb") as f:
            np.save(f, doc_offsets)
        with open(tmp["documents.jsonl"], "wb") as f:
            if d_keep:
                with open(root / "documents.jsonl", "rb") as old:
                    f.writelines(line for line, _ in zip(old, range(d_keep)))
            for j, row in enumerate(rows):
                f.write((json.dumps({"doc": d_keep + j, **row}, ensure_ascii=False) + "\n").encode("utf-8"))
        if tokenizer is not None:
            tokenizer.save(tmp["tokenizer.json"])
    return [root / name for name in names], doc_offsets


def tokenize_to_file(
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
        raise RetroError(f"the corpus changed while it was read ({n_docs} then {i} documents)")
    return counts


def _write_tokens(tokenizer: LMTokenizer, texts: list[str], f, counts: np.ndarray, i: int, dtype) -> int:
    for ids in tokenizer.encode_batch(texts):
        np.asarray(ids, dtype=dtype).tofile(f)
        counts[i] = len(ids)
        i += 1
    return i


