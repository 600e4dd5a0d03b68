"""The notebooks run headless, top to bottom, with tiny parameters (nbclient); their PNGs are real figures.

Each notebook takes its sizes from one cell tagged `parameters`; the test inserts a cell right after it (as
papermill does) with a synthetic corpus, a random 1-layer BERT saved to a folder, and a few training steps.
The kernel is a kernelspec written to tmp_path that runs this interpreter, so a fresh `make test` venv works
without registering a kernel.
"""
import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import make_corpus

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory, tiny_bert_path) -> dict:
    """A corpus file and a random 1-layer BERT (MiniLM's tokenizer) saved as a local model folder."""
    corpus = make_corpus(tmp_path_factory.mktemp("nb_inputs") / "corpus.txt", n_docs=10, words_per_doc=260)
    return {"corpus": str(corpus), "embedder": str(tiny_bert_path)}


TINY = {
    "01_quickstart": dict(max_docs=10, tokenizer="bpe:512", chunk_len=8, chunks_per_sample=4, d_model=32, d_ff=64,
                          n_heads=2, d_k=16, n_layers=2, ca_layers=(1,), encoder_layers=1, batch_size=4,
                          max_steps=6, max_new_tokens=10),
    "02_inspect_retrieval": dict(max_docs=10, tokenizer="bpe:512", chunk_len=8, num_neighbors=3, seq_len=32, k=3,
                                 distance_sample=64, recall_queries=40),
    "03_train_and_evaluate": dict(max_docs=10, tokenizer="bpe:512", chunk_size=8, seq_len=32, num_neighbors=2,
                                  d_model=32, n_layer=2, n_head=2, head_dim=16, d_ff=64, cca_layers=(1,), enc_n_layer=1,
                                  max_steps=6, val_check_interval=3, batch_size=4, eval_ks=(1, 2),
                                  eval_max_tokens=200, max_new_tokens=12, use_wandb=True),
}


def inject_parameters(nb, values: dict) -> None:
    """Insert a code cell assigning `values` right after the cell tagged `parameters` (papermill-style)."""
    index = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


def kernel_spec_dir(root: Path) -> Path:
    """A Jupyter data folder with one kernel, `retro-lit-test`, run by this interpreter (the venv's), so that no
    user-level `python3` kernel pointing at another Python is picked up."""
    spec = root / "jupyter" / "kernels" / "retro-lit-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "retro_lit tests", "language": "python"}))
    return root / "jupyter"


def committed_without_outputs(nb) -> bool:
    return all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


# 03 runs in the default suite (kernel, injected parameters, training, evaluation, W&B, figures); 01 and 02, whose
# API the quick-start example and the unit tests also cover, are `slow` (~15-20 s each: a kernel importing Lightning)
@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] * (name != "03_train_and_evaluate"))
                                  for name in TINY])
def test_notebook_runs_headless(name, tiny_inputs, tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert committed_without_outputs(nb), f"{name}.ipynb is committed with outputs; clear them"
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    plots = tmp_path / "plots"
    inject_parameters(nb, {**tiny_inputs, **TINY[name], "plots_dir": str(plots)})
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_spec_dir(tmp_path)))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    start = time.perf_counter()
    client = NotebookClient(nb, timeout=300, kernel_name="retro-lit-test", allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    pngs = sorted(plots.glob("*.png"))
    assert pngs, f"{name} saved no figure to plots_dir"
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC, png
        assert png.stat().st_size > 5000, png


def test_figures_have_title_labels_and_legend(tmp_path):
    """The figure helpers the notebooks use: every axes has a title, axis labels and a legend."""
    import numpy as np

    from retro_lit.plots import (bpb_vs_alpha_figure, index_recall_figure, loss_curves_figure,
                                 neighbor_distance_figure)

    figures = [
        bpb_vs_alpha_figure({"retrieval on (k=2)": {0.5: 1.1, 1.0: 1.0}}, {0.5: 0.5, 1.0: 1.0}),
        index_recall_figure({"Flat": {"manifest": 1.0, "fresh check": 1.0}, "IVF4,Flat": {"nprobe 1": 0.7}}),
        loss_curves_figure({"train/loss": ([1, 2, 3], [3.0, 2.5, 2.0]), "val/loss": ([3], [2.2])}),
        neighbor_distance_figure({"neighbour 1": np.random.rand(20), "neighbour 2": np.random.rand(20)}),
    ]
    for fig in figures:
        ax = fig.axes[0]
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        assert ax.get_legend() is not None


def test_wandb_offline_run_logs_the_evaluation_artifact(tmp_path, monkeypatch):
    """An offline WandbLogger run gets the evaluation JSON and a PNG as an artifact (synced later)."""
    from retro_lit.plots import bpb_vs_alpha_figure, save_figure
    from retro_lit.tracking import log_evaluation_to_wandb, wandb_logger

    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = {"source": "val", "models": {"retrieval off": {"k": None, "loss": 2.0, "ppl": 7.4, "bpb": 1.3}}}
    json_path = tmp_path / "eval_val.json"
    json_path.write_text(json.dumps(result))
    png = save_figure(bpb_vs_alpha_figure({"retrieval off": {0.5: 1.3, 1.0: 1.3}}), tmp_path / "eval_val_bpb_vs_alpha.png")
    logger = wandb_logger("retro-lit-test", tmp_path / "runs")
    logger.log_metrics({"train/loss": 2.0}, step=1)
    artifact = log_evaluation_to_wandb(logger, json_path, [png])
    logger.experiment.finish()
    assert artifact is not None and artifact.type == "evaluation"
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    record = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"eval_val.json" in record and b"eval_val_bpb_vs_alpha.png" in record
    assert list(runs[0].glob("files/media/images/eval/eval_val_bpb_vs_alpha*.png"))
