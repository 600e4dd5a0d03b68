"""Does the demo's recipe teach the model to read its neighbours? The twin-corpus check (issue 16).

Every document of a standard-library corpus appears twice (`x.py` and `twin/x.py`), near-duplicate removal off,
so whole-document exclusion still leaves a held-out file's twin retrievable when the twin fell in the train split:
its chunks have exact copies among their neighbours. The model of `configs/demo.yaml` is trained for the config's
steps on this corpus, then scored on the test files, retrieval ON vs OFF:

- test files whose twin is in the database: bpb on the chunks with an exact copy among their neighbours
  (r(C) = 1), target ON <= 0.5 x OFF;
- test files whose twin is not in the database (it is in val or test): bpb ON within 1 % of OFF (retrieval must
  not hurt where it has nothing to offer).

    python benchmarks/twin_corpus.py [--corpus python-stdlib:json,email,...] [--max_steps N] [--out DIR]

Prints a table and one JSON line; ~10 min on 2 CPU cores.
"""

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from retro_lit.corpus import iter_documents
from retro_lit.demo import fit_or_reuse
from retro_lit.evaluate import Scorer, choose_neighbors, evaluate_documents, workspace_documents
from retro_lit.generate import load_checkpoint, precision_context
from retro_lit.tokenizer import workspace_tokenizer
from retro_lit.workspace import open_workspace

ROOT = Path(__file__).resolve().parents[1]
CORPUS = "python-stdlib:json,email,logging,http,urllib,concurrent,importlib,collections,xmlrpc,wsgiref"


def write_twin_corpus(source: str, folder: Path) -> int:
    """Every document of `source` twice, as `<name>` and `twin/<name>`; returns the number of documents."""
    if folder.exists():
        shutil.rmtree(folder)
    n = 0
    for doc in iter_documents(source):
        for name in (doc.name, f"twin/{doc.name}"):
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(doc.text, encoding="utf-8")
        n += 1
    return n


def twin_name(name: str) -> str:
    return name.removeprefix("twin/") if name.startswith("twin/") else f"twin/{name}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", default=CORPUS, help="source whose documents are doubled")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--max_steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--out", default="/tmp/retro_twin", help="corpus, workspace and run folder")
    p.add_argument("--retrain", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the build's and training's progress lines
    out = Path(args.out)
    start = time.time()
    n_docs = write_twin_corpus(args.corpus, out / "corpus")
    overrides = [f"--data.corpus={out / 'corpus'}", f"--data.workspace={out / 'ws'}", "--data.dedup_threshold=null",
                 f"--trainer.default_root_dir={out / 'run'}", "--data.split=[0.8,0.1,0.1]"]
    overrides += [f"--trainer.max_steps={args.max_steps}"] if args.max_steps else []
    ckpt, workspace = fit_or_reuse(args.config, overrides, args.retrain, "twin corpus")
    ws = open_workspace(workspace)
    split_of = {d["name"]: d["split"] for d in ws.documents}
    model, data = load_checkpoint(ckpt, torch.device("cpu"))
    k, seq_len = data["num_neighbors"], data["seq_len"]
    neighbors_of, _ = choose_neighbors(ws, "test", "precomputed", k, k, seq_len)
    scorers = {"on": Scorer(model, k), "off": Scorer(model, None)}
    groups = {"twin in database": [], "twin not in database": []}
    for doc in workspace_documents(ws, "test"):
        groups["twin in database" if split_of.get(twin_name(doc.name)) == "train" else "twin not in database"].append(doc)
    results = {}
    with precision_context("bf16", torch.device("cpu")):
        for group, docs in groups.items():
            results[group] = evaluate_documents(scorers, docs, neighbors_of, workspace_tokenizer(ws).token_bytes, seq_len,
                                                ws.chunk_len, leakage_k=k, alphas=(0.125, 0.999))
    copies = results["twin in database"]
    copy_on = copies["models"]["on"]["bpb_above_alpha"][0.999]
    copy_off = copies["models"]["off"]["bpb_above_alpha"][0.999]
    alone = results["twin not in database"]["models"]
    report = {
        "benchmark": "twin_corpus", "corpus": args.corpus, "documents": n_docs, "config": args.config, "max_steps": args.max_steps,
        "checkpoint": str(ckpt), "test_docs": {g: len(d) for g, d in groups.items()},
        "exact_copy_chunk_share": 1 - copies["kept_fraction"][0.999],
        "exact_copy_bpb_on": copy_on, "exact_copy_bpb_off": copy_off, "exact_copy_ratio": copy_on / copy_off,
        "no_twin_bpb_on": alone["on"]["bpb"], "no_twin_bpb_off": alone["off"]["bpb"],
        "no_twin_relative": alone["on"]["bpb"] / alone["off"]["bpb"] - 1,
        "seconds": round(time.time() - start, 1),
    }
    print(f"\n| test files | chunks | bpb ON | bpb OFF | ON / OFF | target |\n|---|---|---|---|---|---|\n"
          f"| twin in database, chunks with an exact copy | {report['exact_copy_chunk_share']:.1%} | {copy_on:.4f} | "
          f"{copy_off:.4f} | {report['exact_copy_ratio']:.3f} | <= 0.5 |\n"
          f"| twin not in database | all | {alone['on']['bpb']:.4f} | {alone['off']['bpb']:.4f} | "
          f"{1 + report['no_twin_relative']:.3f} | <= 1.01 |")
    print(json.dumps(report, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
