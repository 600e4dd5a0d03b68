"""Reliability: checkpoints load weights-only (a malicious pickle never runs, and is one `error:` line)."""

import random
import re
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from retro_lit.build import build_workspace
from retro_lit.commands import main
from retro_lit.embedder import BERTForChunkEmbeddings
from retro_lit.generate import load_checkpoint
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


@pytest.mark.parametrize("command", ["fit", "fit last", "validate", "evaluate", "generate"])
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
