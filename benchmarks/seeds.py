"""The demo's figures over several seeds: RETRO (retrieval ON, OFF, random neighbours) against the same decoder
without retrieval, each seed's two models trained on the same batches in the same order.

For every step count and seed: `configs/demo.yaml` with `--seed_everything=S` (initialisation and data order; the
database and its document split stay those of `data.seed`), trained as RETRO and as the demo's baseline (the same
config without CCA), then scored on the held-out test files (`--split validation` to compare levers: test is for
the recipe finally chosen) as `retro-lit demo` scores them: bpb with retrieval ON
(k = 2), OFF, random train chunks as neighbours, the baseline, and ON vs OFF on the chunks that share more than 8
tokens with a neighbour (r(C) > 8/M) and on the rest. Prints each row's mean ± sd over the seeds, the paired
differences seed by seed, and one JSON line; writes seeds_<split>.json under the run root.

    python benchmarks/seeds.py [--seeds 0 1 2] [--steps 200 400] [--split test|validation] [--run_root runs/seeds]
        [--config configs/demo.yaml] [--retrain]

A second run reuses every checkpoint and evaluation it finds (a run stopped mid-training resumes it). The default 3
seeds at 200 and 400 steps: 73 min measured on 2 cores with bf16 units, ~55 min on an idle box (figures and
times: docs/results.md, "Seeds"); about twice that on a CPU without bf16 units, where it trains in fp32.
"""

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from retro_lit.cli import silence_upstream_notices
from retro_lit.demo import BASELINE, COPY_RUN, fit_or_reuse
from retro_lit.embedder import fast_precision, resolve_device
from retro_lit.evaluate import evaluate_checkpoint
from retro_lit.workspace import open_workspace

ROOT = Path(__file__).resolve().parents[1]
ROWS = {"on": "retrieval on (k=2)", "off": "retrieval off", "random": "random neighbours (k=2)", "baseline": "baseline"}


def rel(a: float, b: float) -> float:
    return (a - b) / b


def run_seed(config: str, steps: int, seed: int, run_dir: Path, precision: str, retrain: bool,
             split: str = "test") -> dict:
    """Train RETRO and the baseline for one seed (or reuse them) and score `split`; the figures of one seed."""
    scores = run_dir / f"{split}.json"
    if scores.exists() and not retrain:
        return json.loads(scores.read_text())
    common = [f"--seed_everything={seed}", f"--trainer.max_steps={steps}",
              f"--trainer.precision={'32' if precision == '32' else 'bf16-mixed'}"]
    t0 = time.time()
    retro, workspace = fit_or_reuse(config, common + [f"--trainer.default_root_dir={run_dir / 'retro'}"], retrain,
                                    f"RETRO, seed {seed}, {steps} steps")
    baseline, _ = fit_or_reuse(config, common + BASELINE + [f"--trainer.default_root_dir={run_dir / 'baseline'}"],
                               retrain, f"baseline, seed {seed}, {steps} steps")
    train_seconds = time.time() - t0
    alpha = COPY_RUN / open_workspace(workspace).chunk_len
    result, _ = evaluate_checkpoint(str(retro), str(workspace), split=split, neighbors=(2,), random_control=True,
                                    baseline_ckpt=str(baseline), alphas=(alpha,), out_dir=str(run_dir),
                                    precision=precision, quiet=True)
    models = result["models"]
    figures = {row: models[name]["bpb"] for row, name in ROWS.items()}
    figures |= {"on_copyable": models[ROWS["on"]]["bpb_above_alpha"][alpha],
                "off_copyable": models[ROWS["off"]]["bpb_above_alpha"][alpha],
                "on_rest": models[ROWS["on"]]["bpb_alpha"][alpha], "off_rest": models[ROWS["off"]]["bpb_alpha"][alpha],
                "copyable_share": 1 - result["kept_fraction"][alpha], "alpha": alpha,
                "train_seconds": round(train_seconds, 1), "eval_seconds": result["seconds"]}
    scores.write_text(json.dumps(figures, indent=2, default=float) + "\n")
    return figures


def paired(figures: dict) -> dict:
    """The comparisons of one seed, all between models that saw the same batches."""
    f = figures
    gain = f["off"] - f["on"]
    return {"ON vs OFF": rel(f["on"], f["off"]), "ON vs baseline": rel(f["on"], f["baseline"]),
            "OFF vs baseline": rel(f["off"], f["baseline"]), "random vs OFF": rel(f["random"], f["off"]),
            "random keeps of the gain": (f["off"] - f["random"]) / gain if gain > 0 else float("nan"),
            "copyable: ON / OFF": f["on_copyable"] / f["off_copyable"],
            "the rest: ON / OFF": f["on_rest"] / f["off_rest"]}


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def report(steps: int, by_seed: dict[int, dict], split: str = "test") -> str:
    """Markdown: bpb rows as mean ± sd, then the paired differences per seed with their mean ± sd."""
    seeds = sorted(by_seed)
    lines = [f"### {steps} steps, seeds {', '.join(map(str, seeds))}", "",
             f"| {split} bpb | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
             "|---|" + "---|" * (len(seeds) + 1)]
    for row in ("on", "off", "random", "baseline"):
        values = [by_seed[s][row] for s in seeds]
        m, sd = mean_sd(values)
        lines.append(f"| {ROWS[row]} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {m:.4f} ± {sd:.4f} |")
    lines += ["", "| paired, same seed and batches | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |",
              "|---|" + "---|" * (len(seeds) + 1)]
    diffs = {s: paired(by_seed[s]) for s in seeds}
    for name in diffs[seeds[0]]:
        values = [diffs[s][name] for s in seeds]
        m, sd = mean_sd(values)
        fmt = "{:.3f}" if "/" in name else "{:.0%}" if "keeps" in name else "{:+.2%}"
        lines.append(f"| {name} | " + " | ".join(fmt.format(v) for v in values) + f" | {fmt.format(m)} ± "
                     f"{fmt.format(sd).lstrip('+')} |")
    share = statistics.fmean(by_seed[s]["copyable_share"] for s in seeds)
    lines.append(f"\ncopyable: the {share:.1%} of {split} chunks with r(C) > {by_seed[seeds[0]]['alpha']:g} "
                 f"(> {COPY_RUN} tokens shared with one of 10 neighbours)")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, nargs="+", default=[200, 400], help="training steps (each a set of runs)")
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="scored split: validation to compare levers, test once for the recipe chosen")
    p.add_argument("--run_root", default="runs/seeds")
    p.add_argument("--retrain", action="store_true", help="train and score again even where results exist")
    p.add_argument("--precision", choices=("bf16", "32"), default=fast_precision(resolve_device("auto")),
                   help="training and scoring (default: bf16 where the CPU has bf16 units, else 32)")
    args = p.parse_args()
    if len(set(args.seeds)) < 2:
        p.error("give at least two distinct --seeds: one seed has no spread")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    silence_upstream_notices()
    start, root = time.time(), Path(args.run_root)
    results = {}
    for steps in args.steps:
        results[steps] = {s: run_seed(args.config, steps, s, root / f"steps{steps}" / f"seed{s}", args.precision,
                                      args.retrain, args.split) for s in args.seeds}
    tables = "\n\n".join(report(steps, by_seed, args.split) for steps, by_seed in results.items())
    print("\n" + tables)
    summary = {"benchmark": "seeds", "config": args.config, "split": args.split, "precision": args.precision,
               "seeds": args.seeds,
               "results": {str(k): {str(s): f for s, f in v.items()} for k, v in results.items()},
               "seconds": round(time.time() - start, 1)}
    (root / f"seeds_{args.split}.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
