"""`retro-lit demo` (what `make demo` runs): the whole RETRO loop on the Python standard library's own sources.

1. build the retrieval database (BPE tokens, 32-token chunks, MiniLM keys, faiss index, neighbours), one
   document per source file, held-out files for validation and test, training files that near-duplicate a
   held-out one left out (13-gram Jaccard >= 0.8);
2. train the RETRO model of `configs/demo.yaml` and, from the same config without CCA, the same decoder without
   retrieval for the same steps (what `configs/baseline.yaml` holds), with the Lightning Trainer (`retro-lit fit`);
3. evaluate bits-per-byte on the held-out test files (`retro-lit evaluate`): retrieval ON, OFF, random train
   chunks as neighbours (the control), the baseline, and bpb split by the chunks' overlap with their neighbours;
4. knowledge update without retraining: the same model and test files, retrieving from copies of the database to
   which the test files themselves, or lightly edited copies of them, were added (`retro_lit.additions`);
5. generate a sample with live retrieval, printing the neighbour chunks it retrieved (`retro-lit generate`).

A second run reuses the database and, unless `--retrain`, the checkpoints. Code is redundant across files
(codecs, idioms, licence blocks): docs/retrieval.md says why this corpus and not Shakespeare.
"""

import json
import logging
import time
from pathlib import Path

from retro_lit.checkpoint import (load_checkpoint, load_checkpoint_dict, precision_context,
                                  reuse_loaded_checkpoints)
from retro_lit.cli import RetroCLI
from retro_lit.embedder import fast_precision, resolve_device
from retro_lit.evaluate import ALPHAS, evaluate_checkpoint, leakage_demonstration, leakage_table, markdown_table
from retro_lit.generate import generate_text
from retro_lit.workspace import RetroError, open_workspace

log = logging.getLogger(__name__)

PROMPT = 'import json\n\n\ndef load(path):\n    """Read a JSON file."""\n'
BASELINE = ["--model.config.cca_layers=[]", "--model.config.cca_init=normal", "--model.retrieval=false",
            "--model.eval_retrieval=off"]
COPY_RUN = 8  # the paper's leakage threshold, alpha = 0.125 at M = 64: a chunk sharing > 8 tokens with a neighbour
KNOWLEDGE_TOKENS = 16384  # test tokens of the knowledge update: its three databases cost three evaluations


def demo(
    fit_config: str = "configs/demo.yaml",
    corpus: str | None = None,
    workspace: str | None = None,
    run_dir: str | None = None,
    max_steps: int | None = None,
    eval_tokens: int = 0,
    baseline: bool = True,
    retrain: bool = False,
    prompt: str = PROMPT,
) -> None:
    """The demo on the Python stdlib: database, RETRO and a baseline trained, evaluated and compared.

    Args:
        fit_config: LightningCLI config (`retro-lit fit --config`) of the RETRO model and its data.
        corpus: corpus to build from (default: the config's data.corpus).
        workspace: database folder (default: the config's data.workspace).
        run_dir: logs, checkpoints, plots (default: the config's trainer.default_root_dir).
        max_steps: training steps of both models (default: the config's).
        eval_tokens: held-out tokens to evaluate (0 = the whole test split).
        baseline: train the same decoder without retrieval as a baseline (--no_baseline skips it).
        retrain: train even if a run folder has a checkpoint.
        prompt: generation prompt.
    """
    if not Path(fit_config).is_file():
        raise RetroError(f"config {fit_config} not found; run from the repository root or pass --fit_config")
    start = time.time()
    precision = fast_precision(resolve_device("auto"))  # emulated bf16 (CPUs without bf16 units) is ~6x slower
    overrides = [] if precision == "bf16" else ["--trainer.precision=32"]
    if precision == "32":
        stage("this CPU has no bf16 units (AVX512-BF16, AMX): training, embedding and evaluation run in fp32")
    overrides += [f"--data.workspace={workspace}"] if workspace else []
    overrides += [f"--data.corpus={corpus}"] if corpus else []
    overrides += [f"--trainer.max_steps={max_steps}"] if max_steps else []
    run_override = [f"--trainer.default_root_dir={run_dir}"] if run_dir else []
    ckpt, workspace_path = fit_or_reuse(fit_config, overrides + run_override, retrain, "RETRO")
    run_path = ckpt.parent.parent
    baseline_ckpt = None
    if baseline:  # the same config without CCA: same decoder, data, steps and schedule
        base_dir = run_path.parent / (run_path.name + "-baseline")
        baseline_ckpt, _ = fit_or_reuse(fit_config, overrides + BASELINE + [f"--trainer.default_root_dir={base_dir}"],
                                   retrain, "baseline")

    alpha = COPY_RUN / open_workspace(workspace_path).chunk_len
    with reuse_loaded_checkpoints():  # the trained model is read from its file once for the three steps
        stage("evaluating the held-out test files: retrieval ON, OFF, random neighbours, baseline; bpb by overlap")
        result, written = evaluate_checkpoint(
            str(ckpt), str(workspace_path), split="test", neighbors=(2,), random_control=True, out_dir=str(run_path),
            precision=precision, alphas=tuple(sorted({alpha, *ALPHAS})), max_tokens=eval_tokens or None,
            baseline_ckpt=str(baseline_ckpt) if baseline_ckpt else None,
        )
        stage("knowledge update: the test files, then edited copies of them, added to copies of the database")
        update = knowledge_update(ckpt, workspace_path, run_path, eval_tokens, alpha, precision)

        stage("generating with live retrieval")
        generate_text(str(ckpt), str(workspace_path), prompt, max_new_tokens=96, temperature=0.8, top_k=40, seed=0,
                      show_retrieval=True, precision=precision)
    stage(f"done in {(time.time() - start) / 60:.1f} min")
    print(markdown_table(result))
    print("\n" + retrieval_summary(result, alpha))
    print("(one seed; RETRO and the baseline saw the same batches. Mean ± sd over seeds: benchmarks/seeds.py, "
          "docs/results.md § Seeds)")
    print("\nknowledge update (no retraining): the test files from the database as built, with themselves added "
          "(the leakage case), with edited copies added\n" + update)
    print(f"\nworkspace:   {workspace_path}\ncheckpoint:  {ckpt}\nlogs:        {run_path}  (metrics.csv under "
          f"lightning_logs/)\nevaluation:  {', '.join(str(p) for p in written)}")


def fit_or_reuse(config: str, overrides: list[str], retrain: bool, title: str) -> tuple[Path, Path]:
    """Build the database (prepare_data) and train with the config, or reuse run_dir's last.ckpt once it has
    reached the config's steps (a run stopped before them saved it at a validation: training resumes from it);
    returns (checkpoint, workspace)."""
    cli = RetroCLI(args=["--config", config, *overrides], run=False)
    data, trainer = cli.datamodule, cli.trainer
    stage(f"{title}: retrieval database {data.hparams.workspace}")
    data.prepare_data()  # builds or resumes; logs the database summary
    ckpt, workspace = Path(cli.config.checkpoint.dirpath) / "last.ckpt", Path(data.hparams.workspace)
    step = int(load_checkpoint_dict(ckpt).get("global_step", 0)) if ckpt.exists() and not retrain else None
    if step is not None and step >= trainer.max_steps:
        stage(f"{title}: reusing {ckpt} (pass --retrain to train again)")
        return ckpt, workspace
    if step is not None:
        stage(f"{title}: resuming {ckpt} at step {step} of {trainer.max_steps} (an interrupted run)")
    else:
        stage(f"{title}: training {trainer.max_steps} steps "
              f"({cli.model.model.num_params()['total'] / 1e6:.1f}M parameters)")
    trainer.fit(cli.model, data, ckpt_path=str(ckpt) if step is not None else None)
    return ckpt, workspace


def knowledge_update(ckpt: Path, workspace: Path, run_dir: Path, eval_tokens: int, alpha: float,
                     precision: str = "bf16") -> str:
    """`leakage_demonstration` with the demo's model (k = 2) on the first KNOWLEDGE_TOKENS test tokens (or
    `eval_tokens`): the grown copies of the database go under run_dir/knowledge-update, the figures to
    run_dir/knowledge_update.json; returns the table."""
    device = resolve_device("auto")
    model, data_hparams = load_checkpoint(ckpt, device)
    with precision_context(precision, device):
        result = leakage_demonstration(workspace, model, run_dir / "knowledge-update",
                                       seq_len=int(data_hparams["seq_len"]), k=2, device=str(device),
                                       max_tokens=eval_tokens or KNOWLEDGE_TOKENS, alphas=sorted({alpha, *ALPHAS}))
    (run_dir / "knowledge_update.json").write_text(json.dumps(result, indent=2, default=float) + "\n", encoding="utf-8")
    return leakage_table(result, alpha)


def retrieval_summary(result: dict, alpha: float) -> str:
    """What retrieval bought, in relative bpb: ON against OFF, the baseline and the random-neighbour control,
    and ON against OFF on the chunks with and without a high-overlap neighbour (r(C) > alpha or not; alpha =
    8 / M, the paper's 0.125 at M = 64)."""
    models = result["models"]
    on = next(m for name, m in models.items() if name.startswith("retrieval on"))
    off = models["retrieval off"]
    rel = lambda a, b: (a - b) / b  # noqa: E731
    lines = [f"ON vs OFF:       {rel(on['bpb'], off['bpb']):+.1%} bpb ({on['bpb']:.4f} vs {off['bpb']:.4f})"]
    if "baseline" in models:
        base = models["baseline"]["bpb"]
        lines.append(f"ON vs baseline:  {rel(on['bpb'], base):+.1%} bpb ({on['bpb']:.4f} vs {base:.4f}, same steps)")
    random = next((m for name, m in models.items() if name.startswith("random")), None)
    if random is not None:
        gain = off["bpb"] - on["bpb"]
        kept = (f"keeps {(off['bpb'] - random['bpb']) / gain:.0%} of the ON-OFF gain" if gain > 1e-3 * off["bpb"]
                else "(no ON-OFF gain to compare with)")
        lines.append(f"random control:  {random['bpb']:.4f} bpb, {kept}")
    share = 1 - result["kept_fraction"][alpha]
    lines.append(f"chunks with r(C) > {alpha:g} ({share:.1%} of chunks): ON vs OFF "
                 f"{rel(on['bpb_above_alpha'][alpha], off['bpb_above_alpha'][alpha]):+.1%} bpb")
    lines.append(f"chunks with r(C) <= {alpha:g} ({1 - share:.1%}):            ON vs OFF "
                 f"{rel(on['bpb_alpha'][alpha], off['bpb_alpha'][alpha]):+.1%} bpb = bpb(alpha={alpha:g})")
    return "\n".join(lines)


def stage(text: str) -> None:
    print(f"\n== {text}", flush=True)
