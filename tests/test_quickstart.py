"""The original quick-start API: the example script end to end, and clean refusals of bad input."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retro_lit import build_database, build_dataset
from helpers import make_corpus, snapshot
from retro_lit.workspace import RetroError

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_example_trains_and_checkpoints(tmp_path, tiny_corpus):
    text = tiny_corpus("text.txt", n_docs=10, words_per_doc=700)
    env = {**os.environ, "RETRO_LIT_QUICKSTART_SMALL": "1"}  # the same script, with a model that trains in seconds
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), str(text), "6"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = tmp_path / "workspace" / "runs" / "lightning_logs"
    assert list(runs.glob("version_*/checkpoints/*.ckpt")), "no checkpoint written"
    with open(next(runs.glob("version_*/metrics.csv"))) as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    # from ln 8192, where a batch's loss hardly varies: a real drop, not noise (~0.25 seen with the small model)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.15


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("qs")
    text = make_corpus(root / "text.txt", n_docs=6, words_per_doc=300)
    build_database(root / "ws", text, bert=tiny_bert, chunk_len=16)
    return root, text


@pytest.mark.parametrize("case", ["missing", "empty", "chunk_len", "other_chunk_len"])
def test_bad_input_is_refused_and_leaves_the_workspace_intact(built, tiny_bert, case, tmp_path):
    root, text = built
    before = snapshot(root / "ws")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    calls = {
        "missing": lambda: build_database(root / "ws", tmp_path / "nope.txt", bert=tiny_bert, chunk_len=16),
        "empty": lambda: build_database(root / "ws", empty, bert=tiny_bert, chunk_len=16),
        "chunk_len": lambda: build_database(root / "ws", text, bert=tiny_bert, chunk_len=0),
        "other_chunk_len": lambda: build_dataset(root / "ws", text, chunk_len=8),
    }
    with pytest.raises((RetroError, FileNotFoundError)) as err:
        calls[case]()
    assert "\n" not in str(err.value)
    assert snapshot(root / "ws") == before


def test_build_dataset_returns_the_vocabulary_size(built, tiny_bert):
    root, text = built
    from retro_lit import RetroIndex

    assert build_dataset(root / "ws", text, chunk_len=16, chunks_per_sample=4,
                         index=RetroIndex(root / "ws", 16, bert=tiny_bert)) == 8192
