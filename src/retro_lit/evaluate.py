"""Bits-per-byte of a RETRO checkpoint with retrieval ON (several k), OFF, and against a baseline, plus the
paper's leakage-filtered bpb(alpha) (§2.6).

- **Sliding window** (paper §4.1): a document longer than the context T is read in windows of T tokens with
  stride T/2 (rounded down to whole chunks, so windows stay chunk-aligned and the chunks of a window are the
  document's chunks); each token is scored once, by the first window that holds it past the previous window's
  end, so every token after the first T has at least T/2 tokens of context. A document's first token has no
  prediction and is not scored.
- **Retrieval**: the neighbours of each chunk of a document are looked up once (live with `RetroIndex`, or read
  from the workspace's precomputed neighbour files when they have enough k and the database has not grown since)
  and every window reuses them. Text already in the database (the train split) skips neighbours from its own
  document; other text retrieves from the whole database, the documents added after the build included
  (`retro_lit.additions`): a copy of a test document added to the database is another document, so the test
  document retrieves it, which is the paper's leakage case. Retrieval ON at k uses the first k neighbours.
- **bpb(alpha)**: for each evaluation chunk C, r(C) = (longest common contiguous token run between C and any of
  its `leakage_k` neighbours, each neighbour chunk + continuation) / (tokens in C: M, or fewer for a document's
  last chunk). `leakage_k` is the paper's 10 by default, whatever k the model reads; neighbours a precomputed
  file lacks are searched in the workspace's index. bpb(alpha) sums nats and bytes only over the target tokens
  of chunks with r(C) <= alpha; the same chunks count for every model compared.
- bits-per-byte = nats / ln 2 / UTF-8 bytes of the scored tokens (`tokenizer.token_bytes`); perplexity is per
  LM token.
- **Knowledge update** (`leakage_demonstration`): the test documents scored with live retrieval from the original
  database, then from copies of it that also hold the test documents themselves (the paper's leakage case, §4)
  or lightly edited copies of them (another edition): the model is the same, only the database grows.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retro_lit.additions import add_documents
from retro_lit.checkpoint import load_checkpoint, precision_context
from retro_lit.corpus import iter_documents
from retro_lit.embedder import BERTForChunkEmbeddings, resolve_device, workspace_embedder
from retro_lit.index import RetroIndex, index_files, load_index, search_excluding
from retro_lit.plots import write_evaluation_plots
from retro_lit.progress import progress
from retro_lit.tokenizer import workspace_tokenizer
from retro_lit.verify import checked_workspace
from retro_lit.workspace import SPLIT_ALIASES, RetroError

log = logging.getLogger(__name__)

ALPHAS = (0.125, 0.25, 0.5, 0.75, 1.0)
LEAKAGE_K = 10  # neighbours compared for r(C), paper §2.6


# ----------------------------------------------------------------------------- model level

class Window(NamedTuple):
    """The model reads tokens[start:end] and predicts tokens[start+1:end+1]; inputs score_from..end-1 count."""
    start: int
    end: int
    score_from: int


def window_stride(seq_len: int, chunk_len: int) -> int:
    """seq_len / 2 rounded down to whole chunks (at least one chunk)."""
    return max(chunk_len, (seq_len // 2) // chunk_len * chunk_len)


def sliding_windows(n_tokens: int, seq_len: int, chunk_len: int) -> list[Window]:
    """Chunk-aligned windows of at most seq_len inputs, stride seq_len/2 (whole chunks), that score each of
    the n_tokens - 1 predictions exactly once with the longest context on offer."""
    n_inputs = n_tokens - 1  # the last token is only a target
    stride = window_stride(seq_len, chunk_len)
    windows, start, scored = [], 0, 0
    while scored < n_inputs:
        end = min(start + seq_len, n_inputs)
        windows.append(Window(start, end, scored))
        scored, start = end, start + stride
    return windows


def longest_common_substring(chunks: np.ndarray, neighbors: np.ndarray, batch: int = 256) -> np.ndarray:
    """Length of the longest contiguous token run shared by each chunk (N, M) and any one of its neighbours
    (N, K, R) -> (N,) int64. Negative tokens (padding, no token) never match; runs never span two neighbours."""
    chunks, neighbors = np.asarray(chunks, dtype=np.int64), np.asarray(neighbors, dtype=np.int64)
    best = np.zeros(len(chunks), dtype=np.int64)
    if neighbors.size == 0:
        return best
    for lo in range(0, len(chunks), batch):
        a, b = chunks[lo:lo + batch], neighbors[lo:lo + batch]  # (n, M), (n, K, R)
        run = np.zeros(b.shape, dtype=np.int64)  # common run ending at (chunk token i, neighbour token j)
        for i in range(a.shape[1]):
            token = a[:, i, None, None]  # (n, 1, 1)
            match = (b == token) & (token >= 0)  # (n, K, R)
            shifted = np.zeros_like(run)
            shifted[..., 1:] = run[..., :-1]  # run ending at (i-1, j-1)
            run = np.where(match, shifted + 1, 0)
            best[lo:lo + batch] = np.maximum(best[lo:lo + batch], run.max(axis=(1, 2)))
    return best


@torch.inference_mode()
def score_document(model: nn.Module, tokens: Tensor, neighbors: Tensor | None, seq_len: int, batch_size: int = 8,
                   on_window: Callable[[], None] | None = None) -> Tensor:
    """nats (N-1,) float64 of predicting tokens[1:] of one document tokens (N,), through sliding windows.

    neighbors: (C, K, R) token ids of every chunk of the document (C = ceil(N / M)), -1 = no token; None is
    retrieval OFF. Windows of equal length run as one batch.
    """
    M = model.chunk_len
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    nats = torch.zeros(max(len(tokens) - 1, 0), dtype=torch.float64)
    groups: dict[int, list[Window]] = defaultdict(list)
    for w in sliding_windows(len(tokens), seq_len, M):
        groups[w.end - w.start].append(w)
    for length, windows in groups.items():
        L = length // M  # complete chunks in a window
        for lo in range(0, len(windows), batch_size):
            batch = windows[lo:lo + batch_size]
            inputs = torch.stack([tokens[w.start:w.end] for w in batch])  # (b, T)
            targets = torch.stack([tokens[w.start + 1:w.end + 1] for w in batch])  # (b, T)
            window_neighbors = None
            if neighbors is not None and L > 0:
                window_neighbors = torch.stack([neighbors[w.start // M:w.start // M + L] for w in batch]).to(device)  # (b, L, K, R)
            logits = model(inputs, window_neighbors)  # (b, T, V)
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
            for row, w in enumerate(batch):
                nats[w.score_from:w.end] = ce[row, w.score_from - w.start:].double().cpu()
                if on_window is not None:
                    on_window()
    return nats


def per_chunk(values: np.ndarray, chunk_len: int, n_chunks: int) -> np.ndarray:
    """Sum per-prediction values (N-1,) (the prediction of token q is values[q-1]) per chunk q // M -> (C,)."""
    chunk_of_target = np.arange(1, len(values) + 1) // chunk_len
    return np.bincount(chunk_of_target, weights=values, minlength=n_chunks)[:n_chunks]


def filtered_bpb(nats: np.ndarray, n_bytes: np.ndarray, overlap: np.ndarray, alpha: float,
                 above: bool = False) -> float:
    """bpb over the chunks whose overlap ratio r <= alpha (per-chunk nats, bytes and r, each (C,)), or r > alpha
    with `above` (the chunks bpb(alpha) drops: what retrieval can copy); nan if none."""
    keep = overlap <= alpha + 1e-9
    keep = ~keep if above else keep
    total_bytes = n_bytes[keep].sum()
    return float(nats[keep].sum() / math.log(2) / total_bytes) if total_bytes > 0 else math.nan


def summarize(nats: dict[str, np.ndarray], n_bytes: np.ndarray, n_tokens: np.ndarray, overlap: np.ndarray,
              ks: dict[str, int | None], alphas: Sequence[float] = ALPHAS) -> dict:
    """Per-model loss, perplexity, bpb and bpb(alpha), plus the fraction of chunks (and bytes) each alpha keeps."""
    models = {}
    for name, values in nats.items():
        loss = float(values.sum() / max(n_tokens.sum(), 1))
        models[name] = {"k": ks.get(name), "loss": loss, "ppl": math.exp(min(loss, 700.0)),
                        "bpb": float(values.sum() / math.log(2) / max(n_bytes.sum(), 1)),
                        "bpb_alpha": {a: filtered_bpb(values, n_bytes, overlap, a) for a in alphas},
                        "bpb_above_alpha": {a: filtered_bpb(values, n_bytes, overlap, a, above=True) for a in alphas}}
    scored = n_tokens > 0
    return {"models": models,
            "kept_fraction": {a: float((overlap[scored] <= a + 1e-9).mean()) if scored.any() else math.nan for a in alphas},
            "kept_bytes_fraction": {a: float(n_bytes[overlap <= a + 1e-9].sum() / max(n_bytes.sum(), 1)) for a in alphas}}


# ----------------------------------------------------------------------------- documents and neighbours

@dataclass
class EvalDocument:
    name: str
    tokens: np.ndarray  # (N,) int64
    doc_id: int | None = None  # document index in the workspace (for same-document exclusion and file lookups)


def workspace_documents(ws, split: str) -> Iterator[EvalDocument]:
    """The documents of a workspace split, as their LM tokens (chunk padding removed)."""
    first, end = ws.split_range(split)
    docs = ws.documents
    for d in np.unique(np.asarray(ws.chunk_doc[first:end])):
        lo, hi = int(ws.doc_offsets[d]), int(ws.doc_offsets[d + 1])
        tokens = np.asarray(ws.chunks[lo:hi], dtype=np.int64).reshape(-1)[: int(docs[d]["n_tokens"])]  # (N,)
        yield EvalDocument(docs[d]["name"], tokens, int(d))


def corpus_documents(source: str | Path, tokenizer) -> Iterator[EvalDocument]:
    """Documents of an outside corpus (any source `retro_lit.corpus` reads), tokenized with the LM tokenizer."""
    for doc in iter_documents(source):
        yield EvalDocument(doc.name, np.asarray(tokenizer.encode(doc.text), dtype=np.int64))


def chunk_rows(tokens: np.ndarray, chunk_len: int) -> np.ndarray:
    """A document's tokens (N,) -> chunks (ceil(N/M), M), the last one padded with -1."""
    n_chunks = -(-len(tokens) // chunk_len)
    rows = np.full(n_chunks * chunk_len, -1, dtype=np.int64)
    rows[: len(tokens)] = tokens
    return rows.reshape(n_chunks, chunk_len)


class LiveNeighbors:
    """Neighbour tokens (C, k, R) of every chunk of a document, looked up now with a `RetroIndex`;
    `exclude_own_doc` for text that is in the database (the train split)."""

    def __init__(self, index, k: int, exclude_own_doc: bool):
        self.index, self.k, self.exclude_own_doc = index, k, exclude_own_doc

    def __call__(self, doc: EvalDocument, chunks: np.ndarray) -> np.ndarray:
        exclude = [doc.doc_id] if self.exclude_own_doc and doc.doc_id is not None else None
        return self.index.search(torch.from_numpy(chunks), k=self.k, exclude_docs=exclude).tokens  # (C, k, R)


class PrecomputedNeighbors:
    """Neighbour tokens from a workspace's `neighbors/k{K}_t{T}/<split>.npy` (first k columns). For k > K (r(C)
    compares 10 neighbours; files often hold 2), the file's K are followed by the k - K nearest other chunks,
    searched in the workspace's faiss `index` with the chunks' stored keys (those the file was searched with).
    These follow evaluation's exclusion rule: train-split text skips its own document, held-out text retrieves
    from the whole database (for train text the file itself skips every document of the training window)."""

    def __init__(self, ws, split: str, k: int, file_k: int, seq_len: int, index=None):
        if k > file_k and index is None:
            raise ValueError(f"{k} neighbours from a file of {file_k} need the faiss index to search the rest")
        self.ws, self.k, self.index = ws, k, index
        self.ids = ws.neighbors(split, file_k, seq_len)  # (n_chunks_of_split, K)
        self.first = ws.split_range(split)[0]
        self.exclude_own_doc = SPLIT_ALIASES.get(split, split) == "train"

    def __call__(self, doc: EvalDocument, chunks: np.ndarray) -> np.ndarray:
        return self.ws.neighbor_tokens(self.neighbor_ids(doc, len(chunks)))  # (C, k, R)

    def neighbor_ids(self, doc: EvalDocument, n_chunks: int) -> np.ndarray:
        """Global chunk ids (C, k) of the neighbours of the document's first n_chunks chunks, -1 = none."""
        first = int(self.ws.doc_offsets[doc.doc_id])  # global id of the document's first chunk
        known = np.asarray(self.ids[first - self.first:first - self.first + n_chunks, : self.k])  # (C, <=k)
        if known.shape[1] == self.k:
            return known
        own_lo, own_hi = (first, int(self.ws.doc_offsets[doc.doc_id + 1])) if self.exclude_own_doc else (0, 0)

        def drop(rows: np.ndarray, i: np.ndarray) -> np.ndarray:  # (q, width): the file's ids, the own document
            return (i[:, :, None] == known[rows, None, :]).any(-1) | ((i >= own_lo) & (i < own_hi))

        keys = self.ws.embeddings(first, first + n_chunks)  # (C, E)
        more, _ = search_excluding(self.index, keys, self.k - known.shape[1], drop)  # (C, k - K)
        return np.concatenate([known, more], axis=1)  # (C, k)


class RandomNeighbors:
    """Control: k random train-split chunks (with their continuations) per chunk instead of its nearest
    neighbours, seeded per document. Retrieval ON with these vs the real neighbours separates what the retrieved
    text carries from what the extra CCA pathway alone learned (e.g. the style of the corpus)."""

    def __init__(self, ws, k: int, seed: int = 0):
        self.ws, self.k, self.seed = ws, k, seed
        self.lo, self.hi = ws.split_range("train")

    def __call__(self, doc: EvalDocument, chunks: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([self.seed, doc.doc_id if doc.doc_id is not None else 0])
        return self.ws.neighbor_tokens(rng.integers(self.lo, self.hi, size=(len(chunks), self.k)))  # (C, k, R)


def precomputed_file(ws, split: str, k: int, seq_len: int, outdated: bool = False) -> tuple[int, int] | None:
    """(K, T) of a precomputed neighbour file usable for k neighbours of `split`, or None. Outside the train split
    exclusion never applies (held-out text is not in the database), so a file built for any T will do. A file
    searched before documents were added to the database (`retro_lit.additions`) lacks them: it is used only
    with `outdated`."""
    name = SPLIT_ALIASES.get(split, split)
    for path in sorted((ws.root / "neighbors").glob(f"k*_t*/{name}.npy")):
        file_k, file_t = (int(part[1:]) for part in path.parent.name.split("_"))
        searched = ws.manifest["stages"].get(f"neighbors/{path.parent.name}", {}).get("additions", 0)
        if file_k >= k and (file_t == seq_len or name != "train") and (outdated or searched == len(ws.additions)):
            return file_k, file_t
    return None


# ----------------------------------------------------------------------------- evaluation

class Scorer(NamedTuple):
    model: nn.Module
    k: int | None  # neighbours per chunk; None = retrieval OFF
    neighbors_of: Callable | None = None  # its own neighbour source (e.g. random chunks), else the shared one


def evaluate_documents(scorers: dict[str, Scorer], documents: Iterable[EvalDocument],
                       neighbors_of: Callable[[EvalDocument, np.ndarray], np.ndarray] | None, token_bytes: np.ndarray,
                       seq_len: int, chunk_len: int, leakage_k: int | None = None, alphas: Sequence[float] = ALPHAS,
                       batch_size: int = 8, progress=None) -> dict:
    """Score every document with every scorer; returns `summarize(...)` plus counts.

    neighbors_of(doc, chunks (C, M)) -> (C, K_max, R) neighbour tokens, K_max >= every scorer's k and leakage_k
    (None: nothing retrieves and every r(C) = 0). progress: a tqdm-like object, updated once per window and scorer.
    """
    M = chunk_len
    nats, n_bytes, n_tokens, overlap = defaultdict(list), [], [], []
    token_bytes = np.asarray(token_bytes, dtype=np.int64)
    for doc in documents:
        if len(doc.tokens) < 2:
            continue
        chunks = chunk_rows(doc.tokens, M)  # (C, M)
        found = torch.as_tensor(neighbors_of(doc, chunks), dtype=torch.long) if neighbors_of else None  # (C, K_max, R)
        for name, (model, k, own_source) in scorers.items():
            neighbors = found[:, :k] if (k and found is not None) else None
            if k and own_source is not None:
                neighbors = torch.as_tensor(own_source(doc, chunks), dtype=torch.long)[:, :k]  # (C, k, R)
            values = score_document(model, torch.from_numpy(doc.tokens), neighbors, seq_len, batch_size,
                                    progress.update if progress is not None else None).numpy()
            nats[name].append(per_chunk(values, M, len(chunks)))
        n_bytes.append(per_chunk(token_bytes[doc.tokens[1:]].astype(np.float64), M, len(chunks)))
        n_tokens.append(per_chunk(np.ones(len(doc.tokens) - 1), M, len(chunks)))
        if found is not None and leakage_k:
            own_len = (chunks >= 0).sum(1)  # M, or fewer for a document's last chunk: a whole copy is r = 1
            overlap.append(longest_common_substring(chunks, found[:, :leakage_k].numpy()) / own_len)
        else:
            overlap.append(np.zeros(len(chunks)))
    if not n_bytes:
        raise ValueError("nothing to evaluate: no document has two tokens or more")
    cat = np.concatenate
    result = summarize({name: cat(v) for name, v in nats.items()}, cat(n_bytes), cat(n_tokens), cat(overlap),
                       {name: s.k for name, s in scorers.items()}, alphas)
    result.update(n_documents=len(n_bytes), n_chunks=int(sum(len(b) for b in n_bytes)),
                  n_tokens=int(cat(n_tokens).sum()), n_bytes=int(cat(n_bytes).sum()))
    return result


def count_windows(documents: Sequence[EvalDocument], seq_len: int, chunk_len: int) -> int:
    return sum(len(sliding_windows(len(d.tokens), seq_len, chunk_len)) for d in documents)


def capped(documents: Iterable[EvalDocument], max_tokens: int | None) -> list[EvalDocument]:
    """The documents, in order, up to about max_tokens tokens (the last one cut); all of them when None."""
    out, total = [], 0
    for doc in documents:
        if max_tokens is not None and total >= max_tokens:
            break
        if max_tokens is not None and total + len(doc.tokens) > max_tokens:
            doc = EvalDocument(doc.name, doc.tokens[: max_tokens - total], doc.doc_id)
        out.append(doc)
        total += len(doc.tokens)
    return out


def markdown_table(result: dict) -> str:
    """The result as a Markdown table: one row per model, then the fraction of chunks each alpha keeps."""
    alphas = list(result["kept_fraction"])
    head = "| model | k | loss | ppl | bpb | " + " | ".join(f"bpb(α={a:g})" for a in alphas) + " |"
    lines = [head, "|" + "---|" * (5 + len(alphas))]
    for name, m in result["models"].items():
        cells = [name, str(m["k"] or "–"), f"{m['loss']:.4f}", f"{m['ppl']:.2f}", f"{m['bpb']:.4f}"]
        lines.append("| " + " | ".join(cells + [f"{m['bpb_alpha'][a]:.4f}" for a in alphas]) + " |")
    kept = [f"{result['kept_fraction'][a]:.1%}" for a in alphas]
    lines.append("| chunks kept | | | | | " + " | ".join(kept) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command

def evaluate_checkpoint(
    ckpt_path: str,
    workspace: str,
    split: str = "validation",
    corpus: str | None = None,
    neighbors: int | tuple[int, ...] = (1, 2, 4),
    baseline_ckpt: str | None = None,
    baselines: dict[str, str] | None = None,
    seq_len: int | None = None,
    alphas: float | tuple[float, ...] = ALPHAS,
    leakage_k: int = LEAKAGE_K,
    random_control: bool = False,
    neighbor_source: Literal["auto", "live", "precomputed", "random"] = "auto",
    max_tokens: int | None = None,
    batch_size: int = 8,
    out_dir: str | None = None,
    device: str = "auto",
    precision: str = "32",
    quiet: bool = False,
) -> tuple[dict, list[Path]]:
    """Bits-per-byte with retrieval ON (several k), OFF, a baseline, and leakage-filtered bpb(alpha).

    Writes `eval_<source>.json` and two PNG plots; returns (the result, the files written).

    Args:
        ckpt_path: RetroLM checkpoint (.ckpt).
        workspace: built workspace: tokenizer, chunk database, faiss index.
        split: workspace split: validation, test or train (ignored with --corpus).
        corpus: evaluate an outside corpus (file, folder, .jsonl, ...) instead of a split.
        neighbors: k of retrieval ON: one value, or several as [1,2,4].
        baseline_ckpt: a checkpoint trained without retrieval, scored with retrieval OFF.
        baselines: more such checkpoints, by row name (e.g. {"baseline 2x": path}).
        seq_len: context T (default: the checkpoint's data.seq_len).
        alphas: alpha of bpb(alpha): one value, or several as [0.125,0.5].
        leakage_k: neighbours compared for r(C) (the paper's 10, whatever --neighbors).
        random_control: also score retrieval ON with random train chunks as neighbours (r(C) from the real ones).
        neighbor_source: live RetroIndex search, the workspace's precomputed files, auto (files when they fit), or
            random train chunks as a control.
        max_tokens: evaluate only the first ~N tokens of the documents.
        batch_size: windows per forward pass.
        out_dir: where the JSON and PNGs go (default: next to the checkpoint).
        device: auto, cpu or cuda[:i].
        precision: 32 or bf16 (autocast).
        quiet: no progress bar.
    """
    ks = [neighbors] if isinstance(neighbors, int) else list(neighbors)
    alphas = [alphas] if isinstance(alphas, (int, float)) else list(alphas)
    if not ks or not alphas or min(ks) <= 0 or leakage_k <= 0:
        raise RetroError("--neighbors and --alphas must be non-empty, --neighbors values and --leakage_k positive")
    torch_device = resolve_device(device)
    model, data_hparams = load_checkpoint(ckpt_path, torch_device)
    ws = checked_workspace(workspace)
    seq_len = seq_len or data_hparams.get("seq_len")
    if not seq_len or seq_len % ws.chunk_len or ws.chunk_len != model.chunk_len:
        raise RetroError(f"--seq_len ({seq_len}) must be a multiple of the chunk length {ws.chunk_len}, which must "
                         f"match the checkpoint's ({model.chunk_len}); pass --seq_len")
    scorers = {f"retrieval on (k={k})": Scorer(model, k) for k in ks}
    scorers["retrieval off"] = Scorer(model, None)
    if random_control:
        scorers[f"random neighbours (k={max(ks)})"] = Scorer(model, max(ks), RandomNeighbors(ws, max(ks)))
    without_retrieval = ({"baseline": baseline_ckpt} if baseline_ckpt else {}) | (baselines or {})
    for name, path in without_retrieval.items():
        scorers[name] = Scorer(load_checkpoint(path, torch_device)[0], None)
    source, lm_tokenizer = corpus or split, workspace_tokenizer(ws)
    documents = capped(corpus_documents(corpus, lm_tokenizer) if corpus else workspace_documents(ws, split), max_tokens)
    neighbors_of, how = choose_neighbors(ws, split, neighbor_source, max(ks), leakage_k, seq_len, str(torch_device),
                                         corpus)
    total = count_windows(documents, seq_len, ws.chunk_len) * len(scorers)
    start = time.time()
    with progress(total=total, desc=f"evaluate {source}", unit="window", disable=quiet) as bar, \
            precision_context(precision, torch_device):
        result = evaluate_documents(scorers, documents, neighbors_of, lm_tokenizer.token_bytes, seq_len, ws.chunk_len,
                                    leakage_k, alphas, batch_size, bar)
    result = {"checkpoint": str(ckpt_path), "baseline": baseline_ckpt, "baselines": baselines or {},
              "workspace": str(workspace),
              "source": source, "seq_len": seq_len, "stride": window_stride(seq_len, ws.chunk_len),
              "neighbors": how, "leakage_k": leakage_k, "precision": precision,
              "seconds": round(time.time() - start, 1), **result}
    return result, write_outputs(result, Path(out_dir) if out_dir else Path(ckpt_path).parent, source)


def evaluation_report(outcome: tuple[dict, list[Path]]) -> str:
    """What `retro-lit evaluate` prints: the Markdown table and the files written."""
    result, paths = outcome
    return markdown_table(result) + "\n\nwrote " + ", ".join(str(p) for p in paths)


def choose_neighbors(ws, split: str, source: str, k: int, leakage_k: int, seq_len: int, device: str = "auto",
                     corpus: str | Path | None = None):
    """(neighbors_of, description) giving max(k, leakage_k) neighbours per chunk of `split` (or of an outside
    `corpus`). source: `precomputed` files, or `auto` when one holds the k scored and was searched over the
    database as it is now (r(C)'s extra neighbours are searched), else `live`; `random` train chunks as a
    control."""
    n = max(k, leakage_k)
    if source == "random":
        return RandomNeighbors(ws, n), "random train chunks (control)"
    if corpus:
        if source == "precomputed":
            raise RetroError("--neighbor_source precomputed needs a workspace split, not --corpus")
        return LiveNeighbors(RetroIndex(ws.root, ws.chunk_len, device=device), n, exclude_own_doc=False), "live"
    found = precomputed_file(ws, split, k, seq_len, outdated=source == "precomputed") if source != "live" else None
    if found is not None:
        file_k, file_t = found
        how, index = f"precomputed k{file_k}_t{file_t}", None
        if n > file_k:
            info = ws.manifest["stages"]["index"]
            index = load_index(index_files(ws.root, info), info.get("nprobe"))
            how += f" + {n - file_k} searched for r(C)"
        return PrecomputedNeighbors(ws, split, n, file_k, file_t, index), how
    if source == "precomputed":
        raise RetroError(f"no precomputed neighbours with k >= {k} for split {split!r} (seq_len {seq_len})")
    train = split in ("train", "fit")
    return LiveNeighbors(RetroIndex(ws.root, ws.chunk_len, device=device), n, exclude_own_doc=train), "live"


def write_outputs(result: dict, out_dir: Path, source: str) -> list[Path]:
    """`eval_<source>.json` and the two plots into out_dir; returns their paths."""
    stem = "eval_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(source).name)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2, default=float) + "\n", encoding="utf-8")
    return [path, *write_evaluation_plots(result, out_dir, stem)]


# ----------------------------------------------------------------------------- knowledge update: the leakage case

def edited_copy(text: str, rate: float, rng: np.random.Generator) -> str:
    """A lightly edited copy of `text`: each whitespace-separated word is, with probability `rate`, dropped or
    replaced by another word of the text (one or the other at even odds); the whitespace is kept."""
    parts = re.split(r"(\s+)", text)  # words at even positions, the whitespace between them at odd ones
    words = [p for p in parts[::2] if p]
    for i in range(0, len(parts), 2):
        if parts[i] and rng.random() < rate:
            parts[i] = "" if rng.random() < 0.5 else words[rng.integers(len(words))]
    return "".join(parts)


def leakage_demonstration(workspace: str | Path, model: nn.Module, scratch: str | Path, *, seq_len: int, k: int = 2,
                          embedder: BERTForChunkEmbeddings | None = None, device: str = "auto", edit_rate: float = 0.1,
                          seed: int = 0, max_tokens: int | None = None, alphas: Sequence[float] = ALPHAS,
                          batch_size: int = 8, quiet: bool = True) -> dict:
    """bpb of the held-out test documents, retrieval ON (k) and OFF, with live retrieval from three databases:
    the workspace's own; a copy of it to which the test documents themselves were added (`retro_lit.additions`:
    the paper's leakage case); a copy to which edited copies of them were added (`edited_copy`, `edit_rate`).

    The copies are made under `scratch` (the workspace is not changed). The model and the scored tokens are the
    same throughout: OFF cannot change, ON drops as far as the model reads what it retrieves. r(C) compares the
    paper's 10 neighbours, so bpb(alpha) and bpb above alpha say whether a drop comes from high-overlap chunks.
    Returns {"k", "seq_len", "edit_rate", "databases": {name: `evaluate_documents` result}}.
    """
    ws = checked_workspace(workspace)
    lm_tokenizer = workspace_tokenizer(ws)
    documents = capped(workspace_documents(ws, "test"), max_tokens)
    if embedder is None:
        embedder = workspace_embedder(ws.manifest, device)
    rng = np.random.default_rng(seed)
    texts = {doc.name: lm_tokenizer.decode(doc.tokens.tolist()) for doc in documents}
    added = {"test documents": {f"copy of {name}": text for name, text in texts.items()},
             "edited copies": {f"edited copy of {name}": edited_copy(text, edit_rate, rng)
                               for name, text in texts.items()}}
    databases = {"original": Path(workspace)}
    for name, docs in added.items():
        folder = Path(scratch) / name.replace(" ", "-")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(workspace, folder / "workspace")
        corpus = folder / "documents.jsonl"
        with open(corpus, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"name": doc, "text": text}, ensure_ascii=False) + "\n" for doc, text in docs.items())
        databases[name] = add_documents(folder / "workspace", corpus, embedder, name=name, quiet=quiet)
    scorers = {"on": Scorer(model, k), "off": Scorer(model, None)}
    results = {}
    for name, root in databases.items():
        live = LiveNeighbors(RetroIndex(root, ws.chunk_len, bert=embedder), max(k, LEAKAGE_K), exclude_own_doc=False)
        results[name] = evaluate_documents(scorers, documents, live, lm_tokenizer.token_bytes, seq_len, ws.chunk_len,
                                           LEAKAGE_K, alphas, batch_size)
        log.info("leakage demonstration, database %r: bpb ON %.4f, OFF %.4f", name,
                 results[name]["models"]["on"]["bpb"], results[name]["models"]["off"]["bpb"])
    return {"k": k, "seq_len": seq_len, "edit_rate": edit_rate, "databases": results}


def leakage_table(result: dict, alpha: float) -> str:
    """Markdown: per database, bpb ON and OFF, and ON / OFF over all chunks, over the chunks with r(C) > alpha (what
    the database lets the model copy) and over the others (bpb(alpha))."""
    lines = [f"| database | bpb ON (k={result['k']}) | bpb OFF | ON / OFF | chunks with r(C) > {alpha:g} | "
             f"ON / OFF there | ON / OFF on the rest (bpb(α={alpha:g})) |", "|---|---|---|---|---|---|---|"]
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.3f}" if not (math.isnan(a) or math.isnan(b)) else "–"  # nan: no such chunk

    for name, r in result["databases"].items():
        on, off = r["models"]["on"], r["models"]["off"]
        lines.append(f"| {name} | {on['bpb']:.4f} | {off['bpb']:.4f} | {ratio(on['bpb'], off['bpb'])} | "
                     f"{1 - r['kept_fraction'][alpha]:.1%} | "
                     f"{ratio(on['bpb_above_alpha'][alpha], off['bpb_above_alpha'][alpha])} | "
                     f"{ratio(on['bpb_alpha'][alpha], off['bpb_alpha'][alpha])} |")
    return "\n".join(lines)
