"""`build-db --verify` and `--repair`: check every byte of a workspace, recompute a sample, redo damaged units.

The build is deterministic (seeded splits and index training, the embedder's batches recorded in the
manifest), so a unit recomputed from the files it was made from has the bytes it had:

| damaged file                | unit redone                   | from                                             |
|-----------------------------|-------------------------------|--------------------------------------------------|
| chunks/documents/tokenizer  | the chunks stage, then each   | the corpus and each added corpus (fingerprints   |
|                             | addition's chunks step        | checked); the other stages stand, as they read   |
|                             |                               | the same chunks                                  |
| embeddings/block_XXXXX.npy  | that block                    | its chunks, in the pieces the build and each     |
|                             |                               | addition embedded                                |
| index.faiss / a shard       | the index (then each          | the keys                                         |
|                             | addition's keys) / that shard |                                                  |
| neighbors/k*_t*/<split>.npy | that split of that set        | the index and the keys                           |

Megatron-style spot validation (`verify_sample` F): a seeded random fraction F of the embedding blocks and of
the neighbour query parts is recomputed and compared bit for bit with the files; it holds on the machine
and thread count that built them (float reductions in BERT may round differently elsewhere).
"""

import logging
import math
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from retro_lit.additions import rewrite_added_chunks
from retro_lit.build import Build, run_chunks
from retro_lit.corpus import corpus_fingerprint
from retro_lit.embedder import BERTForChunkEmbeddings
from retro_lit.embeddings import chunk_keys, embed_chunks
from retro_lit.index import add_keys, build_index, fill_index_shard, index_files, load_index, save_index, \
    train_index_shards
from retro_lit.neighbors import compute_neighbors, neighbor_parts, search_part
from retro_lit.verify import CHUNK_STAGE, Damage, check_files, damage_message, describe_units, unfinished_addition
from retro_lit.workspace import (RetroError, Workspace, block_path, embedded_end, holding_lock, read_manifest,
                                 record_files, stage_files, write_manifest)

log = logging.getLogger(__name__)

EmbedderFactory = Callable[[dict], BERTForChunkEmbeddings]  # the embeddings stage's info -> the embedder to use


def _finished_manifest(root: Path) -> dict:
    manifest = read_manifest(root)
    if manifest is None:
        raise RetroError(f"no workspace at {root}: nothing to verify or repair")
    entry = unfinished_addition(manifest)
    if entry is not None:
        raise RetroError(f"the addition {entry['name']!r} to workspace {root} is unfinished: rerun "
                         f"`retro-lit add-docs --workspace {root} --corpus {entry['corpus']}` first")
    return manifest


def verify_workspace(root: str | Path, embedder: EmbedderFactory | None = None, *, sample: float = 0.0,
                     seed: int = 0) -> dict:
    """Check every file's size, header and sha256, and recompute a fraction `sample` of the embedding blocks and
    neighbour parts (needs `embedder`). Returns {"files", "damaged": [Damage], "blocks_sampled", "parts_sampled",
    "mismatched": [description]}."""
    root = Path(root)
    manifest = _finished_manifest(root)
    damage = check_files(root, manifest, hashes=True)
    report = {"workspace": str(root), "files": len(manifest.get("files", {})), "damaged": damage,
              "blocks_sampled": 0, "parts_sampled": 0, "mismatched": []}
    if sample > 0 and not damage:
        ws, rng = Workspace(root, manifest), np.random.default_rng(seed)
        if manifest["stages"].get("embeddings", {}).get("done"):
            _sample_blocks(ws, embedder(manifest["stages"]["embeddings"]), sample, rng, report)
        _sample_parts(ws, sample, rng, report)
    return report


def _sample_blocks(ws: Workspace, embedder: BERTForChunkEmbeddings, fraction: float, rng: np.random.Generator,
                   report: dict) -> None:
    size = int(ws.manifest["settings"]["block_size"])
    n_blocks = math.ceil(embedded_end(ws.manifest) / size)
    for block in sorted(rng.choice(n_blocks, size=max(1, round(fraction * n_blocks)), replace=False)):
        keys = np.concatenate([chunk_keys(ws, embedder, a, b) for a, b in _block_pieces(ws.manifest, int(block))])
        if not np.array_equal(keys.view(np.uint16), np.load(block_path(ws.root, block)).view(np.uint16)):
            report["mismatched"].append(f"embedding block {block} (recomputed keys differ)")
        report["blocks_sampled"] += 1


def _sample_parts(ws: Workspace, fraction: float, rng: np.random.Generator, report: dict) -> None:
    parts = neighbor_parts(ws)
    for key, info in sorted(_neighbor_sets(ws.manifest).items()):
        if info.get("additions", 0) != len(ws.additions):
            continue  # searched before later additions grew the index: the index it searched is gone
        index = load_index(index_files(ws.root, ws.manifest["stages"]["index"]), ws.manifest["stages"]["index"].get(
            "nprobe"))
        for j in sorted(rng.choice(len(parts), size=max(1, round(fraction * len(parts))), replace=False)):
            split, a, b = parts[j]
            found = search_part(ws, index, split, a, b, info["k"], info["seq_len"])
            if not np.array_equal(found, ws.neighbors(split, info["k"], info["seq_len"])[a:b]):
                report["mismatched"].append(f"{key} {split} rows {a}-{b} (searched again, other neighbours)")
            report["parts_sampled"] += 1


def format_verify(report: dict) -> str:
    root = report["workspace"]
    if report["damaged"]:
        return damage_message(root, report["damaged"])
    line = f"workspace {root}: {report['files']} files, sizes and sha256 as recorded"
    if report["blocks_sampled"] or report["parts_sampled"]:
        line += (f"; recomputed {report['blocks_sampled']} embedding blocks and {report['parts_sampled']} "
                 "neighbour parts: " + ("; ".join(report["mismatched"]) or "bit for bit the same"))
    return line


# ----------------------------------------------------------------------------- repair

@holding_lock
def repair_workspace(root: str | Path, embedder: EmbedderFactory, *, quiet: bool = True) -> list[Damage]:
    """Redo exactly the damaged units of a workspace (the table in the module docstring); returns the damage found.
    Each unit redone is checked against its recorded sha256 afterwards."""
    root = Path(root)
    manifest = _finished_manifest(root)
    damage = check_files(root, manifest, hashes=True)
    if not damage:
        return []
    log.info("repairing %s: %s", root, describe_units(damage))
    units = list(dict.fromkeys(d.unit for d in damage))
    rewritten = []
    if (CHUNK_STAGE,) in units:
        rewritten += _redo_chunks(root, manifest, quiet)
    blocks = [u[1] for u in units if u[0] == "embeddings"]
    if blocks:
        rewritten += _redo_blocks(root, manifest, embedder(manifest["stages"]["embeddings"]), blocks)
    if ("index",) in units:
        rewritten += _redo_index(root, manifest, [d.file for d in damage if d.unit == ("index",)])
    for key in dict.fromkeys(u[0] for u in units if u[0].startswith("neighbors/")):
        rewritten += _redo_neighbors(root, manifest, key, [u[1] for u in units if u[0] == key])
    differ = [d for d in check_files(root, manifest, hashes=True) if d.file in rewritten]
    if any(d.unit == (CHUNK_STAGE,) for d in differ):
        raise RetroError(f"the chunk files of {root} were rebuilt but differ from the recorded ones (the tokenizer or "
                         "corpus reader changed?): the other stages no longer match them; rebuild the workspace")
    for d in differ:  # a recomputation on another machine or thread count may round differently: keep the new bytes
        log.warning("%s was redone but differs from its recorded bytes (another machine or thread count?); "
                    "its record is renewed", d.file)
    record_files(root, manifest, [d.file for d in differ])
    write_manifest(root, manifest)
    log.info("repaired %s: redid %s", root, ", ".join(rewritten))
    return damage


def _redo_chunks(root: Path, manifest: dict, quiet: bool) -> list[str]:
    settings = manifest["settings"]
    if corpus_fingerprint(settings["corpus"]) != settings["corpus_fingerprint"]:
        raise RetroError(f"{settings['corpus']}, the corpus of workspace {root}, has changed since the build: the chunk "
                         "files cannot be rebuilt from it; restore them from a copy")
    build = Build(root, settings["corpus"], None, settings["tokenizer"], int(settings["chunk_len"]),
                  split=tuple(settings["split"]), seed=int(settings["seed"]),
                  dedup_threshold=settings["dedup_threshold"], quiet=quiet)
    run_chunks(build, dict(manifest))  # (its splits and counts are the manifest's already)
    rewrite_added_chunks(root, manifest, quiet)
    return stage_files(manifest, "chunks")


def _block_pieces(manifest: dict, block: int) -> list[tuple[int, int]]:
    """The chunk ranges in which block `block` was embedded: up to the build's end, then up to each addition's."""
    size = int(manifest["settings"]["block_size"])
    lo, hi = block * size, min((block + 1) * size, embedded_end(manifest))
    ends = [int(manifest["counts"]["chunks"])] + [a["range"][1] for a in manifest.get("additions", [])
                                                  if a["stages"].get("embeddings", {}).get("done")]
    cuts = [lo] + [e for e in ends if lo < e < hi] + [hi]
    return list(zip(cuts, cuts[1:]))


def _redo_blocks(root: Path, manifest: dict, embedder: BERTForChunkEmbeddings, blocks: list[int]) -> list[str]:
    for block in blocks:
        block_path(root, block).unlink(missing_ok=True)
        for _, end in _block_pieces(manifest, block):  # the block grows piece by piece, as it was made
            embed_chunks(root, embedder, range(block, block + 1), end=end)
    return [block_path(root, b).relative_to(root).as_posix() for b in blocks]


def _redo_index(root: Path, manifest: dict, damaged: list[str]) -> list[str]:
    settings, info = manifest["settings"], manifest["stages"]["index"]
    if info.get("shards", 1) > 1:
        ws = Workspace(root, manifest)
        for name in damaged:
            (root / name).unlink(missing_ok=True)
        train_index_shards(ws, settings["index"], shards=info["shards"], seed=int(settings["seed"]))
        for shard, name in enumerate(info["files"]):
            if name in damaged:
                fill_index_shard(ws, shard, info["shards"])
        return damaged
    additions = [a for a in manifest.get("additions", []) if a["stages"].get("index", {}).get("done")]
    build_index(Workspace(root, {**manifest, "additions": []}), settings["index"], k=int(info["k"]),
                seed=int(settings["seed"]))
    path = root / "index.faiss"
    for i, entry in enumerate(additions):  # each addition's keys, into the index as it was before it
        before = Workspace(root, {**manifest, "additions": additions[:i]})
        save_index(add_keys(before, faiss.read_index(str(path)), *entry["range"]), path)
    return ["index.faiss"]


def _redo_neighbors(root: Path, manifest: dict, key: str, splits: list[str]) -> list[str]:
    ws, info = Workspace(root, manifest), manifest["stages"][key]
    if info.get("additions", 0) != len(ws.additions):
        raise RetroError(f"{key} of workspace {root} was searched before later additions grew the index, so it cannot "
                         f"be searched again as it was; run `retro-lit add-docs` with --recompute_neighbors next time, "
                         "or restore it from a copy")
    paths, _ = compute_neighbors(ws, info["k"], info["seq_len"], nprobe=manifest["stages"]["index"].get("nprobe"),
                                 splits=splits)
    return [p.relative_to(root).as_posix() for p in paths]


def _neighbor_sets(manifest: dict) -> dict:
    return {key: info for key, info in manifest["stages"].items() if key.startswith("neighbors/") and info.get("done")}
