"""`retro-lit demo` (what `make demo` runs): the whole RETRO loop on the bundled Shakespeare plays.

1. build the retrieval database (BPE tokens, 64-token chunks, MiniLM keys, faiss index, neighbours),
   one document per play, held-out plays for validation and test;
2. train the model of `configs/demo.yaml` with the Lightning Trainer (exactly `retro-lit fit`);
3. evaluate bits-per-byte on held-out plays with retrieval ON and OFF, and bpb(alpha) (`retro-lit evaluate`);
4. generate a sample with live retrieval, printing the neighbour chunks it retrieved (`retro-lit generate`).

A second run reuses the database and, unless `--retrain`, the checkpoint.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retro-lit demo", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.yaml", help="LightningCLI config of the model and data")
    p.add_argument("--corpus", default=None, help="corpus to build from (default: the config's data.corpus)")
    p.add_argument("--workspace", default=None, help="database folder (default: the config's data.workspace)")
    p.add_argument("--run_dir", default=None, help="logs, checkpoints, plots (default: trainer.default_root_dir)")
    p.add_argument("--max_steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--eval_tokens", type=int, default=20000, help="held-out tokens to evaluate (0 = all)")
    p.add_argument("--baseline", action="store_true", help="also train configs/baseline.yaml and compare")
    p.add_argument("--retrain", action="store_true", help="train even if the run folder has a checkpoint")
    p.add_argument("--prompt", default=PROMPT, help="generation prompt")
    return p


def demo_main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (2 with one `error:` line for bad input)."""
    from retro_lit.corpus import RetroDataError
    from retro_lit.generate import CommandError

    args = demo_parser().parse_args(argv)
    if not Path(args.config).is_file():
        print(f"error: config {args.config} not found; run from the repository root or pass --config", file=sys.stderr)
        return 2
    try:
        return run_demo(args)
    except (RetroDataError, CommandError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def fit_or_reuse(config: str, overrides: list[str], retrain: bool, title: str):
    """Build the database (prepare_data) and train with the config, or reuse run_dir's last.ckpt;
    returns (checkpoint, workspace)."""
    from retro_lit.cli import RetroCLI

    cli = RetroCLI(args=["--config", config, *overrides], run=False)
    data, trainer = cli.datamodule, cli.trainer
    stage(f"{title}: retrieval database {data.hparams.workspace}")
    data.prepare_data()  # builds or resumes; logs the database summary
    ckpt, workspace = Path(cli.config.checkpoint.dirpath) / "last.ckpt", Path(data.hparams.workspace)
    if ckpt.exists() and not retrain:
        stage(f"{title}: reusing {ckpt} (pass --retrain to train again)")
        return ckpt, workspace
    stage(f"{title}: training {trainer.max_steps} steps ({cli.model.model.num_params()['total'] / 1e6:.1f}M parameters)")
    trainer.fit(cli.model, data)
    return ckpt, workspace


def run_demo(args) -> int:
    from retro_lit.evaluate import evaluate_parser, markdown_table, run_evaluation
    from retro_lit.generate import generate_main

    start = time.time()
    overrides = [f"--data.workspace={args.workspace}"] if args.workspace else []
    overrides += [f"--data.corpus={args.corpus}"] if args.corpus else []
    overrides += [f"--trainer.default_root_dir={args.run_dir}"] if args.run_dir else []
    overrides += [f"--trainer.max_steps={args.max_steps}"] if args.max_steps else []
    ckpt, workspace = fit_or_reuse(args.config, overrides, args.retrain, "RETRO")
    run_dir = ckpt.parent.parent
    baseline = None
    if args.baseline:
        base_dir = run_dir.parent / (run_dir.name + "-baseline")
        baseline, _ = fit_or_reuse(str(Path(args.config).with_name("baseline.yaml")),
                                [o for o in overrides if "default_root_dir" not in o]
                                + [f"--trainer.default_root_dir={base_dir}"], args.retrain, "baseline")

    stage("evaluating held-out plays (test split): retrieval ON vs OFF, bpb(alpha)")
    eval_args = ["--ckpt_path", str(ckpt), "--workspace", str(workspace), "--split", "test", "--neighbors", "1,2",
                 "--out_dir", str(run_dir), "--precision", "bf16"]
    eval_args += ["--max_tokens", str(args.eval_tokens)] if args.eval_tokens else []
    eval_args += ["--baseline_ckpt", str(baseline)] if baseline else []
    result, written = run_evaluation(evaluate_parser().parse_args(eval_args))
    table = markdown_table(result)

    stage("generating with live retrieval")
    status = generate_main(["--ckpt_path", str(ckpt), "--workspace", str(workspace), "--prompt", args.prompt,
                            "--max_new_tokens", "96", "--temperature", "0.8", "--top_k", "40", "--seed", "0",
                            "--show_retrieval", "--precision", "bf16"])
    stage(f"done in {(time.time() - start) / 60:.1f} min")
    print(table)
    print(f"\nworkspace:   {workspace}\ncheckpoint:  {ckpt}\nlogs:        {run_dir}  (metrics.csv under lightning_logs/)"
          f"\nevaluation:  {', '.join(str(p) for p in written)}")
    return status


def stage(text: str) -> None:
    print(f"\n== {text}", flush=True)
