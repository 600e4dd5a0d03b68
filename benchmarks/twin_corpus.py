"""Does the demo's recipe teach the model to read its neighbours? The twin-corpus check (issue 16).

Every document of a standard-library corpus appears twice (`x.py` and `twin/x.py`), near-duplicate removal off,
so whole-document exclusion still leaves a held-out file's twin retrievable when the twin fell in the train split:
its chunks have exact copies among their neighbours. The files of other packages (`--singles`) appear once, so
that enough held-out files have no twin. The model of `configs/demo.yaml` is trained for the config's
steps on this corpus, then scored on the validation files (`--split test` once, for the recipe finally chosen),
retrieval ON vs OFF:

- held-out files whose twin is in the database: bpb on the chunks with an exact copy among their neighbours
  (r(C) = 1), target ON <= 0.5 x OFF;
- held-out files whose twin is not in the database (singles, or a twin in val or test): bpb ON within 1 % of OFF
  (retrieval must not hurt where it has nothing to offer).

    python benchmarks/twin_corpus.py [--corpus python-stdlib:json,...] [--singles ...] [--max_steps N] [--out DIR] \
        [--precision 32] [--split validation|test] [-- --model.config.cca_init=normal --data.random_neighbor_rate=0 ...]

Arguments after `--` are LightningCLI overrides of the config (the lever under test).

Prints a table and one JSON line; ~10 min on 2 CPU cores.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from retro_lit.demo import fit_or_reuse
from retro_lit.diagnose import twin_check, write_twin_corpus
from retro_lit.embedder import fast_precision, resolve_device

ROOT = Path(__file__).resolve().parents[1]
CORPUS = "python-stdlib:json,email,logging,http,urllib,concurrent,importlib,collections,xmlrpc,wsgiref"
SINGLES = "python-stdlib:asyncio,xml,multiprocessing,unittest,tomllib,dbm,html"  # once each: ~10 test files, no twin


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=CORPUS, help="source whose documents are doubled")
    p.add_argument("--singles", default=SINGLES, help="source whose documents appear once ('' for none)")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--max_steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--out", default="/tmp/retro_twin", help="corpus, workspace and run folder")
    p.add_argument("--run", default="run", help="run folder under --out (one per lever; the workspace is shared)")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--precision", choices=("bf16", "32"), default=fast_precision(resolve_device("auto")),
                   help="training and scoring (default: bf16 where the CPU has bf16 units, else 32)")
    p.add_argument("--split", choices=("validation", "test"), default="validation",
                   help="held-out files scored: compare levers on validation; test once, for the chosen recipe")
    p.add_argument("overrides", nargs="*", help="LightningCLI overrides, after --")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the build's and training's progress lines
    out = Path(args.out)
    start = time.time()
    n_files = write_twin_corpus(args.corpus, out / "corpus", args.singles or None)
    overrides = [f"--data.corpus={out / 'corpus'}", f"--data.workspace={out / 'ws'}", "--data.dedup_threshold=null",
                 f"--trainer.default_root_dir={out / args.run}", "--data.split=[0.8,0.1,0.1]"]
    overrides += [f"--trainer.max_steps={args.max_steps}"] if args.max_steps else []
    overrides += [f"--trainer.precision={'32' if args.precision == '32' else 'bf16-mixed'}"]
    overrides += args.overrides
    ckpt, workspace = fit_or_reuse(args.config, overrides, args.retrain, "twin corpus")
    report = {"benchmark": "twin_corpus", "corpus": args.corpus, "singles": args.singles, "files": n_files,
              "config": args.config, "max_steps": args.max_steps, "overrides": args.overrides,
              "precision": args.precision,
              "checkpoint": str(ckpt), **twin_check(ckpt, workspace, args.precision, split=args.split)}
    report["seconds"] = round(time.time() - start, 1)
    copy_on, copy_off = report["exact_copy_bpb_on"], report["exact_copy_bpb_off"]
    print(f"\n| {args.split} files | chunks | bpb ON | bpb OFF | ON / OFF | target |\n|---|---|---|---|---|---|\n"
          f"| twin in database, chunks with an exact copy | {report['exact_copy_chunk_share']:.1%} | {copy_on:.4f} | "
          f"{copy_off:.4f} | {report['exact_copy_ratio']:.3f} | <= 0.5 |\n"
          f"| twin not in database | all | {report['no_twin_bpb_on']:.4f} | {report['no_twin_bpb_off']:.4f} | "
          f"{1 + report['no_twin_relative']:.3f} | <= 1.01 |")
    print(json.dumps(report, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
