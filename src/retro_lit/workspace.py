"""The on-disk retrieval database (a workspace folder): its files, its manifest, read access.

This is the bottom layer: every stage (`chunks`, `embeddings`, `index`, `neighbors`) and `build` sit on
it, and it imports nothing of retro_lit. Layout of a workspace:

    manifest.json                    settings, splits, counts, and each stage once done
    chunks.npy                       (n_chunks, M) uint16/uint32 LM tokens, pad after a document's end
    chunk_doc.npy                    (n_chunks,) int32 document of each chunk
    doc_offsets.npy                  (n_docs + 1,) int64 first chunk of each document
    documents.jsonl                  {"doc", "name", "split", "n_tokens"} per document, chunk order
    tokenizer.json                   the LM tokenizer (a trained BPE, or a copy of the given one)
    embeddings/block_XXXXX.npy       (block_size, E) float16 frozen-BERT keys
    index.faiss | index_shards/      the faiss index over the database: the train chunks and the added ones
    neighbors/k{K}_t{T}/<split>.npy  (n_chunks_of_split, K) int64 precomputed neighbours, -1 = none

`manifest["files"]` records the size and sha256 of every file a finished stage or addition step wrote (hashed as
the stage ends, from the page cache), so that `retro_lit.verify` can tell a damaged file from a good one.

Splits are contiguous chunk ranges, train first; documents added after the build (`retro_lit.additions`) follow
the test split, one range per addition (`manifest["additions"]`). Every file is written through `atomic_save` (a `*.tmp`
then `os.replace`), and a stage is recorded as done in the manifest only after its files are in place,
so an interrupted build leaves finished files and temporary ones, never a half-written file under its name.
A build or an addition holds `.lock` (`workspace_lock`) while it writes, so two never write at once.
"""

import contextlib
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # Windows: no flock, so builds of one workspace are not guarded against each other
    fcntl = None

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
STAGES = ("chunks", "embeddings", "index", "neighbors")
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"validation": "val", "valid": "val", "fit": "train"}


class RetroError(ValueError):
    """Bad user input (a setting, a file, a corpus): one line that says what is wrong and how to fix it.

    Every `retro-lit` command reports it as one `error: ...` line and exits with status 2.
    """


@contextlib.contextmanager
def atomic_save(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; it replaces `path` when the block ends without error
    (and is removed when it raises), so `path` is always either the old file or the complete new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException as e:
        begun = tmp.exists()
        tmp.unlink(missing_ok=True)
        # a failed write (a full disk) names no file: name this one, the last begun of a group written together
        if begun and isinstance(e, OSError) and e.errno is not None and e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def scratch_file(path: str | Path) -> Iterator[Path]:
    """Yield `path` (a `*.tmp` scratch file) and remove it when the block ends, whether it ran to its end or not:
    a failed stage (a full disk) must not leave a corpus-sized file behind."""
    try:
        yield Path(path)
    finally:
        Path(path).unlink(missing_ok=True)


@contextlib.contextmanager
def workspace_lock(root: str | Path) -> Iterator[None]:
    """Hold `<root>/.lock` while writing the workspace; a `RetroError` naming the holder's pid if another process
    holds it. It is an flock, which the kernel drops when its holder dies (even by SIGKILL), so a killed build
    never blocks the next one. The holding process may take it again (it is reentrant); where it cannot be taken
    (no fcntl, a folder that cannot be written) the build goes on unlocked, and its writes say what is wrong."""
    root, made = Path(root), not Path(root).exists()
    fd = _take_lock(root) if fcntl is not None else None
    if fd is None:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        (root / LOCK).unlink(missing_ok=True)  # before the unlock, so a process that locks afterwards makes a new one
        os.close(fd)
        if made:  # a build refused before its first write leaves no empty folder
            with contextlib.suppress(OSError):
                root.rmdir()


def _take_lock(root: Path) -> int | None:
    """The locked file descriptor of `root/.lock`; None when this process holds it already or none can be made."""
    path = root / LOCK
    while True:
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if holder == str(os.getpid()):
                return None
            raise RetroError(f"workspace {root} is in use: process {holder or '?'} holds {path}; wait for it to end, "
                             "or stop it (a stopped build resumes when rerun)") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
        os.close(fd)  # its holder removed it while we waited to lock it: lock the new one


def holding_lock(fn: Callable) -> Callable:
    """Decorate `fn(workspace, ...)` to run holding the workspace's lock (`workspace_lock`)."""

    @functools.wraps(fn)
    def locked(workspace, *args, **kwargs):
        with workspace_lock(workspace):
            return fn(workspace, *args, **kwargs)

    return locked


def save_npy(path: str | Path, array: np.ndarray) -> Path:
    with atomic_save(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    return Path(path)


def read_manifest(root: str | Path) -> dict | None:
    """The workspace's manifest, None when it has none; a damaged one (cut short, not JSON) is a RetroError."""
    path = Path(root) / MANIFEST
    if not path.exists():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RetroError(f"{path} is damaged ({e}); restore it from a copy, or build into an empty --workspace") \
            from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
        raise RetroError(f"{path} is not a retro_lit manifest; restore it, or build into an empty --workspace")
    return manifest


def write_manifest(root: str | Path, manifest: dict) -> Path:
    path = Path(root) / MANIFEST
    with atomic_save(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def check_settings(root: str | Path, built: dict, wanted: dict) -> None:
    """Raise `RetroError` naming the first setting of `wanted` that differs from the workspace's `built` ones."""
    for key, value in wanted.items():
        old = built.get(key)
        if old != value:
            raise RetroError(
                f"workspace {root} was built with {key}={old!r}, not {value!r}; "
                "use another --workspace or the same setting"
            )


def mark_stage(root: str | Path, name: str, info: dict) -> Path:
    """Record stage `name` as done with `info` (its files must already be on disk)."""
    return finish_stage(root, read_manifest(root), name, info)


def finish_stage(root: str | Path, manifest: dict, name: str, info: dict) -> Path:
    """Record stage `name` of `manifest` as done with `info`, with the sizes and hashes of its files, and write it."""
    manifest["stages"][name] = {**info, "done": True}
    record_files(root, manifest, stage_files(manifest, name))
    return write_manifest(root, manifest)


def file_record(path: str | Path) -> dict:
    """{"size", "sha256"} of a file."""
    with open(path, "rb") as f:
        return {"size": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def record_files(root: str | Path, manifest: dict, files: list[str]) -> None:
    """Record in `manifest["files"]` the size and hash of each file (paths relative to the workspace)."""
    manifest.setdefault("files", {}).update({name: file_record(Path(root) / name) for name in files})


def embedded_end(manifest: dict) -> int:
    """End of the chunk ids whose keys are in the embedding blocks: the build's, then each embedded addition's."""
    ends = [a["range"][1] for a in manifest.get("additions", []) if a["stages"].get("embeddings", {}).get("done")]
    return max([int(manifest["counts"]["chunks"]), *ends])


def stage_files(manifest: dict, name: str) -> list[str]:
    """The files (relative paths) that stage `name` ("chunks", "embeddings", "index", "neighbors/k*_t*") holds now."""
    info = manifest["stages"][name]
    if name == "embeddings":
        blocks = math.ceil(embedded_end(manifest) / int(manifest["settings"]["block_size"]))
        return [block_name(b) for b in range(blocks)]
    if name == "index":
        return list(info["files"]) if info.get("shards", 1) > 1 else ["index.faiss"]
    return list(info["files"])  # the chunk files, a neighbour set's split files


def stage_done(root: str | Path, name: str) -> bool:
    manifest = read_manifest(root)
    return bool(manifest and manifest["stages"].get(name, {}).get("done"))


def block_name(block: int) -> str:
    return f"embeddings/block_{block:05d}.npy"


def block_path(root: str | Path, block: int) -> Path:
    return Path(root) / block_name(block)


def neighbors_key(k: int, seq_len: int) -> str:
    """The manifest stage name (and folder under the workspace) of the neighbours for (K, T)."""
    return f"neighbors/k{k}_t{seq_len}"


def neighbors_path(root: str | Path, split: str, k: int, seq_len: int) -> Path:
    return Path(root) / neighbors_key(k, seq_len) / f"{split}.npy"


class Workspace:
    """Read-only view of a built workspace; arrays are memmaps opened on first use."""

    def __init__(self, root: str | Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest
        self.chunk_len = int(manifest["settings"]["chunk_len"])  # M

    @cached_property
    def chunks(self) -> np.ndarray:
        return np.load(self.root / "chunks.npy", mmap_mode="r")  # (n_chunks, M) uint16/uint32

    @cached_property
    def chunk_doc(self) -> np.ndarray:
        return np.load(self.root / "chunk_doc.npy", mmap_mode="r")  # (n_chunks,) int32

    @cached_property
    def doc_offsets(self) -> np.ndarray:
        return np.load(self.root / "doc_offsets.npy", mmap_mode="r")  # (n_docs + 1,) int64

    @cached_property
    def documents(self) -> list[dict]:
        """`documents.jsonl` rows: {"doc", "name", "split", "n_tokens"}, in chunk order."""
        with open(self.root / "documents.jsonl", encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    @property
    def pad_id(self) -> int:
        return int(self.manifest["counts"]["pad_id"])

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["stages"]["embeddings"]["dim"])

    @property
    def additions(self) -> list[dict]:
        """The additions whose keys are in the index (`manifest["additions"]` entries past their index step),
        in order: each {"name", "corpus", "fingerprint", "documents", "chunks", "range": [first, end), ...}."""
        return [a for a in self.manifest.get("additions", []) if a["stages"].get("index", {}).get("done")]

    def database_ranges(self) -> list[tuple[int, int]]:
        """[first, end) chunk ranges of the retrieval database: the train split, then each addition's range."""
        return [self.split_range("train"), *((int(a), int(b)) for a, b in (x["range"] for x in self.additions))]

    def split_range(self, split: str) -> tuple[int, int]:
        """[first_chunk, end_chunk) of a split ('train', 'val' (or 'validation'), 'test')."""
        first, end = self.manifest["splits"][SPLIT_ALIASES.get(split, split)]
        return int(first), int(end)

    def neighbors(self, split: str, k: int, seq_len: int) -> np.ndarray:
        """(n_chunks_of_split, K) int64 global chunk ids, -1 = none."""
        path = neighbors_path(self.root, SPLIT_ALIASES.get(split, split), k, seq_len)
        if not path.exists():
            raise RetroError(f"no neighbours for k={k}, seq_len={seq_len} in {self.root}; run build-db with them")
        return np.load(path, mmap_mode="r")

    def neighbor_tokens(self, ids: np.ndarray) -> np.ndarray:
        """Chunk ids (...) -> [chunk, continuation] tokens (..., R = 2M) int64, -1 where there is no token.

        The continuation is the next chunk of the same document (else -1s); padding inside chunks -> -1.
        """
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)  # (N,)
        valid = flat >= 0
        safe = np.where(valid, flat, 0)
        nxt = np.minimum(safe + 1, len(self.chunks) - 1)
        has_next = valid & (safe + 1 < len(self.chunks)) & (self.chunk_doc[nxt] == self.chunk_doc[safe])
        tokens = np.concatenate([self.chunks[safe], self.chunks[nxt]], axis=1).astype(np.int64)  # (N, 2M)
        tokens[~valid] = -1
        tokens[~has_next, self.chunk_len :] = -1
        tokens[tokens == self.pad_id] = -1
        return tokens.reshape(*ids.shape, 2 * self.chunk_len)  # (..., R)

    def embeddings(self, start: int, end: int) -> np.ndarray:
        """Keys of chunks [start, end) -> (end - start, E) float32, read from the embedding blocks."""
        size = int(self.manifest["settings"]["block_size"])
        parts = []
        last_block = (end - 1) // size if end > start else start // size - 1  # empty range: no block
        for block in range(start // size, last_block + 1):
            keys = np.load(block_path(self.root, block), mmap_mode="r")
            lo, hi = max(start - block * size, 0), min(end - block * size, size)
            parts.append(np.asarray(keys[lo:hi], dtype=np.float32))
        return np.concatenate(parts) if parts else np.zeros((0, self.embedding_dim), np.float32)

    def embeddings_at(self, ids: np.ndarray) -> np.ndarray:
        """Keys of arbitrary chunk ids (sorted or not) -> (len(ids), E) float32."""
        ids = np.asarray(ids, dtype=np.int64)
        size = int(self.manifest["settings"]["block_size"])
        out = np.empty((len(ids), self.embedding_dim), dtype=np.float32)
        for block in np.unique(ids // size):
            rows = np.flatnonzero(ids // size == block)
            keys = np.load(block_path(self.root, int(block)), mmap_mode="r")
            out[rows] = keys[ids[rows] - block * size]
        return out


def open_workspace(path: str | Path) -> Workspace:
    """Open a built workspace read-only; fails clearly when it is missing or its chunks are not built."""
    manifest = read_manifest(path)
    if manifest is None or not manifest["stages"].get("chunks", {}).get("done"):
        raise RetroError(f"no built workspace at {path}: run `retro-lit build-db --workspace {path}` first")
    return Workspace(path, manifest)
