"""Every plotting helper writes a PNG whose figure has a title, axis labels and a legend."""
import json

import numpy as np
import pytest

from retro_lit import plots


def assert_labelled(fig):
    ax = fig.axes[0]
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    assert ax.get_legend() is not None and ax.get_legend().get_texts()


def test_evaluation_figures(tmp_path):
    curves = {"retrieval on (k=2)": {0.125: 1.9, 0.5: 1.7, 1.0: 1.2}, "retrieval off": {0.125: 2.0, 0.5: 1.9, 1.0: 1.8}}
    fig = plots.bpb_vs_alpha_figure(curves, kept={0.125: 0.3, 0.5: 0.7, 1.0: 1.0})
    assert_labelled(fig)
    assert plots.save_figure(fig, tmp_path / "alpha.png").stat().st_size > 0
    fig = plots.bpb_vs_k_figure({1: 1.5, 2: 1.4, 4: 1.35}, {"retrieval off": 1.8, "baseline": 1.7})
    assert_labelled(fig)
    assert len(fig.axes[0].get_legend().get_texts()) == 3


def test_database_scaling_figure(tmp_path):
    sizes = [24_626, 49_252, 98_504, 197_008]
    fig = plots.database_scaling_figure(sizes, {"retrieval on": [1.39, 1.38, 1.37, 1.37], "random": [1.49] * 4},
                                        {"retrieval off": [1.48] * 4, "baseline": [1.47] * 4}, share=[0.4, 0.45, 0.5, 0.5])
    assert_labelled(fig)
    assert fig.axes[0].get_xscale() == "log"
    assert len(fig.axes[0].get_legend().get_texts()) == 5  # four curves and the share, one legend
    assert plots.save_figure(fig, tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_write_evaluation_plots_from_json(tmp_path):
    result = {"source": "validation", "kept_fraction": {0.5: 0.6, 1.0: 1.0},
              "models": {"retrieval on (k=1)": {"k": 1, "bpb": 1.5, "bpb_alpha": {0.5: 1.7, 1.0: 1.5}},
                         "retrieval on (k=2)": {"k": 2, "bpb": 1.4, "bpb_alpha": {0.5: 1.65, 1.0: 1.4}},
                         "retrieval off": {"k": None, "bpb": 1.8, "bpb_alpha": {0.5: 1.8, 1.0: 1.8}}}}
    result = json.loads(json.dumps(result))  # keys become strings, as when read back from the JSON file
    paths = plots.write_evaluation_plots(result, tmp_path, "eval_validation")
    assert [p.name for p in paths] == ["eval_validation_bpb_vs_alpha.png", "eval_validation_bpb_vs_k.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_loss_curves_from_lightning_csv(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/loss,val/loss,val/loss_no_retrieval\n"
                   "0,9,4.1,,\n0,19,3.5,,\n0,19,,3.6,3.9\n1,29,3.0,,\n1,39,2.8,3.1,3.5\n")
    series = plots.read_metrics_csv(csv)
    assert list(series["train/loss"][0]) == [9, 19, 29, 39] and list(series["val/loss"][1]) == [3.6, 3.1]
    fig = plots.loss_curves_figure(csv)
    assert_labelled(fig)
    assert len(fig.axes[0].get_legend().get_texts()) == 3
    assert plots.save_figure(fig, tmp_path / "loss.png").exists()
    with pytest.raises(ValueError, match="not found"):
        plots.loss_curves_figure(csv, keys=["val/bpb"])


def test_retrieval_figures(tmp_path):
    d = np.random.default_rng(0).gamma(2.0, 1.0, (200, 2))
    d[:3, 1] = np.inf  # missing neighbours are skipped
    fig = plots.neighbor_distance_figure({"neighbor 1": d[:, 0], "neighbor 2": d[:, 1]})
    assert_labelled(fig)
    assert plots.save_figure(fig, tmp_path / "dist.png").exists()
    fig = plots.index_recall_figure({"Flat": 1.0, "IVF64,Flat": {"nprobe 4": 0.8, "nprobe 16": 0.97}})
    assert_labelled(fig)
    assert plots.save_figure(fig, tmp_path / "recall.png").exists()
