"""Is a workspace's every file the file its manifest describes? Each damaged file is named with the unit to redo.

Two depths (`check_files`):

| check          | reads                          | finds                                                       |
|----------------|--------------------------------|-------------------------------------------------------------|
| fast (default) | each file's size and .npy header | a missing or truncated file, an array of the wrong shape    |
| `hashes=True`  | every byte (sha256)            | any altered byte too                                        |

The fast check runs before every build resume, addition, training run, evaluation and generation
(`checked_workspace`): a damaged workspace is refused in one line that names its files and the repair,
`retro-lit build-db --workspace W --repair` (`retro_lit.repair`), which redoes only the damaged units.
A workspace written before sizes and hashes were recorded (no `manifest["files"]`) gets the header checks only.
"""

import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from retro_lit.workspace import (RetroError, Workspace, embedded_end, neighbors_key, open_workspace,
                                 read_manifest, stage_files)

CHUNK_STAGE = "chunks"


class Damage(NamedTuple):
    file: str  # relative to the workspace
    problem: str  # "missing", "truncated (100 of 3,200 bytes)", "altered (sha256 differs)", ...
    unit: tuple  # what to redo: ("chunks",), ("embeddings", block), ("index",), (neighbour set key, split)


def check_files(root: str | Path, manifest: dict, *, hashes: bool = False) -> list[Damage]:
    """Every damaged file of the workspace's finished stages, in build order (see the module docstring)."""
    root = Path(root)
    records = manifest.get("files", {})
    damage = []
    for name, unit, shape in _expected_files(manifest):
        problem = _file_problem(root / name, records.get(name), shape, hashes)
        if problem:
            damage.append(Damage(name, problem, unit))
    return damage


def unfinished_addition(manifest: dict) -> dict | None:
    """The manifest's unfinished addition (it rewrites files that its rerun finishes), if any."""
    return next((a for a in manifest.get("additions", []) if not a["done"]), None)


def check_workspace(root: str | Path, manifest: dict | None = None) -> None:
    """The fast check of a workspace: `RetroError` naming its damaged files and the repair, when it has any.
    A workspace with an unfinished addition is left to that addition's rerun."""
    manifest = manifest if manifest is not None else read_manifest(root)
    if manifest is None or unfinished_addition(manifest) is not None:
        return
    damage = check_files(root, manifest)
    if damage:
        raise RetroError(damage_message(root, damage))


def checked_workspace(root: str | Path) -> Workspace:
    """`open_workspace`, refused when the fast check finds a damaged file."""
    ws = open_workspace(root)
    check_workspace(ws.root, ws.manifest)
    return ws


def damage_message(root: str | Path, damage: list[Damage]) -> str:
    listed = ", ".join(f"{d.file} {d.problem}" for d in damage[:5]) + (f" and {len(damage) - 5} more"
                                                                       if len(damage) > 5 else "")
    return (f"workspace {root} is damaged: {listed}; run `retro-lit build-db --workspace {root} --repair` to redo "
            f"{describe_units(damage)} (or restore the files from a copy)")


def describe_units(damage: list[Damage]) -> str:
    """'the chunks stage, embedding blocks 1, 3, the index' for the units of `damage`."""
    units = list(dict.fromkeys(d.unit for d in damage))
    blocks = [str(u[1]) for u in units if u[0] == "embeddings"]
    words = ["the chunks stage"] if (CHUNK_STAGE,) in units else []
    words += [f"embedding block{'s' if len(blocks) > 1 else ''} {', '.join(blocks)}"] if blocks else []
    words += ["the index"] if ("index",) in units else []
    words += [f"{u[0]} {u[1]}" for u in units if u[0].startswith("neighbors/")]
    return ", ".join(words)


# ----------------------------------------------------------------------------- what should be there

def _expected_files(manifest: dict) -> list[tuple[str, tuple, tuple | None]]:
    """(file, unit, shape of its .npy array or None) for every file of the finished stages, in build order."""
    stages = manifest["stages"]
    files = []
    if stages.get("chunks", {}).get("done"):
        rows, docs = _chunk_rows(manifest)
        shapes = {"chunks.npy": (rows, int(manifest["settings"]["chunk_len"])), "chunk_doc.npy": (rows,),
                  "doc_offsets.npy": (docs + 1,)}
        files += [(name, (CHUNK_STAGE,), shapes.get(name)) for name in stage_files(manifest, "chunks")]
    if stages.get("embeddings", {}).get("done"):
        size, end, dim = int(manifest["settings"]["block_size"]), embedded_end(manifest), stages["embeddings"]["dim"]
        files += [(name, ("embeddings", b), (min(size, end - b * size), dim))
                  for b, name in enumerate(stage_files(manifest, "embeddings"))]
    if stages.get("index", {}).get("done"):
        files += [(name, ("index",), None) for name in stage_files(manifest, "index")]
    for key, info in sorted(stages.items()):
        if key.startswith("neighbors/") and info.get("done") and key == neighbors_key(info["k"], info["seq_len"]):
            for name in stage_files(manifest, key):
                split = Path(name).stem  # neighbors/k{K}_t{T}/<split>.npy
                first, end = manifest["splits"][split]
                files.append((name, (key, split), (end - first, int(info["k"]))))
    return files


def _chunk_rows(manifest: dict) -> tuple[int, int]:
    """(chunks, documents) the chunk files hold: the build's and those of each addition whose chunks step is done."""
    rows, docs = int(manifest["counts"]["chunks"]), int(manifest["counts"]["documents"])
    for entry in manifest.get("additions", []):
        if entry["stages"].get("chunks", {}).get("done"):
            rows, docs = entry["range"][1], entry["first_doc"] + entry["documents"]
    return rows, docs


def _file_problem(path: Path, record: dict | None, shape: tuple | None, hashes: bool) -> str | None:
    """What is wrong with one file (None: nothing found)."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if record is not None and size != record["size"]:
        return f"{'truncated' if size < record['size'] else 'grown'} ({size:,} of {record['size']:,} bytes)"
    if shape is not None:
        problem = _npy_problem(path, size, shape)
        if problem:
            return problem
    if hashes and record is not None:
        with open(path, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != record["sha256"]:
                return "altered (sha256 differs from the manifest's)"
    return None


def _npy_problem(path: Path, size: int, shape: tuple) -> str | None:
    """A .npy file whose header is unreadable, whose shape is not `shape`, or whose data is cut short."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            header_shape, _, dtype = read_header[version](f)
            offset = f.tell()
    except (KeyError, ValueError, OSError, SyntaxError) as e:
        return f"unreadable ({' '.join(str(e).split())[:80]})"
    if tuple(header_shape) != tuple(shape):
        return f"holds an array of shape {tuple(header_shape)}, not {tuple(shape)}"
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if size != expected:
        return f"{'truncated' if size < expected else 'grown'} ({size:,} of {expected:,} bytes)"
    return None
