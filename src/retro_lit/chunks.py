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
        raise RetroError(f"the corpus has {n_tokens.sum()} tokens, shorter than one chunk ({chunk_len})")

    kept = np.flatnonzero(~drop)
    order = kept[np.argsort(labels[kept], kind="stable")]  # train docs, then val, then test; corpus order inside
    doc_chunks = -(-n_tokens[order] // chunk_len)  # (n_docs,) chunks of each doc, chunk order
    doc_offsets = np.concatenate([[0], np.cumsum(doc_chunks)]).astype(np.int64)  # (n_docs + 1,)
    n_chunks = int(doc_offsets[-1])
    with contextlib.ExitStack() as files:  # every file replaces its name only once all of them are written
        tmp = {name: files.enter_context(atomic_save(root / name)) for name in CHUNK_FILES}
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
        with open(tmp["documents.jsonl"], "w", encoding="utf-8") as f:
            for doc, src in enumerate(order):
                row = {"doc": doc, "name": names[src], "split": SPLITS[labels[src]], "n_tokens": int(n_tokens[src])}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        lm_tokenizer.save(tmp["tokenizer.json"])
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
    return [root / name for name in CHUNK_FILES], {
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
        raise RetroError(f"the corpus changed while it was read ({n_docs} then {i} documents)")
    return counts


def _write_tokens(tokenizer: LMTokenizer, texts: list[str], f, counts: np.ndarray, i: int, dtype) -> int:
    for ids in tokenizer.encode_batch(texts):
        np.asarray(ids, dtype=dtype).tofile(f)
        counts[i] = len(ids)
        i += 1
    return i


