"""`retro-lit demo` end to end on a tiny corpus and config; a second run reuses database and checkpoint."""
from pathlib import Path

from retro_lit.commands import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end_and_reuses_the_database(tmp_path, tiny_corpus, capsys):
    corpus = tiny_corpus(n_docs=12, words_per_doc=400)
    argv = ["--fit_config", str(ROOT / "configs" / "tiny.yaml"), "--corpus", str(corpus), "--workspace",
            str(tmp_path / "ws"), "--run_dir", str(tmp_path / "run"), "--max_steps", "4", "--eval_tokens", "3000",
            "--prompt", "The king"]
    assert main(["demo", *argv]) == 0
    out = capsys.readouterr().out
    assert "retrieval off" in out and "retrieval on" in out and "| baseline |" in out  # the bpb table
    assert "random neighbours" in out and "ON vs baseline:" in out and "chunks with r(C) > " in out
    assert (tmp_path / "run-baseline" / "checkpoints" / "last.ckpt").exists()  # the same config without CCA
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert list((tmp_path / "run").glob("eval_test*.png"))
    assert "| test documents |" in out and "| edited copies |" in out  # the knowledge update, on copies of the db
    assert (tmp_path / "run" / "knowledge_update.json").exists()
    manifest = tmp_path / "ws" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert main(["demo", *argv]) == 0
    assert "reusing" in capsys.readouterr().out
    assert manifest.stat().st_mtime_ns == stamp  # nothing rebuilt


def test_demo_refuses_a_missing_config(tmp_path, capsys):
    assert main(["demo", "--fit_config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error:")
