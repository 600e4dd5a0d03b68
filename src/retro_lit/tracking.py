"""Weights & Biases helpers for notebooks and scripts: an offline-by-default `WandbLogger`, and the evaluation
(its JSON and plots) logged as one W&B artifact plus images and summary metrics.

Training metrics and the config reach W&B through Lightning's `WandbLogger` (and `WandbSaveConfigCallback` in
the CLI); the neighbours table through `retro_lit.lit.NeighborTableCallback`. Without an API key runs are
written offline under `<save_dir>/wandb/offline-run-*`; upload them later with `wandb sync <that folder>`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def default_wandb_mode() -> None:
    """Offline W&B unless an API key is configured (environment or `wandb login`'s netrc entry)."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"


def wandb_logger(project: str, save_dir: str | Path, name: str | None = None, **options):
    """A Lightning `WandbLogger` writing under `save_dir`; offline unless an API key is configured (the same rule
    as `retro-lit`: `WANDB_MODE` wins when set, e.g. `disabled` in tests). `options` go to `WandbLogger`."""
    from lightning.pytorch.loggers import WandbLogger

    default_wandb_mode()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, save_dir=str(save_dir), name=name, **options)


def log_evaluation_to_wandb(run_or_logger, json_path: str | Path, png_paths: Sequence[str | Path] = (),
                            name: str = "evaluation"):
    """Log an `evaluate` result to a W&B run (a `wandb` Run or a Lightning `WandbLogger`):

    - an artifact `name` of type `evaluation` holding the JSON and every PNG (files, kept with the run),
    - each PNG as an image under `eval/<file stem>`,
    - `eval/<model>/bpb` (and `loss`, `ppl`) in the run summary for every model of the result.

    Returns the logged `wandb.Artifact` (None when the run is disabled).
    """
    import wandb

    run = getattr(run_or_logger, "experiment", run_or_logger)
    if run is None or getattr(run, "disabled", False) or type(run).__name__ == "RunDisabled":
        return None
    json_path = Path(json_path)
    result = json.loads(json_path.read_text(encoding="utf-8"))
    artifact = wandb.Artifact(_artifact_name(name), type="evaluation",
                              metadata={k: result.get(k) for k in ("checkpoint", "workspace", "source", "seq_len")})
    artifact.add_file(str(json_path))
    for png in png_paths:
        artifact.add_file(str(png))
    run.log_artifact(artifact)
    run.log({f"eval/{Path(png).stem}": wandb.Image(str(png)) for png in png_paths})
    for model, metrics in result.get("models", {}).items():
        for key in ("bpb", "loss", "ppl"):
            run.summary[f"eval/{model}/{key}"] = metrics[key]
    log.info("logged %s (%d files) to W&B run %s", artifact.name, 1 + len(png_paths), run.id)
    return artifact


def _artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "evaluation"
