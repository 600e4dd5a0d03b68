"""Reliability: checkpoints load weights-only (a malicious pickle never runs, and is one `error:` line); a huge
document streams through the chunks stage in about one copy of itself (the same files as if read whole)."""

import os
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from retro_lit.build import build_workspace
from retro_lit.commands import main
from retro_lit.corpus import MinHash, iter_documents, text_segments
from retro_lit.checkpoint import load_checkpoint
from retro_lit.embedder import BERTForChunkEmbeddings
from retro_lit.malloc import allocator_env
from retro_lit.tokenizer import byte_tokenizer, train_bpe
from retro_lit.workspace import RetroError

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
M, T = 4, 16


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not fight other jobs on a busy box (conftest restores it)."""
    torch.set_num_threads(1)


def tiny_embedder(root: Path) -> BERTForChunkEmbeddings:
    """A random 1-layer BERT over a 26-letter vocabulary."""
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]) + "\n")
    bert = BertModel(BertConfig(vocab_size=31, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=64))
    return BERTForChunkEmbeddings("tiny-bert", "cpu", model=bert, tokenizer=BertTokenizerFast(str(vocab)),
                                  dtype=torch.float32)


def fit_args(tiny: dict, *extra: str) -> list[str]:
    """`fit`/`validate` arguments for a tiny model on the built workspace."""
    return ["--config", TINY, f"--data.workspace={tiny['workspace']}", "--data.corpus=null", "--data.tokenizer=bytes",
            f"--data.chunk_size={M}", f"--data.seq_len={T}", "--data.batch_size=2", "--model.config.d_model=16",
            "--model.config.head_dim=8", "--model.config.d_ff=32", "--trainer.precision=32-true",
            f"--trainer.default_root_dir={tiny['run']}", *extra]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A bytes-tokenized workspace (M = 4, T = 16) and the checkpoint of a one-step `fit` on it."""
    root = tmp_path_factory.mktemp("reliability")
    rng = random.Random(0)
    words = "king queen crown sword storm river ghost letter".split()
    (root / "corpus.txt").write_text("\n\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 20)))
                                                   for _ in range(14)))
    build_workspace(root / "ws", root / "corpus.txt", tokenizer="bytes", chunk_len=M, embedder=tiny_embedder(root),
                    index="Flat", num_neighbors=2, seq_len=T, split=(0.7, 0.15, 0.15), quiet=True)
    tiny = {"workspace": str(root / "ws"), "run": str(root / "run")}
    assert main(["fit", *fit_args(tiny, "--trainer.max_steps=1")]) == 0
    return {**tiny, "ckpt": root / "run" / "checkpoints" / "last.ckpt"}


class Malicious:
    """Unpickled, it creates the file `marker` (as any code could run instead)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint shaped like Lightning's, its hyperparameters holding a `Malicious` object."""
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6", "hyper_parameters": {"lr": Malicious(marker)}},
               path)
    return path


def test_a_fit_checkpoint_holds_only_what_a_weights_only_load_reads(tiny):
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tiny["ckpt"]) == []  # no safe globals to register
    model, data_hparams = load_checkpoint(tiny["ckpt"], torch.device("cpu"))
    state = torch.load(tiny["ckpt"], weights_only=True)["state_dict"]
    assert model.chunk_len == M and data_hparams["seq_len"] == T
    assert all(torch.equal(v, state[f"model.{k}"]) for k, v in model.state_dict().items())


def test_the_malicious_checkpoint_would_run_if_unpickled(tmp_path):
    marker = tmp_path / "ran"
    torch.load(malicious_checkpoint(tmp_path / "evil.ckpt", marker), weights_only=False)
    assert marker.exists()  # so the refusals below are what keeps it from running


@pytest.mark.parametrize("command", ["fit", pytest.param("fit last", marks=pytest.mark.filterwarnings(
    "ignore:Checkpoint directory .* exists and is not empty")), "validate", "evaluate", "generate"])
def test_a_malicious_checkpoint_is_refused_in_one_line_and_never_runs(tiny, command, tmp_path, capsys):
    marker = tmp_path / "ran"
    if command == "fit last":  # the Trainer finds and loads it (`--ckpt_path last` is no file the CLI reads)
        (tmp_path / "run" / "checkpoints").mkdir(parents=True)
        ckpt = malicious_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", marker)
        argv = ["fit", *fit_args({**tiny, "run": tmp_path / "run"}, "--ckpt_path=last", "--trainer.max_steps=2")]
    else:
        ckpt = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
        argv = {
            "fit": ["fit", *fit_args(tiny, f"--ckpt_path={ckpt}")],
            "validate": ["validate", *fit_args(tiny, f"--ckpt_path={ckpt}")],
            "evaluate": ["evaluate", "--ckpt_path", str(ckpt), "--workspace", tiny["workspace"], "--device", "cpu"],
            "generate": ["generate", "--ckpt_path", str(ckpt), "--workspace", tiny["workspace"], "--prompt", "the king",
                         "--device", "cpu"],
        }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(
        rf"error: checkpoint {re.escape(str(ckpt))} holds a Python object \(\w+\.open\) beyond tensors and plain data; "
        r"refusing to load it \(unpickling it could run arbitrary code\)", errors[0]), err
    assert "Traceback" not in err and "weights_only" not in err
    assert not marker.exists()


def test_a_checkpoint_with_a_corrupt_pickle_is_one_error_too(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "ok.ckpt")
    with zipfile.ZipFile(tmp_path / "ok.ckpt") as ok, zipfile.ZipFile(tmp_path / "bad.ckpt", "w") as bad:
        for name in ok.namelist():
            bad.writestr(name, b"\x80\x02garbage" if name.endswith("data.pkl") else ok.read(name))
    with pytest.raises(RetroError, match=r"is not what a weights-only load reads \(Unsupported operand \d+\); refusing"):
        load_checkpoint(tmp_path / "bad.ckpt", torch.device("cpu"))


def not_a_retro_checkpoint(kind: str, path: Path, tiny: dict) -> tuple[Path, str]:
    """A file given as a checkpoint that is none of ours, and what its one error line must say."""
    if kind == "two bytes":
        path.write_bytes(b"hi")
        return path, r"is not a PyTorch checkpoint \(not a PyTorch zip archive\)"
    if kind == "a folder":
        path.mkdir()
        return path, r"no checkpoint at .* \(a folder\)"
    if kind == "a plain tensor file":
        torch.save({"weights": torch.zeros(2)}, path)
        return path, "without a state_dict, not a Lightning checkpoint"
    if kind == "another project's Lightning checkpoint":
        torch.save({"state_dict": {"layer.weight": torch.zeros(2, 2)}, "hyper_parameters": {"hidden": 8, "lr": 0.1},
                    "pytorch-lightning_version": "2.5.0"}, path)
        return path, r"a Lightning checkpoint of another model: its hyper-parameters \(hidden, lr\)"
    checkpoint = torch.load(tiny["ckpt"], weights_only=True)  # ours, with a weight of another shape
    name = next(k for k in checkpoint["state_dict"] if k.endswith("token_emb.weight"))
    checkpoint["state_dict"][name] = torch.zeros(3, 3)
    torch.save(checkpoint, path)
    return path, "its weights do not fit its own model config"


@pytest.mark.parametrize("kind", ["two bytes", "a folder", "a plain tensor file", "another project's Lightning checkpoint",
                                  "mismatched weights"])
@pytest.mark.parametrize("command", ["evaluate", "generate", "diagnose"])
def test_a_file_that_is_no_retro_lit_checkpoint_is_one_error_line(tiny, kind, command, tmp_path, capsys):
    ckpt, says = not_a_retro_checkpoint(kind, tmp_path / "given.ckpt", tiny)
    argv = {"evaluate": ["evaluate", "--workspace", tiny["workspace"], "--device", "cpu"],
            "generate": ["generate", "--workspace", tiny["workspace"], "--prompt", "the king", "--device", "cpu"],
            "diagnose": ["diagnose", "--workspace", tiny["workspace"], "--device", "cpu"]}[command]
    assert main([*argv, "--ckpt_path", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: checkpoint {ckpt}" if kind != "a folder" else "error: no"), err
    assert re.search(says, err), err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- huge documents

WORDS = ["king", "queen", "naïve", "日本語", "😀", "don't", "it's", "x_y", "12", "3.5", "--", "(a)", "é"]
SEPARATORS = [" ", " ", " ", "  ", "\n", "\n", "\t", "\r\n", " \n", "\n\n", "\u00a0", "\u2028", "\n \n\n", "\n\n\n",
              "\n\t\n\n  ", "\n\n\n\n"]


def mixed_text(n_words: int, seed: int = 0) -> str:
    """Words of several scripts and kinds between every kind of whitespace, blank-line runs (breaks) among them."""
    rng = random.Random(seed)
    return "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(n_words))


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_a_text_file_read_in_blocks_splits_into_the_documents_of_the_whole_text(tmp_path, monkeypatch, block):
    text = "  \n\n\n" + mixed_text(3000) + "\n\n\n  \n"
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr("retro_lit.corpus._READ_BLOCK", block)  # block cuts inside characters and breaks
    docs = list(iter_documents(path))
    parts = [part for part in re.split(r"\n[ \t\r\f\v]*\n[ \t\r\f\v]*\n\s*", text) if part.strip()]
    assert [(d.name, d.text) for d in docs] == [(f"corpus.txt#{i}", part) for i, part in enumerate(parts)]
    assert len(parts) > 100 and max(len(d.pieces) for d in docs) > 1


def test_a_file_read_in_blocks_reports_its_faults_as_a_whole_read_did(tmp_path, monkeypatch):
    monkeypatch.setattr("retro_lit.corpus._READ_BLOCK", 5)
    raw = mixed_text(200).encode()
    cases = {"nul": raw + b"\x00 tail", "latin1": raw + "café".encode("latin-1") + raw, "cut": raw + "é".encode()[:1],
             "blank": b" \n\t\r\n " * 20}
    for name, data in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "doc.txt").write_bytes(data)
    with pytest.raises(RetroError, match=r"^binary file \(NUL bytes\), not text: "):
        list(iter_documents(tmp_path / "nul"))
    for name in ("latin1", "cut"):
        try:
            cases[name].decode("utf-8")
        except UnicodeDecodeError as e:
            expected = f"not UTF-8 text ({e.reason} at byte {e.start}): {tmp_path / name / 'doc.txt'}"
        with pytest.raises(RetroError) as error:
            list(iter_documents(tmp_path / name))
        assert str(error.value) == expected
    with pytest.raises(RetroError, match=r"^empty file: "):
        list(iter_documents(tmp_path / "blank"))


@pytest.mark.parametrize("size", [1, 40, 1000])
def test_segments_keep_the_words_minhash_and_byte_level_tokens_of_the_whole_text(size):
    text = mixed_text(4000, seed=1).replace("\n\n\n", "\n")
    pieces = [text[i:i + 37] for i in range(0, len(text), 37)]  # read blocks cut anywhere, even inside a word
    segments = list(text_segments(pieces, size))
    assert "".join(segments) == text and len(segments) > len(text) // max(size, 200)
    assert [w for s in segments for w in s.split()] == text.split()
    assert np.array_equal(MinHash()(segments), MinHash()(text))
    bpe = train_bpe([text], "bpe:400")
    assert train_bpe(segments, "bpe:400").backend.to_str() == bpe.backend.to_str()  # the same merges
    for tokenizer in (bpe, byte_tokenizer()):
        assert [t for ids in tokenizer.encode_batch(segments) for t in ids] == tokenizer.encode(text)


def test_minhash_of_few_words_or_none_is_unchanged():
    """The signature of a text shorter than one n-gram, or without words, is that of one n-gram of them all."""
    def whole(text):  # the signature as it was computed before it streamed
        minhash = MinHash()
        words = np.array([minhash.vocab.setdefault(w, len(minhash.vocab)) for w in text.split()] or [0], np.uint64)
        shingle = np.zeros(1, dtype=np.uint64)
        for j in range(len(words)):
            shingle = shingle * np.uint64(1_000_003) + words[j:j + 1]
        return ((shingle[:, None] * minhash.a + minhash.b) >> np.uint64(16)).min(axis=0)

    for text in ("", "   ", "one", "a b c d e f g h i j k l"):
        assert np.array_equal(MinHash()(text), whole(text))
        assert np.array_equal(MinHash()([text[:3], text[3:]]), whole(text))


# the chunks stage of a small corpus (the baseline: imports, tokenizer, first allocations), then of a big one, in a
# process of its own with build-db's allocator; prints both peak RSS in bytes
PEAK_RSS = """
import resource, sys
from pathlib import Path
from retro_lit.chunks import chunk_corpus
peaks = []
for corpus in sys.argv[2:]:
    Path(corpus + ".ws").mkdir()
    chunk_corpus(corpus + ".ws", corpus, tokenizer=sys.argv[1], chunk_len=16)
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(*peaks)
"""
MiB = 1 << 20


def huge_document_corpus(path: Path, size: int, lines: bool) -> int:
    """A corpus of one document of `size` ASCII characters (one line, or lines of ~80) and five small ones;
    returns the big document's size."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    with open(path, "w") as f:
        written = 0
        while written < size:
            line = " ".join(rng.choices(words, k=12))
            f.write(line + ("\n" if lines else " "))
            written += len(line) + 1
        for _ in range(5):
            f.write("\n\n\n" + " ".join(rng.choices(words, k=100)))
    return written


def peak_rss_above_baseline(tmp_path: Path, size: int, tokenizer: str, lines: bool = False) -> tuple[int, int]:
    """(peak RSS of the chunks stage of a corpus with one `size`-character document minus that of a small corpus,
    the document's size)."""
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    huge_document_corpus(small, 20_000, lines)
    doc_size = huge_document_corpus(big, size, lines)
    env = allocator_env(streaming=True)
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, tokenizer, str(small), str(big)], env=env, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    baseline, peak = map(int, out.split())
    return peak - baseline, doc_size


# Stated in retro_lit.chunks: peak RSS <= that of a small build + ~1x the largest document + tokenizing 1 Mi chars
BOUND_CONSTANT, BOUND_PER_CHAR = 200 * MiB, 1.5


def test_a_10_mb_one_line_document_is_held_about_once(tmp_path):
    above, size = peak_rss_above_baseline(tmp_path, 10_000_000, "bytes")
    assert above <= BOUND_CONSTANT + BOUND_PER_CHAR * size, f"{above / MiB:.0f} MiB above the baseline"


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer,lines", [("bytes", False), ("bytes", True), ("bpe:1024", False)])
def test_a_100_mb_document_is_held_about_once(tmp_path, tokenizer, lines):
    above, size = peak_rss_above_baseline(tmp_path, 100_000_000, tokenizer, lines)
    assert above <= BOUND_CONSTANT + BOUND_PER_CHAR * size, f"{above / MiB:.0f} MiB above the baseline"
