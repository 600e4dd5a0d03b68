"""The faiss index over the train chunks (L2 on BERT keys), its recall report, and live lookups.

`auto` picks by the number of train chunks n (E = key width):

| n            | factory                  | why                                                       |
|--------------|--------------------------|-----------------------------------------------------------|
| < 32,768     | `Flat`                   | exact, and a full scan is still cheap                      |
| < 1,000,000  | `IVF{nlist},Flat`        | nlist ~ 4 sqrt(n); nprobe tuned at build to recall >= 0.95 |
| >= 1,000,000 | `OPQ32,IVF{nlist},PQ32`  | 32-byte codes: ~40 GB per billion chunks                   |

Any `index_factory` string works too. The index trains on a seeded sample of the train keys, adds the
keys block by block (ids = global chunk ids), uses faiss GPU when it is available, and measures
recall@k against exact search on a sample of chunks (the query's own chunk dropped from both lists; a
result counts when its distance is within the exact k-th distance, so duplicate chunks do not count as
misses). For IVF indexes nprobe is the smallest power of two reaching `target_recall` on one half of the
sample; the recall reported (and stored in the manifest) is measured on the other half.

Documents added after the build (`retro_lit.additions`) go into the trained index under their global chunk
ids (`add_keys`), which do not follow the train ids: IVF indexes store ids anyway; a Flat index, whose ids
are positions, is rebuilt once inside an `IndexIDMap` with the same keys. Recall is measured again over the
grown database at the index's nprobe (`measure_recall`), which is not re-tuned.
"""

import errno
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
import torch

from retro_lit.embedder import BERTForChunkEmbeddings, workspace_embedder
from retro_lit.progress import progress
from retro_lit.tokenizer import workspace_tokenizer
from retro_lit.workspace import MANIFEST, RetroError, Workspace, atomic_save, open_workspace

log = logging.getLogger(__name__)

RECALL_QUERIES = 2000
FLAT_MAX = 32768
IVF_FLAT_MAX = 1_000_000


def auto_factory(n: int) -> str:
    """The `auto` index for n train chunks (see the module docstring)."""
    if n < FLAT_MAX:
        return "Flat"
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    return f"IVF{nlist},Flat" if n < IVF_FLAT_MAX else f"OPQ32,IVF{nlist},PQ32"


def check_factory(factory: str, dim: int) -> None:
    """Raise `RetroError` for a factory string faiss cannot build (checked before any data is written)."""
    if factory == "auto":
        return
    try:
        faiss.index_factory(dim, factory)
    except RuntimeError:
        raise RetroError(f"invalid faiss index factory string {factory!r} for dimension {dim}") from None


def build_index(
    ws: Workspace,
    factory: str = "auto",
    *,
    k: int = 2,
    seed: int = 0,
    target_recall: float = 0.95,
    quiet: bool = True,
) -> tuple[Path, dict]:
    """Stage 3: train and fill the index over the train chunks, write `index.faiss`, measure recall@k.

    The train split is the first chunk range [0, n), so faiss's sequential ids are the global chunk ids.
    Returns (path, info) with info = {factory, n, nprobe, k, recall, train_sample}.
    """
    n, dim = ws.split_range("train")[1], ws.embedding_dim
    name = auto_factory(n) if factory == "auto" else factory
    rng = np.random.default_rng(seed)
    index = faiss.index_factory(dim, name)
    sample = _train_sample(rng, n, index)
    index = _to_gpu(index)
    if not index.is_trained:
        index.train(ws.embeddings_at(sample))
    block = int(ws.manifest["settings"]["block_size"])
    for start in progress(range(0, n, block), desc="index", unit="block", disable=quiet):
        index.add(ws.embeddings(start, min(start + block, n)))  # (b, E)
    index = _to_cpu(index)
    info = _measured_info(ws, index, _ivf(index), name, n, sample, rng, k, target_recall)
    path = ws.root / "index.faiss"
    save_index(index, path)
    log.info("index %s over %d train chunks: recall@%d vs exact = %.4f (nprobe %s)",
             name, n, k, info["recall"], info["nprobe"])
    return path, info


def _measured_info(ws: Workspace, index: faiss.Index, ivf, name: str, n: int, sample: np.ndarray,
                   rng: np.random.Generator, k: int, target_recall: float) -> dict:
    """Tune nprobe and measure recall@k of a filled index; returns the index stage's manifest info."""
    nprobe, recall = _tune_and_measure(ws, index, ivf.nlist if ivf else None, rng, k, target_recall)
    return {
        "factory": name,
        "n": int(n),
        "nprobe": nprobe,
        "k": k,
        "recall": round(float(recall), 4),
        "train_sample": int(len(sample)),
    }


def _train_sample(rng: np.random.Generator, n: int, index: faiss.Index) -> np.ndarray:
    """Sorted seeded sample of train chunk ids to train the index on (>= 64 per IVF list)."""
    ivf = _ivf(index)
    return np.sort(rng.choice(n, size=min(n, max(50_000, 64 * (ivf.nlist if ivf else 1))), replace=False))


def _tune_and_measure(
    ws: Workspace,
    index: faiss.Index,
    nlist: int | None,
    rng: np.random.Generator,
    k: int,
    target_recall: float,
    ranges: Sequence[tuple[int, int]] | None = None,
) -> tuple[int | None, float]:
    """Smallest power-of-two nprobe reaching `target_recall` on half a query sample; recall on the other half.
    The index holds the chunk `ranges` (default: the train split)."""
    queries = np.sort(rng.choice(len(ws.chunks), size=min(len(ws.chunks), RECALL_QUERIES), replace=False))
    xq = ws.embeddings_at(queries)  # (Q, E)
    kth = _exact_kth_distance(ws, xq, queries, k, ranges or [ws.split_range("train")])  # (Q,)
    halves = (
        [np.arange(len(queries)) % 2 == h for h in (0, 1)] if len(queries) > 1 else [np.ones(1, bool)] * 2
    )
    nprobe = None
    if nlist is not None:
        for nprobe in (2**i for i in range(int(math.log2(nlist)) + 1)):
            set_nprobe(index, nprobe)
            if _recall(ws, index, xq[halves[0]], queries[halves[0]], kth[halves[0]], k) >= target_recall:
                break
    return nprobe, _recall(ws, index, xq[halves[1]], queries[halves[1]], kth[halves[1]], k)


# --------------------------------------------------------------------------------------- sharded index
# One quantizer trained once (on the same sample as `build_index`), then S shards over contiguous,
# block-aligned train chunk ranges, each filled independently (by any rank) and written as its own file.
# At search time the shards are a faiss `IndexShards` with successive ids, whose merged results are the
# unsharded index's results: every shard holds the same trained quantizer, so an IVF search with nprobe
# visits the same lists, and a Flat search is exact either way.

SHARD_DIR = "index_shards"


def shard_files(root: str | Path, shards: int) -> list[Path]:
    return [Path(root) / SHARD_DIR / f"shard_{s:05d}_of_{shards:05d}.faiss" for s in range(shards)]


def shard_range(ws: Workspace, shard: int, shards: int) -> tuple[int, int]:
    """[start, end) train chunks of one shard: a contiguous run of whole embedding blocks."""
    n, block = ws.split_range("train")[1], int(ws.manifest["settings"]["block_size"])
    n_blocks = math.ceil(n / block)
    return min(shard * n_blocks // shards * block, n), min((shard + 1) * n_blocks // shards * block, n)


def num_index_shards(ws: Workspace, shards: int) -> int:
    """Shards actually used: at most one per train embedding block."""
    n, block = ws.split_range("train")[1], int(ws.manifest["settings"]["block_size"])
    return max(1, min(shards, math.ceil(n / block)))


def train_index_shards(ws: Workspace, factory: str = "auto", *, shards: int, seed: int = 0) -> Path:
    """Train the (empty) index once on a seeded sample; written as `index_shards/trained.faiss` (skipped
    when it exists). The sample is the one `build_index` draws, so the quantizer is the same."""
    path = Path(ws.root) / SHARD_DIR / "trained.faiss"
    if path.exists():
        return path
    n = ws.split_range("train")[1]
    name = auto_factory(n) if factory == "auto" else factory
    index = faiss.index_factory(ws.embedding_dim, name)
    sample = _train_sample(np.random.default_rng(seed), n, index)
    index = _to_gpu(index)
    if not index.is_trained:
        index.train(ws.embeddings_at(sample))
    path.parent.mkdir(exist_ok=True)
    save_index(index, path)
    return path


def fill_index_shard(ws: Workspace, shard: int, shards: int, *, device: int | None = None) -> Path:
    """Add the keys of one shard's chunk range to a copy of the trained index; skipped when on disk."""
    path = shard_files(ws.root, shards)[shard]
    if path.exists():
        return path
    index = _to_gpu(faiss.read_index(str(Path(ws.root) / SHARD_DIR / "trained.faiss")), device)
    start, end = shard_range(ws, shard, shards)
    block = int(ws.manifest["settings"]["block_size"])
    for a in range(start, end, block):
        index.add(ws.embeddings(a, min(a + block, end)))  # (b, E)
    save_index(index, path)
    return path


def finish_index_shards(
    ws: Workspace,
    factory: str = "auto",
    *,
    shards: int,
    k: int = 2,
    seed: int = 0,
    target_recall: float = 0.95,
) -> dict:
    """Tune nprobe and measure recall@k on the shards searched together; returns the stage info."""
    n = ws.split_range("train")[1]
    name = auto_factory(n) if factory == "auto" else factory
    rng = np.random.default_rng(seed)
    trained = faiss.read_index(str(Path(ws.root) / SHARD_DIR / "trained.faiss"))
    sample = _train_sample(rng, n, trained)  # advances rng exactly as build_index does
    files = shard_files(ws.root, shards)
    info = _measured_info(ws, load_index(files), _ivf(trained), name, n, sample, rng, k, target_recall)
    log.info("index %s in %d shards: recall@%d vs exact = %.4f (nprobe %s)",
             name, shards, k, info["recall"], info["nprobe"])
    return {**info, "shards": shards, "files": [str(p.relative_to(ws.root)) for p in files]}


# --------------------------------------------------------------------------------------- a growing database

def add_keys(ws: Workspace, index: faiss.Index, start: int, end: int) -> faiss.Index:
    """Add the keys of chunks [start, end) to a CPU index under their global ids; returns the index holding them.

    IVF indexes (OPQ-wrapped or not) keep an id per key. Any other index (Flat) numbers its keys by position,
    and the new chunks do not follow the train chunks (validation and test lie between): it is rebuilt once
    inside an `IndexIDMap`, from the same float32 keys under the same ids (the chunk ranges it holds,
    `ws.database_ranges()`), before the new keys go in.
    """
    block = int(ws.manifest["settings"]["block_size"])

    def add(target: faiss.Index, first: int, n: int) -> None:
        for a in range(first, n, block):
            target.add_with_ids(ws.embeddings(a, min(a + block, n)), np.arange(a, min(a + block, n)))  # (b, E)

    if _ivf(index) is None and not isinstance(index, faiss.IndexIDMap):
        held = ws.database_ranges()
        if sum(b - a for a, b in held) != index.ntotal:
            raise RetroError(f"the index of {ws.root} holds {index.ntotal} keys, not its database's; rebuild it")
        empty = faiss.clone_index(index)
        empty.reset()
        index = faiss.IndexIDMap(empty)
        for a, b in held:
            add(index, a, b)
    add(index, start, end)
    return index


def measure_recall(
    ws: Workspace,
    index: faiss.Index,
    ranges: Sequence[tuple[int, int]],
    *,
    k: int,
    nprobe: int | None,
    seed: int | Sequence[int],
) -> float:
    """recall@k of an index holding the chunk `ranges`, at its `nprobe` (not re-tuned), measured as `build_index`
    measures it: against exact search, on a seeded sample of every chunk of the workspace."""
    if nprobe is not None:
        set_nprobe(index, nprobe)
    return _tune_and_measure(ws, index, None, np.random.default_rng(seed), k, 1.0, ranges)[1]


def save_index(index: faiss.Index, path: Path) -> Path:
    with atomic_save(path) as tmp:
        try:
            faiss.write_index(_to_cpu(index), str(tmp))
        except RuntimeError as e:  # faiss reports a failed write (a full disk) as a RuntimeError with strerror's text
            if os.strerror(errno.ENOSPC) in str(e):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
            raise
    return path


def index_files(root: str | Path, info: dict) -> list[Path]:
    """The file(s) of a workspace's index stage: `index.faiss`, or its shards."""
    if info.get("shards", 1) > 1:
        return [Path(root) / f for f in info["files"]]
    return [Path(root) / "index.faiss"]


def load_index(
    path: "str | Path | Sequence[str | Path]", nprobe: int | None = None, device: int | None = None
) -> faiss.Index:
    """Read an index file (or a list of shard files -> `IndexShards`), set nprobe, move it to the GPU(s)
    when faiss GPU is present (`device`: the GPU of a single-file index, default 0)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if len(paths) == 1:
        index = faiss.read_index(str(paths[0]))
    else:
        parts = [faiss.read_index(str(p)) for p in paths]
        index = faiss.IndexShards(parts[0].d, True, True)  # threaded, successive ids = global chunk ids
        for part in parts:
            index.add_shard(part)
    if nprobe is not None:
        set_nprobe(index, nprobe)
    return _to_gpu(index, device)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """nprobe of an IVF index, wrapped (OPQ, IDMap) or sharded (`IndexShards`), CPU or GPU."""
    space = faiss.GpuParameterSpace() if "Gpu" in type(index).__name__ else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", nprobe)


def search_excluding(
    index: faiss.Index,
    xq: np.ndarray,
    k: int,
    drop: Callable[[np.ndarray, np.ndarray], np.ndarray],
    extra: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest ids and distances of xq (Q, E), skipping ids where `drop(rows, ids)` is True.

    Searches k + extra; rows left with fewer than k survivors are searched again with 4x more, up to the
    index size; what is still missing is -1 (distance inf). Never fails when fewer than k survive.
    """
    ids = np.full((len(xq), k), -1, dtype=np.int64)  # (Q, K)
    dist = np.full((len(xq), k), np.inf, dtype=np.float32)  # (Q, K)
    rows, width = np.arange(len(xq)), k + extra
    while len(rows):
        width = min(width, index.ntotal)
        d, i = index.search(xq[rows], width)  # (q, width)
        keep = (i >= 0) & ~drop(rows, i)  # (q, width)
        enough = (keep.sum(1) >= k) | (width >= index.ntotal)
        for r, d_row, i_row, keep_row in zip(rows[enough], d[enough], i[enough], keep[enough]):
            found = i_row[keep_row][:k]
            ids[r, : len(found)], dist[r, : len(found)] = found, d_row[keep_row][:k]
        rows, width = rows[~enough], width * 4
    return ids, dist


class Retrieved(NamedTuple):
    ids: np.ndarray  # (Q, K) int64 global chunk ids, -1 = none
    distances: np.ndarray  # (Q, K) float32 squared L2, inf = none
    tokens: np.ndarray  # (Q, K, R) int64 [neighbour, continuation] tokens, -1 = no token
    doc_ids: np.ndarray  # (Q, K) int64 document of each neighbour, -1 = none
    doc_names: list[list[str | None]]  # (Q, K) document names, None = none
    doc_sources: list[list[str | None]]  # (Q, K) "train", or the name of the addition the document came with


class RetroIndex:
    """Live lookups in a built workspace, for generation and evaluation (one call per chunk batch).

    `RetroIndex(workspace, chunk_len, bert=None)` keeps the quick-start signature; the workspace and
    index open on the first `search`, so the object may be made before the build, and open again when the
    workspace's manifest has changed since (documents were added: `retro_lit.additions`), so a search always
    sees the database on disk. `bert` defaults to the workspace's embedder, on `device`.
    """

    def __init__(
        self,
        workspace: str | Path,
        chunk_len: int,
        bert: BERTForChunkEmbeddings | None = None,
        device: str = "auto",
    ):
        self.workspace = Path(workspace)
        self.chunk_len = chunk_len
        self.bert = bert
        self.device = device
        self._ws = self._index = self._tokenizer = self._stamp = None

    def search(
        self, queries: list[str] | torch.Tensor, k: int = 2, exclude_docs: Sequence[int] | None = None
    ) -> Retrieved:
        """Neighbours of Q query chunks (texts, or LM tokens (Q, M) with -1/pad ignored), skipping docs."""
        if k <= 0:
            raise RetroError(f"k must be > 0, got {k}")
        ws, index = self._open()
        if isinstance(queries, torch.Tensor):
            queries = [
                self._tokenizer.decode([t for t in row.tolist() if t >= 0 and t != ws.pad_id]) for row in queries
            ]
        xq = self.bert(list(queries)).numpy()  # (Q, E)
        excluded = np.asarray(sorted(exclude_docs or []), dtype=np.int64)
        ids, dist = search_excluding(
            index, xq, k, lambda rows, i: np.isin(ws.chunk_doc[np.maximum(i, 0)], excluded)
        )
        docs = np.where(ids >= 0, ws.chunk_doc[np.maximum(ids, 0)], -1).astype(np.int64)  # (Q, K)
        rows = [[ws.documents[d] if d >= 0 else None for d in row] for row in docs.tolist()]
        names = [[r["name"] if r else None for r in row] for row in rows]
        sources = [[r.get("addition", r["split"]) if r else None for r in row] for row in rows]
        return Retrieved(ids, dist, ws.neighbor_tokens(ids), docs, names, sources)

    def _open(self):
        try:  # a manifest written since (each write is a new file) means a changed workspace
            stat = os.stat(self.workspace / MANIFEST)
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        if self._ws is None or stamp != self._stamp:
            ws = open_workspace(self.workspace)
            if ws.chunk_len != self.chunk_len:
                raise RetroError(
                    f"workspace {self.workspace} has chunk_len {ws.chunk_len}, not {self.chunk_len}"
                )
            info = ws.manifest["stages"].get("index", {})
            if not info.get("done"):
                raise RetroError(f"workspace {self.workspace} has no index yet: run build-db first")
            self._index = load_index(index_files(ws.root, info), info.get("nprobe"))
            self.bert = self.bert or workspace_embedder(ws.manifest, self.device)
            self._tokenizer = workspace_tokenizer(ws)
            self._ws, self._stamp = ws, stamp
        return self._ws, self._index


def _ivf(index: faiss.Index) -> "faiss.IndexIVF | None":
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _exact_kth_distance(
    ws: Workspace, xq: np.ndarray, queries: np.ndarray, k: int, ranges: Sequence[tuple[int, int]]
) -> np.ndarray:
    """The exact k-th nearest distance of each query to the chunks of `ranges` (its own chunk excluded),
    scanning blocks."""
    best = np.full((len(xq), k + 1), np.inf, dtype=np.float32)  # (Q, k+1)
    best_ids = np.full((len(xq), k + 1), -1, dtype=np.int64)  # (Q, k+1)
    block = int(ws.manifest["settings"]["block_size"])
    for start, end in ((a, min(a + block, n)) for first, n in ranges for a in range(first, n, block)):
        keys = ws.embeddings(start, end)  # (b, E)
        d, i = faiss.knn(xq, keys, min(k + 1, len(keys)))  # (Q, <=k+1)
        d, i = np.concatenate([best, d], 1), np.concatenate([best_ids, i + start], 1)
        order = np.argsort(d, axis=1, kind="stable")[:, : k + 1]
        best, best_ids = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    best[best_ids == queries[:, None]] = np.inf  # drop the query's own chunk
    return np.sort(best, axis=1)[:, k - 1]  # (Q,)


def _recall(
    ws: Workspace, index: faiss.Index, xq: np.ndarray, queries: np.ndarray, kth: np.ndarray, k: int
) -> float:
    """Fraction of the k results (own chunk dropped) whose true distance is within the exact k-th."""
    ids, _ = search_excluding(index, xq, k, lambda rows, i: i == queries[rows, None], extra=1)  # (Q, k)
    keys = ws.embeddings_at(np.maximum(ids, 0).reshape(-1)).reshape(*ids.shape, -1)  # (Q, k, E)
    d = np.where(ids >= 0, ((xq[:, None, :] - keys) ** 2).sum(-1), np.inf)  # (Q, k)
    return float(np.mean(d <= kth[:, None] * (1 + 1e-3) + 1e-6))


def _gpu_count() -> int:
    if hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available():
        return faiss.get_num_gpus()
    return 0


def _to_gpu(index: faiss.Index, device: int | None = None) -> faiss.Index:
    """faiss GPU when present, else `index` unchanged (CPU fallback). An `IndexShards` puts shard s on GPU
    (device + s) % n_gpus; one index goes to GPU `device` (default 0)."""
    n_gpus = _gpu_count()
    if n_gpus == 0:
        return index
    if isinstance(index, faiss.IndexShards):
        out = faiss.IndexShards(index.d, True, True)
        for s in range(index.count()):
            sub = faiss.downcast_index(index.at(s))
            out.add_shard(
                faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), ((device or 0) + s) % n_gpus, sub)
            )
        return out
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), (device or 0) % n_gpus, index)


def to_all_gpus(index: faiss.Index, shard: bool = True) -> faiss.Index:
    """One index over every GPU: split across them (`shard=True`, for a database larger than one GPU) or
    replicated (faster search when it fits); the CPU index is returned when faiss has no GPU."""
    if _gpu_count() == 0:
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.shard = shard
    return faiss.index_cpu_to_all_gpus(index, co=options)


def _to_cpu(index: faiss.Index) -> faiss.Index:
    return (
        faiss.index_gpu_to_cpu(index)
        if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__
        else index
    )
