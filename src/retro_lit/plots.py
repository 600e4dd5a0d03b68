"""Every figure of retro_lit: evaluation (bpb vs alpha, bpb vs k, bpb vs database size), training (loss curves from a Lightning
`metrics.csv`), retrieval (neighbour-distance histogram, index recall bars).

Each `*_figure` function builds and returns a matplotlib `Figure` on the Agg canvas (no pyplot, no global
backend switch, so it works headless and in notebooks, where a returned Figure displays inline);
`save_figure(fig, path)` writes it and returns the `Path`. Every figure has a title, axis labels and a legend.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(title: str, xlabel: str, ylabel: str, size: tuple[float, float] = (6.4, 4.2)):
    """(figure, axes) on an Agg canvas with the title and axis labels set."""
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write `fig` as PNG (or the format of the suffix) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


# ----------------------------------------------------------------------------- evaluation

def _sorted_items(curve: Mapping) -> dict[float, float]:
    """{x: y} with numeric x (JSON turns keys into strings), sorted by x."""
    return dict(sorted((float(x), float(y)) for x, y in curve.items()))


def bpb_vs_alpha_figure(bpb_alpha: Mapping[str, Mapping[float, float]], kept: Mapping[float, float] | None = None,
                        title: str = "Leakage-filtered bits-per-byte") -> Figure:
    """bpb(alpha) per model (e.g. `retrieval on (k=2)`, `retrieval off`, `baseline`): only evaluation chunks whose
    longest overlap with their neighbours is <= alpha * chunk_len count. `kept`: fraction of chunks kept per alpha,
    drawn as a second axis."""
    fig, ax = new_figure(title, "α (max. overlap ratio of a chunk with its neighbours)", "bits per byte")
    for name, curve in bpb_alpha.items():
        curve = _sorted_items(curve)
        ax.plot(list(curve), list(curve.values()), marker="o", label=name)
    if kept:
        twin = ax.twinx()
        kept = _sorted_items(kept)
        twin.bar(list(kept), list(kept.values()), width=0.04, alpha=0.2, color="gray", label="chunks kept")
        twin.set_ylabel("fraction of chunks kept")
        twin.set_ylim(0, 1.05)
        lines, labels = ax.get_legend_handles_labels()
        more, more_labels = twin.get_legend_handles_labels()
        ax.legend(lines + more, labels + more_labels, loc="best")
    else:
        ax.legend(loc="best")
    return fig


def bpb_vs_k_figure(bpb_by_k: Mapping[int, float], references: Mapping[str, float] | None = None,
                    title: str = "Bits-per-byte vs neighbours retrieved") -> Figure:
    """bpb with retrieval ON at each k, with horizontal lines for references (`retrieval off`, `baseline`)."""
    fig, ax = new_figure(title, "neighbours per chunk k", "bits per byte")
    curve = _sorted_items(bpb_by_k)
    ks = [int(k) for k in curve]
    ax.plot(ks, list(curve.values()), marker="o", label="retrieval on")
    for (name, value), style in zip((references or {}).items(), ("--", ":", "-.", (0, (1, 3)))):
        ax.axhline(value, linestyle=style, color="gray" if name.startswith("retrieval off") else None, label=name)
    ax.set_xticks(ks)
    ax.legend(loc="best")
    return fig


def database_scaling_figure(sizes: Sequence[float], curves: Mapping[str, Sequence[float]],
                            flat: Mapping[str, Sequence[float]] | None = None, share: Sequence[float] | None = None,
                            title: str = "Bits-per-byte as the database grows (no retraining)") -> Figure:
    """bpb against database size in chunks (log x): one line per curve (`retrieval on`, its bpb(alpha), the random
    control), dashed lines for the rows that cannot read the database (`retrieval off`, `baseline`; drawn as
    measured at each size), and the share of evaluation chunks with a high-overlap neighbour on a second axis."""
    fig, ax = new_figure(title, "database size (chunks, log scale)", "bits per byte")
    ax.set_xscale("log")
    for name, values in curves.items():
        ax.plot(sizes, values, marker="o", label=name)
    for (name, values), style in zip((flat or {}).items(), ("--", ":", "-.")):
        ax.plot(sizes, values, linestyle=style, color="gray" if name.startswith("retrieval off") else None, label=name)
    lines, labels = ax.get_legend_handles_labels()
    if share is not None:
        twin = ax.twinx()
        twin.plot(sizes, share, color="gray", alpha=0.5, marker="s", linewidth=1, label="chunks with r(C) > α")
        twin.set_ylabel("share of evaluation chunks with r(C) > α")
        twin.set_ylim(0, 1.05)
        more, more_labels = twin.get_legend_handles_labels()
        lines, labels = lines + more, labels + more_labels
    ax.legend(lines, labels, loc="best", fontsize="small")
    return fig


# ----------------------------------------------------------------------------- training

def read_metrics_csv(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A Lightning `CSVLogger` `metrics.csv` -> {metric: (steps, values)}, skipping empty cells."""
    series: dict[str, tuple[list, list]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = row.get("step") or row.get("epoch") or ""
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                steps, values = series.setdefault(key, ([], []))
                steps.append(float(step) if step else float(len(steps)))
                values.append(float(value))
    return {k: (np.asarray(s), np.asarray(v)) for k, (s, v) in series.items()}


def loss_curves_figure(metrics: str | Path | Mapping[str, tuple[Sequence[float], Sequence[float]]],
                       keys: Sequence[str] | None = None, title: str = "Loss curves", ylabel: str = "loss (nats/token)",
                       log_x: bool = False) -> Figure:
    """Curves of `keys` (default: every metric whose name contains `loss`) from a `metrics.csv` path or a
    {metric: (steps, values)} mapping, e.g. `train/loss`, `val/loss`, `val/loss_no_retrieval`."""
    series = read_metrics_csv(metrics) if isinstance(metrics, (str, Path)) else metrics
    keys = list(keys) if keys is not None else sorted(k for k in series if "loss" in k)
    missing = [k for k in keys if k not in series]
    if missing or not keys:
        raise ValueError(f"metrics {missing or 'with loss in their name'} not found; have {sorted(series)}")
    fig, ax = new_figure(title, "step", ylabel)
    for key in keys:
        steps, values = series[key]
        many = len(steps) > 1
        ax.plot(steps, values, marker=None if many else "o", label=key, alpha=0.9 if many else 1.0)
    if log_x:
        ax.set_xscale("symlog")
    ax.legend(loc="best")
    return fig


# ----------------------------------------------------------------------------- retrieval

def neighbor_distance_figure(distances: np.ndarray | Mapping[str, np.ndarray], bins: int = 50,
                             title: str = "Distances to retrieved neighbours") -> Figure:
    """Histogram of neighbour distances (squared L2; inf = no neighbour, skipped): one array, or one per label
    (e.g. `neighbour 1`, `neighbour 2`, or per split)."""
    groups = dict(distances) if isinstance(distances, Mapping) else {"neighbours": distances}
    fig, ax = new_figure(title, "squared L2 distance", "chunks")
    finite = {name: np.asarray(d, dtype=np.float64).ravel() for name, d in groups.items()}
    finite = {name: d[np.isfinite(d)] for name, d in finite.items()}
    values = np.concatenate(list(finite.values())) if finite else np.zeros(0)
    edges = np.histogram_bin_edges(values, bins=bins) if len(values) else bins
    for name, d in finite.items():
        ax.hist(d, bins=edges, alpha=0.6 if len(finite) > 1 else 0.9, label=f"{name} (n={len(d)})")
    ax.legend(loc="best")
    return fig


def index_recall_figure(recall: Mapping[str, float | Mapping[str, float]], title: str = "Index recall vs exact search",
                        ylabel: str = "recall@k") -> Figure:
    """Bars of recall per index (`{"IVF1024,Flat": 0.93}`), or grouped bars per index and setting
    (`{"IVF1024,Flat": {"nprobe 8": 0.85, "nprobe 32": 0.97}}`)."""
    groups = {name: (v if isinstance(v, Mapping) else {ylabel: v}) for name, v in recall.items()}
    settings = list(dict.fromkeys(s for v in groups.values() for s in v))
    fig, ax = new_figure(title, "index", ylabel)
    x, width = np.arange(len(groups)), 0.8 / max(1, len(settings))
    for i, setting in enumerate(settings):
        heights = [groups[name].get(setting, math.nan) for name in groups]
        bars = ax.bar(x + (i - (len(settings) - 1) / 2) * width, heights, width, label=setting)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(x, list(groups))
    ax.set_ylim(0, 1.08)
    ax.legend(loc="lower right")
    return fig


def write_evaluation_plots(results: Mapping, out_dir: str | Path, stem: str) -> list[Path]:
    """The two evaluation figures of an `evaluate` result dict: `<stem>_bpb_vs_alpha.png`, `<stem>_bpb_vs_k.png`."""
    out_dir, models = Path(out_dir), results["models"]
    alpha_curves = {name: m["bpb_alpha"] for name, m in models.items()}
    kept = results.get("kept_fraction")
    paths = [save_figure(bpb_vs_alpha_figure(alpha_curves, kept, f"Leakage-filtered bpb ({results['source']})"),
                         out_dir / f"{stem}_bpb_vs_alpha.png")]
    on = {m["k"]: m["bpb"] for m in models.values() if m.get("k")}
    if on:
        references = {name: m["bpb"] for name, m in models.items() if not m.get("k")}
        paths.append(save_figure(bpb_vs_k_figure(on, references, f"bpb vs k ({results['source']})"),
                                 out_dir / f"{stem}_bpb_vs_k.png"))
    return paths
