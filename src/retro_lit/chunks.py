"""Stage 1: documents -> split -> near-duplicate filter -> (BPE training) -> LM tokens -> chunks.

Writes `chunks.npy`, `chunk_doc.npy`, `doc_offsets.npy`, `documents.jsonl` and `tokenizer.json` (see
retro_lit.workspace for the layout). Streams: tokens go to a flat temporary file, then into the chunk
files in split order, with plain reads and writes, so memory does not grow with the corpus.

Nor with a document, beyond the one copy that reading it holds (retro_lit.corpus): its MinHash signature, the
BPE training and the tokenization work on `text_segments` of it, `_SEGMENT_CHARS` at a time, cut between words
where byte-level BPE pre-tokens end, so `bytes` and `bpe:N` give the tokens of the whole text (any other
tokenizer gets the whole text, a second copy). The bound, for a document whose words are separated by spaces
or lines (such cuts every `_SEGMENT_CHARS` or so; a longer stretch without one is tokenized whole, at ~130
bytes a character):

    peak RSS <= RSS of a small build + ~150 MiB (tokenizing `_TOKENIZE_BATCH_CHARS`) + 1.3 x the largest document

the document counted as a Python str (1 byte a character for ASCII text, up to 4). Measured for one-line ASCII
documents with `bytes`: +157 MiB at 10 MB, +267 MiB at 100 MB (+258 MiB as 80-character lines, +272 MiB with
`bpe:1024`), where the reading-it-whole code took +3 GiB at 10 MB; so ~2.8 GiB for a 2 GB document.
tests/test_reliability.py checks <= 200 MiB + 1.5 x at 10 MB (and at 100 MB: `pytest -m slow`).
"""

import contextlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from retro_lit.corpus import (Document, MinHash, iter_documents, near_duplicate_train_documents, split_documents,
                              text_segments)
from retro_lit.progress import progress
from retro_lit.tokenizer import LMTokenizer, load_tokenizer, train_bpe
from retro_lit.workspace import SPLITS, RetroError, atomic_save, scratch_file

log = logging.getLogger(__name__)

_TOKENIZE_BATCH_CHARS = 1 << 20  # text tokenized at a time: the tokenizer takes ~130 bytes a character
_COPY_ITEMS = 1 << 20  # tokens (or chunk documents) copied at a time into chunks.npy (chunk_doc.npy)
_SEGMENT_CHARS = 1 << 16  # a long document is signed, fed to the BPE trainer (which holds 256 texts) and
# tokenized this much at a time (several segments a batch: the tokenizer runs the texts of a batch in parallel)
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
            signatures.append(minhash(text_segments(doc.pieces, _SEGMENT_CHARS)))
    labels = split_documents(len(names), split, seed)  # (n_docs,) int8 split of each doc, corpus order
    drop = np.zeros(len(names), dtype=bool)
    if minhash is not None:
        drop = near_duplicate_train_documents(np.stack(signatures), labels, dedup_threshold)
        log.info("near-duplicates: %d training documents left out (13-gram Jaccard >= %g to a held-out one)",
                 drop.sum(), dedup_threshold)
    if tokenizer.startswith("bpe:"):
        train_texts = (segment for doc, label, d in zip(iter_documents(corpus), labels, drop) if label == 0 and not d
                       for segment in text_segments(doc.pieces, _SEGMENT_CHARS))
        lm_tokenizer = train_bpe(train_texts, tokenizer)
    else:
        lm_tokenizer = load_tokenizer(tokenizer)
    dtype = np.uint16 if lm_tokenizer.vocab_size <= 1 << 16 else np.uint32
    with scratch_file(root / "tokens.bin.tmp") as tmp_tokens:
        n_tokens = tokenize_to_file(corpus, lm_tokenizer, tmp_tokens, dtype, drop, quiet)  # (n_docs,) 0 if dropped
        if n_tokens.sum() < chunk_len:
            raise RetroError(f"the corpus has {n_tokens.sum()} tokens, shorter than one chunk ({chunk_len})")

        kept = np.flatnonzero(~drop)
        order = kept[np.argsort(labels[kept], kind="stable")]  # train docs, then val, then test; corpus order inside
        rows = [{"name": names[src], "split": SPLITS[labels[src]], "n_tokens": int(n_tokens[src])} for src in order]
        paths, doc_offsets = write_chunk_files(root, tmp_tokens, n_tokens, order, rows, chunk_len=chunk_len,
                                               dtype=dtype, pad_id=lm_tokenizer.pad_id, tokenizer=lm_tokenizer)
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
    old_offsets = np.load(root / "doc_offsets.npy")[: d_keep + 1] if d_keep else np.zeros(1, np.int64)
    doc_offsets = np.concatenate([old_offsets, n_keep + np.cumsum(doc_chunks)]).astype(np.int64)  # (n_docs + 1,)
    names = CHUNK_FILES if tokenizer is not None else CHUNK_FILES[:-1]
    with contextlib.ExitStack() as files:
        tmp = {name: files.enter_context(atomic_save(root / name)) for name in names}
        _write_chunks(root, tokens_path, tmp["chunks.npy"], tmp["chunk_doc.npy"], order, n_tokens, doc_offsets,
                      chunk_len, pad_id, dtype, keep)
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


def _write_chunks(root: Path, tokens_path: Path, chunks_path: Path, chunk_doc_path: Path, order: np.ndarray,
                  n_tokens: np.ndarray, doc_offsets: np.ndarray, chunk_len: int, pad_id: int, dtype,
                  keep: tuple[int, int]) -> None:
    """`chunks.npy` (n_chunks, M) and `chunk_doc.npy` (n_chunks,): the first keep[0] rows of the present files, then
    the documents of `order` (chunk order) from the flat token file (corpus order), each padded to whole chunks;
    written in order, `_COPY_ITEMS` at a time, with plain reads and writes (a memmap keeps resident every page it
    touches: twice the tokens of the largest doc)."""
    (n_keep, d_keep), n_chunks, itemsize = keep, int(doc_offsets[-1]), np.dtype(dtype).itemsize
    # open_memmap writes the .npy header and sizes the file; the rows go after it
    chunks_at = np.lib.format.open_memmap(chunks_path, "w+", dtype, (n_chunks, chunk_len)).offset
    chunk_doc_at = np.lib.format.open_memmap(chunk_doc_path, "w+", np.int32, (n_chunks,)).offset
    starts = np.concatenate([[0], np.cumsum(n_tokens)])  # first token of each doc, corpus order
    with open(tokens_path, "rb") as tokens, open(chunks_path, "r+b") as chunks, open(chunk_doc_path, "r+b") as docs:
        chunks.seek(chunks_at), docs.seek(chunk_doc_at)
        if n_keep:
            _copy_rows(root / "chunks.npy", chunks, n_keep * chunk_len * itemsize)
            _copy_rows(root / "chunk_doc.npy", docs, n_keep * np.dtype(np.int32).itemsize)
        for j, src in enumerate(order):
            doc = d_keep + j
            tokens.seek(int(starts[src]) * itemsize)
            for lo in range(0, n_tokens[src], _COPY_ITEMS):
                chunks.write(tokens.read(min(_COPY_ITEMS, n_tokens[src] - lo) * itemsize))
            n_doc_chunks = int(doc_offsets[doc + 1] - doc_offsets[doc])
            chunks.write(np.full(n_doc_chunks * chunk_len - n_tokens[src], pad_id, dtype).tobytes())
            for lo in range(0, n_doc_chunks, _COPY_ITEMS):
                docs.write(np.full(min(_COPY_ITEMS, n_doc_chunks - lo), doc, np.int32).tobytes())


def _copy_rows(source: Path, out, n_bytes: int) -> None:
    """The first n_bytes of the .npy `source`'s data, appended to `out`."""
    offset = np.load(source, mmap_mode="r").offset
    with open(source, "rb") as f:
        f.seek(offset)
        for lo in range(0, n_bytes, _COPY_ITEMS):
            out.write(f.read(min(_COPY_ITEMS, n_bytes - lo)))


def tokenize_to_file(
    corpus, tokenizer: LMTokenizer, path: Path, dtype, drop: np.ndarray, quiet: bool
) -> np.ndarray:
    """Append every kept document's tokens to a flat file; returns (n_docs,) token counts, corpus order
    (0 for a dropped document)."""
    n_docs = len(drop)
    counts = np.zeros(n_docs, dtype=np.int64)
    seen, batch, chars = 0, [], 0  # documents read; (document, text) to tokenize
    with open(path, "wb") as f, progress(total=n_docs, desc="tokenize", unit="doc", disable=quiet) as bar:
        for d, doc in enumerate(iter_documents(corpus)):
            seen += 1
            for text in _tokenizer_segments(doc, tokenizer) if d < n_docs and not drop[d] else ():
                batch.append((d, text))
                chars += len(text)
                if chars >= _TOKENIZE_BATCH_CHARS:
                    _write_tokens(tokenizer, batch, f, counts, dtype)
                    batch, chars = [], 0
            bar.update(1)
        _write_tokens(tokenizer, batch, f, counts, dtype)
    if seen != n_docs:
        raise RetroError(f"the corpus changed while it was read ({n_docs} then {seen} documents)")
    return counts


def _tokenizer_segments(doc: Document, tokenizer: LMTokenizer) -> Iterable[str]:
    """The document's text in `text_segments` for the byte-level tokenizers this stage builds (their tokens do not
    change at those cuts), whole for any other."""
    if tokenizer.spec == "bytes" or tokenizer.spec.startswith("bpe:"):
        return text_segments(doc.pieces, _SEGMENT_CHARS)
    return [doc.text]


def _write_tokens(tokenizer: LMTokenizer, batch: list[tuple[int, str]], f, counts: np.ndarray, dtype) -> None:
    """Tokenize and append the batch's texts, adding to their documents' token counts."""
    for (d, _), ids in zip(batch, tokenizer.encode_batch([text for _, text in batch])):
        np.asarray(ids, dtype=dtype).tofile(f)
        counts[d] += len(ids)
