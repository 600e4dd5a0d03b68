"""Knowledge update without retraining: documents added to a built workspace's retrieval database.

RETRO's database can change after training (paper §4): a trained model reads text it never trained on when
that text is retrieved. `add_documents(workspace, corpus)` tokenizes new documents with the workspace's LM
tokenizer (never retrained), chunks them, embeds them with the workspace's embedder and adds their keys to its
trained faiss index. The added documents are a new part of the database, not a split: training sequences and
their precomputed neighbours stay as they were (unless `recompute_neighbors`), and live retrieval
(`RetroIndex`, `retro-lit generate`, `retro-lit evaluate`) searches them at once.

Where the added chunks live: after the test split, one contiguous chunk range per addition, in the same
files as the build's chunks, so that global chunk ids, `chunk_doc`, the continuation rule (chunk id + 1 in
the same document) and the embedding blocks mean what they always meant, and every reader works unchanged:

| step         | writes                                                                                  |
|--------------|-----------------------------------------------------------------------------------------|
| `chunks`     | chunks.npy, chunk_doc.npy, doc_offsets.npy, documents.jsonl: the old rows copied as they |
|              | are, then the new documents (each file as *.tmp, renamed once all four are written)      |
| `embeddings` | embeddings/block_*.npy of the new chunks; the short last block keeps its keys bit for bit |
| `index`      | index.faiss: the new keys under their chunk ids (`retro_lit.index.add_keys`), recall@k    |
|              | measured again over the grown database                                                   |
| `neighbors`  | only with `recompute_neighbors`: every neighbors/k*_t* set searched again                |

An addition rewrites the chunk files and the index file whole (one atomic rename each; the index file is
rewritten by faiss at any size anyway) and embeds only the new chunks. Each step is recorded in the
addition's manifest entry (`manifest["additions"]`) only after its files are in place, and each step can run
again from what a killed run left: the chunk files are rebuilt from the first `first_chunk` rows of the
present ones, a block holding all its keys is skipped, and an index that already holds the new keys is kept.
So a killed addition, run again, ends with the same bytes as one that was never interrupted.

Refused before anything is written (`RetroError`, the workspace stays byte for byte as it was): a workspace
without a built index or with a sharded one, another embedder, chunk length or tokenizer (naming the
setting), a corpus already added or the one the workspace was built from, a name already used, and a new
addition while another one is unfinished.
"""

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from retro_lit.chunks import tokenize_to_file, write_chunk_files
from retro_lit.corpus import corpus_fingerprint, iter_documents
from retro_lit.embedder import BERTForChunkEmbeddings, recorded_precision, workspace_embedder
from retro_lit.embeddings import embed_chunks, keys_on_disk
from retro_lit.index import add_keys, measure_recall, save_index
from retro_lit.neighbors import compute_neighbors
from retro_lit.tokenizer import workspace_tokenizer
from retro_lit.verify import check_workspace
from retro_lit.workspace import (FORMAT_VERSION, RetroError, block_name, check_settings, holding_lock, open_workspace,
                                 read_manifest, record_files, scratch_file, stage_files, write_manifest)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- checks

def _built_manifest(root: Path) -> dict:
    """The manifest of a workspace whose chunks, keys and (unsharded) index are built, else `RetroError`."""
    manifest = read_manifest(root) if root.is_dir() else None
    stages = manifest["stages"] if manifest else {}
    if not all(stages.get(stage, {}).get("done") for stage in ("chunks", "embeddings", "index")):
        raise RetroError(f"workspace {root} has no built index: run `retro-lit build-db --workspace {root}` first")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RetroError(f"workspace {root} has format_version {manifest.get('format_version')}, not {FORMAT_VERSION}")
    if stages["index"].get("shards", 1) > 1:
        raise RetroError(f"workspace {root} has a sharded index ({stages['index']['shards']} shards): adding "
                         "documents to it is not supported; build it with --index_shards 1")
    return manifest


def _pending_entry(root: Path, manifest: dict, corpus, fingerprint: str, name: str) -> dict:
    """The unfinished addition of this corpus to resume, or a new entry (not yet in the manifest); refuses
    a corpus added before, the build's own corpus, a taken name and a second unfinished addition."""
    if fingerprint == manifest["settings"]["corpus_fingerprint"]:
        raise RetroError(f"{corpus} is the corpus workspace {root} was built from: its documents are there already")
    for entry in manifest.get("additions", []):
        if entry["fingerprint"] == fingerprint:
            if not entry["done"]:
                return entry
            raise RetroError(f"{corpus} was added to workspace {root} already, as {entry['name']!r} "
                             f"(fingerprint {fingerprint})")
        if not entry["done"]:
            raise RetroError(f"the addition {entry['name']!r} of {entry['corpus']} to workspace {root} is unfinished: "
                             "rerun it to finish it first")
        if entry["name"] == name:
            raise RetroError(f"workspace {root} has an addition named {name!r} already; pass another --name")
    return {"name": name, "corpus": str(corpus), "fingerprint": fingerprint, "stages": {}, "done": False}


# ----------------------------------------------------------------------------- the steps

@dataclass
class _Addition:
    """What the steps of one addition read: where, from what, with which embedder."""

    root: Path
    corpus: str | Path
    embedder: BERTForChunkEmbeddings
    quiet: bool
    on_block: Callable[[Path], None] | None


def _add_chunks(job: _Addition, manifest: dict, entry: dict) -> dict:
    """Tokenize and chunk the new documents after the first_chunk rows of the present chunk files."""
    ws = open_workspace(job.root)
    lm_tokenizer = workspace_tokenizer(ws)
    names = [doc.name for doc in iter_documents(job.corpus)]  # (a bad file fails here, before any write)
    dtype = np.dtype(manifest["counts"]["dtype"])
    with scratch_file(job.root / "tokens.bin.tmp") as tmp_tokens:
        n_tokens = tokenize_to_file(job.corpus, lm_tokenizer, tmp_tokens, dtype, np.zeros(len(names), bool), job.quiet)
        if n_tokens.sum() == 0:
            raise RetroError(f"the documents of {job.corpus} have no tokens")
        if "first_chunk" not in entry:  # a new addition: it starts where the database ends now
            entry.update(first_chunk=len(ws.chunks), first_doc=len(ws.doc_offsets) - 1)
            manifest.setdefault("additions", []).append(entry)
            write_manifest(job.root, manifest)
        rows = [{"name": doc, "split": "added", "addition": entry["name"], "n_tokens": int(n)}
                for doc, n in zip(names, n_tokens)]
        first, first_doc = entry["first_chunk"], entry["first_doc"]
        paths, doc_offsets = write_chunk_files(
            job.root, tmp_tokens, n_tokens, np.arange(len(names)), rows, chunk_len=ws.chunk_len, dtype=dtype,
            pad_id=ws.pad_id, keep=(first, first_doc),
        )
    end = int(doc_offsets[-1])
    entry.update(range=[first, end], documents=len(names), chunks=end - first, tokens=int(n_tokens.sum()))
    return {"files": [p.name for p in paths]}


def _add_embeddings(job: _Addition, manifest: dict, entry: dict) -> dict:
    """Embed the new chunks' blocks (the short last block of the old chunks keeps its keys)."""
    first, end = entry["range"]
    size = int(manifest["settings"]["block_size"])
    blocks = range(first // size, math.ceil(end / size))
    done = sum(keys_on_disk(job.root, b) for b in blocks) - (first - blocks[0] * size)  # new keys already there
    start = time.perf_counter()
    embed_chunks(job.root, job.embedder, blocks, quiet=job.quiet, on_block=job.on_block)
    seconds = time.perf_counter() - start
    return {"blocks": [blocks[0], blocks[-1] + 1], "chunks_per_s": round((end - first - done) / max(seconds, 1e-9), 1)}


def _add_to_index(job: _Addition, manifest: dict, entry: dict) -> dict:
    """Add the new keys to the trained index (unless a killed run saved it already), measure recall@k again."""
    ws = open_workspace(job.root)
    first, end = entry["range"]
    held = ws.database_ranges()  # the train split and the earlier additions
    path = job.root / "index.faiss"
    index = faiss.read_index(str(path))
    before = sum(b - a for a, b in held)
    if index.ntotal == before:
        index = add_keys(ws, index, first, end)
        save_index(index, path)
    elif index.ntotal != before + end - first:
        raise RetroError(f"{path} holds {index.ntotal} keys, neither the {before} of the database before the "
                         f"addition {entry['name']!r} nor the {before + end - first} after it; rebuild the workspace")
    info = manifest["stages"]["index"]
    seed = [int(manifest["settings"]["seed"]), len(held)]  # one query sample per database size
    recall = measure_recall(ws, index, [*held, (first, end)], k=info["k"], nprobe=info.get("nprobe"), seed=seed)
    log.info("index %s: %d keys after adding %r, recall@%d vs exact = %.4f", info["factory"], index.ntotal,
             entry["name"], info["k"], recall)
    return {"ntotal": int(index.ntotal), "k": info["k"], "nprobe": info.get("nprobe"), "recall": round(recall, 4)}


def _recompute_neighbors(job: _Addition, manifest: dict, entry: dict) -> dict:
    """Search every precomputed neighbour set (neighbors/k*_t*) again over the grown database."""
    ws = open_workspace(job.root)  # this addition's index step is recorded: its chunks are in the database
    nprobe = manifest["stages"]["index"].get("nprobe")
    keys = sorted(key for key, info in manifest["stages"].items() if key.startswith("neighbors/") and info.get("done"))
    for key in keys:
        info = manifest["stages"][key]
        start = time.perf_counter()
        _, fresh = compute_neighbors(ws, info["k"], info["seq_len"], nprobe=nprobe, quiet=job.quiet)
        manifest["stages"][key] = {**fresh, "done": True, "seconds": round(time.perf_counter() - start, 3)}
    return {"sets": keys}


def _step_files(manifest: dict, step: str, info: dict) -> list[str]:
    """The files an addition's step rewrote (their records in the manifest are renewed)."""
    if step == "embeddings":
        return [block_name(b) for b in range(*info["blocks"])]
    if step == "neighbors":
        return [name for key in info["sets"] for name in stage_files(manifest, key)]
    return stage_files(manifest, step)  # the chunk files, the index


ADDITION_STEPS: tuple[tuple[str, Callable[[_Addition, dict, dict], dict]], ...] = (
    ("chunks", _add_chunks),
    ("embeddings", _add_embeddings),
    ("index", _add_to_index),
    ("neighbors", _recompute_neighbors),
)


# ----------------------------------------------------------------------------- the addition

def rewrite_added_chunks(root: str | Path, manifest: dict, quiet: bool = True) -> None:
    """Append each finished addition's documents to chunk files that hold the build's only (rebuilt by
    `retro_lit.repair`), in order, as their chunks steps did; each addition's corpus must be unchanged."""
    for entry in manifest.get("additions", []):
        if entry["stages"].get("chunks", {}).get("done"):
            if corpus_fingerprint(entry["corpus"]) != entry["fingerprint"]:
                raise RetroError(f"{entry['corpus']}, added to workspace {root} as {entry['name']!r}, has changed since: "
                                 "the chunk files cannot be rebuilt from it; restore them from a copy")
            _add_chunks(_Addition(Path(root), entry["corpus"], None, quiet, None), manifest, entry)


@holding_lock  # one writer at a time: a build or an addition running there refuses this one
def add_documents(
    workspace: str | Path,
    corpus: str | Path,
    embedder: BERTForChunkEmbeddings | None = None,
    *,
    name: str | None = None,
    recompute_neighbors: bool = False,
    quiet: bool = True,
    on_block: Callable[[Path], None] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> Path:
    """Add the documents of `corpus` (any source `retro_lit.corpus` reads) to a built workspace; returns its path.

    embedder: the workspace's embedder (refused when it has another name); None loads it, on CUDA when present.
    name: the addition's name in the manifest and in `--show_retrieval` (default: the corpus's file name).
    recompute_neighbors: search the precomputed neighbours of every split again, over the grown database
        (training sequences would then retrieve the added documents too).
    on_block(path) after each embedding block is written, on_step(step) after a step's files are in place
        and before the manifest records it: progress reports and fault injection in tests.
    Rerunning an unfinished addition (same corpus) resumes it; see the module docstring for the steps.
    """
    root = Path(workspace)
    manifest = _built_manifest(root)
    check_workspace(root, manifest)  # (an unfinished addition's rerun is let through: it rewrites its files)
    settings = manifest["settings"]
    if embedder is not None:  # keys of another model or precision would not be comparable
        check_settings(root, {**settings, "embedder_precision": recorded_precision(manifest)},
                       {"embedder": embedder.name, "embedder_precision": embedder.precision})
    fingerprint = corpus_fingerprint(corpus)  # (a missing corpus fails here)
    entry = _pending_entry(root, manifest, corpus, fingerprint, name or Path(str(corpus)).name)
    embedder = embedder or workspace_embedder(manifest)
    if embedder.dim != int(manifest["stages"]["embeddings"]["dim"]):
        raise RetroError(f"workspace {root} has keys of width {manifest['stages']['embeddings']['dim']}, "
                         f"not {embedder.dim}: use the embedder it was built with")
    entry["recompute_neighbors"] = bool(entry.get("recompute_neighbors") or recompute_neighbors)
    job, start = _Addition(root, corpus, embedder, quiet, on_block), time.perf_counter()
    for step, run in ADDITION_STEPS:
        if entry["stages"].get(step, {}).get("done") or (step == "neighbors" and not entry["recompute_neighbors"]):
            continue
        step_start = time.perf_counter()
        info = run(job, manifest, entry)
        if on_step is not None:
            on_step(step)
        entry["stages"][step] = {**info, "done": True, "seconds": round(time.perf_counter() - step_start, 3)}
        record_files(root, manifest, _step_files(manifest, step, info))
        write_manifest(root, manifest)
    entry.update(done=True, seconds=round(time.perf_counter() - start, 3))
    write_manifest(root, manifest)
    log.info("%s", format_addition(entry))
    return root


def add_documents_command(
    workspace: str,
    corpus: str,
    name: str | None = None,
    embedder: str | None = None,
    chunk_size: int | None = None,
    tokenizer: str | None = None,
    device: str = "auto",
    batch_size: int = 128,
    recompute_neighbors: bool = False,
    quiet: bool = False,
) -> None:
    """Add documents to a built workspace's retrieval database, for a trained model to use without retraining.

    The new documents are tokenized with the workspace's tokenizer, chunked, embedded with its embedder and added
    to its faiss index; live retrieval (`retro-lit generate`, `retro-lit evaluate`) searches them at once, and
    `--show_retrieval` names the addition a neighbour came with. Training sequences and their precomputed
    neighbours are unchanged unless `--recompute_neighbors`. Rerun the same command to finish an interrupted
    addition.

    Args:
        workspace: A workspace built by `retro-lit build-db` (its index included).
        corpus: The documents to add: a text file, a folder, a JSONL or Parquet file with a `text` column, a saved
            Hugging Face dataset, or a built-in corpus name.
        name: The addition's name in the manifest and in `--show_retrieval` (default: the corpus's file name).
        embedder: Must be the workspace's embedder if given; the default uses it.
        chunk_size: Must be the workspace's chunk length (M) if given; the default uses it.
        tokenizer: Must be the workspace's tokenizer spec if given; the default uses it (never retrained).
        device: Where the embedder runs: auto, cpu or cuda[:i].
        batch_size: Chunks per embedder forward pass.
        recompute_neighbors: Also search the precomputed neighbours of every split again over the grown database,
            so that training sequences retrieve the added documents too.
        quiet: No progress bars.

    Raises:
        RetroError: The workspace is not built or has a sharded index; a setting differs from the workspace's; the
            corpus is missing, unreadable, already added or the one the workspace was built from; the name is
            taken; another addition is unfinished. The workspace is left as it was.
    """
    root = Path(workspace)
    manifest = _built_manifest(root)
    wanted = {"embedder": embedder, "chunk_len": chunk_size, "tokenizer": tokenizer}
    check_settings(root, manifest["settings"], {key: value for key, value in wanted.items() if value is not None})
    bert = workspace_embedder(manifest, device, batch_size=batch_size)
    add_documents(root, corpus, bert, name=name, recompute_neighbors=recompute_neighbors, quiet=quiet)


def format_addition(entry: dict) -> str:
    """One line on a finished addition: what went in, how fast it was embedded, the index's recall now."""
    index = entry["stages"]["index"]
    first, end = entry["range"]
    return (f"added {entry['documents']} documents of {entry['corpus']} as {entry['name']!r}: chunks {first}-{end - 1}"
            f" ({entry['chunks']} chunks, {entry['tokens']} tokens); embedding "
            f"{entry['stages']['embeddings']['chunks_per_s']} chunks/s; index {index['ntotal']} keys, "
            f"recall@{index['k']} {index['recall']}")
