"""`retro-lit demo` end to end on a tiny corpus and config (its printed figures agree with each other and with the
files it wrote; a second run reuses database and checkpoint), and the demo's configs."""
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from retro_lit.commands import main
from retro_lit.demo import BASELINE, fit_or_reuse

ROOT = Path(__file__).resolve().parents[1]


def table_rows(out: str, first_cell: str) -> dict[str, list[str]]:
    """The rows of the printed Markdown table whose header starts with `first_cell`: name -> the other cells."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def check_printed_figures(out: str, run: Path) -> None:
    """Every figure the demo prints is the one it wrote to eval_test.json and knowledge_update.json, and each
    relative figure is computed from the printed pair it names."""
    result = json.loads((run / "eval_test.json").read_text())
    models = result["models"]
    rows = table_rows(out, "model")
    assert set(rows) == set(models) | {"chunks kept"}
    for name, m in models.items():
        assert rows[name][3] == f"{m['bpb']:.4f}", (name, rows[name])
    on_name = next(n for n in models if n.startswith("retrieval on"))
    on, off, base = models[on_name]["bpb"], models["retrieval off"]["bpb"], models["baseline"]["bpb"]
    found = re.search(r"^ON vs OFF: +([+-][\d.]+)% bpb \(([\d.]+) vs ([\d.]+)\)$", out, re.M)
    assert found and found.group(2, 3) == (f"{on:.4f}", f"{off:.4f}"), out
    assert found.group(1) == f"{(on - off) / off:+.1%}"[:-1]
    found = re.search(r"^ON vs baseline: +([+-][\d.]+)% bpb \(([\d.]+) vs ([\d.]+), same steps\)$", out, re.M)
    assert found and found.group(2, 3) == (f"{on:.4f}", f"{base:.4f}"), out
    assert found.group(1) == f"{(on - base) / base:+.1%}"[:-1]
    random = next(m for n, m in models.items() if n.startswith("random"))
    found = re.search(r"^random control: +([\d.]+) bpb, (keeps (-?\d+)% of the ON-OFF gain|\(no ON-OFF gain)", out, re.M)
    assert found and found.group(1) == f"{random['bpb']:.4f}", out
    if found.group(3) is not None:
        assert int(found.group(3)) == round(100 * (off - random["bpb"]) / (off - on))
    update = json.loads((run / "knowledge_update.json").read_text())
    printed = table_rows(out, "database")
    assert list(printed) == list(update["databases"])
    for name, database in update["databases"].items():
        d_on, d_off = database["models"]["on"]["bpb"], database["models"]["off"]["bpb"]
        assert printed[name][:3] == [f"{d_on:.4f}", f"{d_off:.4f}", f"{d_on / d_off:.3f}"], (name, printed[name])


def test_demo_runs_end_to_end_and_reuses_the_database(tmp_path, tiny_corpus, capsys, caplog):
    corpus = tiny_corpus(n_docs=12, words_per_doc=400)
    argv = ["--fit_config", str(ROOT / "configs" / "tiny.yaml"), "--corpus", str(corpus), "--workspace",
            str(tmp_path / "ws"), "--run_dir", str(tmp_path / "run"), "--max_steps", "4", "--eval_tokens", "3000",
            "--prompt", "The king"]
    assert main(["demo", *argv]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "random neighbours" in out and "chunks with r(C) > " in out
    check_printed_figures(out, tmp_path / "run")
    summaries = [r for r in caplog.records if r.name == "retro_lit.build" and r.getMessage().startswith("workspace ")]
    assert len(summaries) == 1, [r.getMessage()[:80] for r in summaries]  # once, though both fits prepare the data
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


def test_a_run_stopped_before_its_steps_resumes_instead_of_being_reused(tmp_path, tiny_corpus, tiny_bert_path, capsys):
    args = ["--data.corpus", str(tiny_corpus(n_docs=12, words_per_doc=200)), "--data.workspace", str(tmp_path / "ws"),
            "--data.embedder", str(tiny_bert_path), "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.precision=32", "--trainer.enable_progress_bar=false"]
    config = str(ROOT / "configs" / "tiny.yaml")
    ckpt, _ = fit_or_reuse(config, [*args, "--trainer.max_steps=2"], retrain=False, title="t")  # as if stopped at 2
    ckpt, _ = fit_or_reuse(config, [*args, "--trainer.max_steps=4"], retrain=False, title="t")
    assert "resuming" in capsys.readouterr().out
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    fit_or_reuse(config, [*args, "--trainer.max_steps=4"], retrain=False, title="t")
    assert "reusing" in capsys.readouterr().out


def test_demo_refuses_a_missing_config(tmp_path, capsys):
    assert main(["demo", "--fit_config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error:")


RETRIEVAL_FIELDS = {  # what the baseline changes, and to what (the rest of the two configs must be equal)
    ("trainer", "default_root_dir"): None,
    ("model", "config", "cca_layers"): [], ("model", "config", "cca_init"): "normal", ("model", "config", "cca_sink"): False,
    ("model", "config", "enc_n_layer"): None, ("model", "config", "enc_cross_layers"): None,
    ("model", "retrieval"): False, ("model", "eval_retrieval"): "off",
    ("data", "random_neighbor_rate"): 0.0, ("data", "copy_neighbor_rate"): 0.0,
}


def without_retrieval_fields(config: dict) -> tuple[dict, dict]:
    """(the config less RETRIEVAL_FIELDS, those fields' values where set)."""
    config, fields = json.loads(json.dumps(config)), {}
    for path in RETRIEVAL_FIELDS:
        *parents, leaf = path
        node = config
        for key in parents:
            node = node.get(key, {})
        if leaf in node:
            fields[path] = node.pop(leaf)
    return config, fields


def test_the_baseline_config_is_the_demo_config_without_retrieval():
    demo, _ = without_retrieval_fields(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()))
    baseline, fields = without_retrieval_fields(yaml.safe_load((ROOT / "configs" / "baseline.yaml").read_text()))
    assert baseline == demo  # the same decoder, data, optimizer, schedule and steps
    for path, value in fields.items():  # what it sets instead, it sets to no retrieval
        if RETRIEVAL_FIELDS[path] is not None:
            assert value == RETRIEVAL_FIELDS[path], path
    assert fields[("model", "retrieval")] is False and fields[("model", "config", "cca_layers")] == []


@pytest.mark.parametrize("override", BASELINE)
def test_the_demos_baseline_run_sets_what_the_baseline_config_sets(override):
    path, value = override.removeprefix("--").split("=")
    node = yaml.safe_load((ROOT / "configs" / "baseline.yaml").read_text())
    for key in path.split("."):
        node = node.get(key, {}) if isinstance(node, dict) else {}
    expected = value if isinstance(node, str) else yaml.safe_load(value)  # (YAML reads a bare `off` as false)
    assert node == expected or (node == {} and RETRIEVAL_FIELDS[tuple(path.split("."))] == expected), override
