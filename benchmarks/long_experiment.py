"""RETRO against a same-size baseline and a baseline with 2x the non-embedding parameters, trained longer.

`configs/demo.yaml` with `configs/experiments/stdlib-long.yaml` on top: the demo's RETRO and database, 400 steps.
The baselines are the same config without CCA (the demo's baseline) and without CCA at 8 decoder layers
instead of 4. All three are trained with the same data, steps and schedule, then scored on the held-out test
files: bpb with retrieval ON (k = 2), OFF, random train chunks as neighbours (the control), both baselines, and
bpb(alpha) (chunks sharing more than 8 tokens with a neighbour dropped). Writes eval_test.json, the bpb(alpha) plot and the loss curves under the run folder; prints a
table and one JSON line.

    python benchmarks/long_experiment.py [--max_steps N] [--retrain] [--precision bf16|32]

37 min on 2 CPU cores in fp32, measured (the demo's database is reused when it is built).
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from retro_lit.demo import BASELINE, COPY_RUN, fit_or_reuse, retrieval_summary
from retro_lit.embedder import fast_precision, resolve_device
from retro_lit.evaluate import ALPHAS, evaluate_checkpoint, markdown_table
from retro_lit.checkpoint import load_checkpoint
from retro_lit.plots import loss_curves_figure, read_metrics_csv, save_figure
from retro_lit.workspace import open_workspace

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"RETRO": [], "baseline": BASELINE, "baseline 2x": BASELINE + ["--model.config.n_layer=8"]}


def non_embedding_params(ckpt: Path) -> int:
    model, _ = load_checkpoint(str(ckpt), resolve_device("cpu"))
    return sum(p.numel() for name, p in model.named_parameters() if "token_emb" not in name)


def latest_metrics(run_dir: Path) -> dict:
    versions = sorted(run_dir.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    return read_metrics_csv(versions[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="the base config")
    p.add_argument("--experiment", default=str(ROOT / "configs" / "experiments" / "stdlib-long.yaml"),
                   help="the config layered on it")
    p.add_argument("--max_steps", type=int, default=None, help="training steps of all three (default: the config's)")
    p.add_argument("--run_dir", default="runs/long", help="RETRO's run folder; the baselines' sit next to it")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--precision", choices=("bf16", "32"), default=fast_precision(resolve_device("auto")),
                   help="training and scoring (default: bf16 where the CPU has bf16 units, else 32)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start, run_dir = time.time(), Path(args.run_dir)
    common = ["--config", args.experiment, f"--trainer.precision={'32' if args.precision == '32' else 'bf16-mixed'}"]
    common += [f"--trainer.max_steps={args.max_steps}"] if args.max_steps else []
    ckpts, seconds = {}, {}
    for name, extra in RUNS.items():
        folder = run_dir if name == "RETRO" else run_dir.parent / f"{run_dir.name}-{name.replace(' ', '-')}"
        t0 = time.time()
        ckpts[name], workspace = fit_or_reuse(args.config, common + extra + [f"--trainer.default_root_dir={folder}"],
                                              args.retrain, name)
        seconds[name] = round(time.time() - t0, 1)
    alpha = COPY_RUN / open_workspace(workspace).chunk_len
    result, written = evaluate_checkpoint(
        str(ckpts["RETRO"]), str(workspace), split="test", neighbors=(2,), random_control=True,
        baseline_ckpt=str(ckpts["baseline"]), baselines={"baseline 2x": str(ckpts["baseline 2x"])},
        alphas=tuple(sorted({alpha, *ALPHAS})), out_dir=str(run_dir), precision=args.precision)
    curves = {}
    for name, ckpt in ckpts.items():  # RetroLM logs val/loss (ON) and val/loss_no_retrieval; a baseline the latter
        metrics = latest_metrics(ckpt.parent.parent)
        curves[f"{name} train"] = metrics["train/loss"]
        val = {"val/loss": " val ON", "val/loss_no_retrieval": " val OFF" if name == "RETRO" else " val"}
        curves |= {name + label: metrics[key] for key, label in val.items() if key in metrics}
    figure = save_figure(loss_curves_figure(curves, keys=list(curves), title="Training and validation loss"),
                         run_dir / "loss_curves.png")
    params = {name: non_embedding_params(ckpt) for name, ckpt in ckpts.items()}
    print(markdown_table(result))
    print("\n" + retrieval_summary(result, alpha))
    base2x = result["models"]["baseline 2x"]["bpb"]
    on = result["models"]["retrieval on (k=2)"]["bpb"]
    print(f"ON vs baseline 2x: {(on - base2x) / base2x:+.1%} bpb ({on:.4f} vs {base2x:.4f})")
    print("non-embedding parameters: " + ", ".join(f"{n} {v / 1e6:.2f}M" for n, v in params.items()))
    print(f"wrote {', '.join(str(p) for p in [*written, figure])}")
    report = {"benchmark": "long_experiment", "config": args.config, "experiment": args.experiment,
              "precision": args.precision,
              "checkpoints": {n: str(c) for n, c in ckpts.items()}, "train_seconds": seconds,
              "non_embedding_params": params, "bpb": {n: m["bpb"] for n, m in result["models"].items()},
              "bpb_alpha": {n: m["bpb_alpha"] for n, m in result["models"].items()},
              "kept_fraction": result["kept_fraction"], "seconds": round(time.time() - start, 1)}
    print(json.dumps(report, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
