"""The paper's headline on one machine: a trained model's bpb as its retrieval database grows, with no retraining.

Takes the demo's trained RETRO and baseline checkpoints and a copy of their workspace (the original is never
changed), and grows the copy's database with `add-docs` (`retro_lit.additions.add_documents`, resumable) to
`--factors` times its chunks as built: first the rest of the Python standard library (the packages the workspace
was not built from), then the Python sources of the packages installed in this venv, in path order. The test
files are never added. After each step the held-out test files are scored with live retrieval (`retro-lit
evaluate`): RETRO with retrieval ON (k = 2), random train chunks as neighbours (the control), OFF, the baseline,
and each row's bpb(alpha), alpha = 8/M, with the share of test chunks whose neighbours share more than 8 tokens
with them (r(C) > alpha over 10 neighbours).

Leakage (paper §2.6, §4): before each addition, every new document is compared with the test files by the demo's
13-gram MinHash Jaccard filter. A document at or above `--dedup_threshold` (a vendored copy, a backport) is
reported and kept out of the main database; a copy of that step's database with all such documents found so far
added is scored too ("near-duplicates kept"), so the curve is reported with that text kept and left out.

Each step also reports the addition's time, its embedding rate against the raw embedder's forward pass on a
sample of the same chunks (the target is >= 0.85), the index size and recall@2 measured over the grown index,
and the index's query throughput (10 neighbours for each test chunk). The index type is the workspace's (Flat
for the demo: exact search; `add_documents` adds keys to the trained index and never retrains it).

    python benchmarks/db_scaling.py [--ckpt runs/demo/checkpoints/last.ckpt] [--baseline_ckpt ...] \
        [--workspace workspaces/python-stdlib] [--factors 2 4 8 16] [--out runs/db-scaling] [--threads 2]

~31 min on 2 cores with bf16 units for x2 ... x16 (396k chunks; figures: docs/results.md § Database scaling).
Writes steps.json, db_scaling.json and db_scaling.png under --out, prints a table and one JSON line. Rerun the
same command to resume: finished additions and scores are kept, an interrupted addition resumes. A step is scored
on its own database only: once a later addition is in, a step without scores cannot be scored again (refused).
"""

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import torch
from add_docs import raw_chunks_per_s

from retro_lit.additions import add_documents
from retro_lit.cli import silence_upstream_notices
from retro_lit.corpus import MinHash, iter_documents
from retro_lit.demo import COPY_RUN
from retro_lit.embedder import fast_precision, resolve_device, workspace_embedder
from retro_lit.evaluate import evaluate_checkpoint, workspace_documents
from retro_lit.index import index_files, load_index
from retro_lit.plots import database_scaling_figure, save_figure
from retro_lit.tokenizer import workspace_tokenizer
from retro_lit.workspace import open_workspace

log = logging.getLogger("db_scaling")
ROWS = {"on": "retrieval on (k=2)", "random": "random neighbours (k=2)", "off": "retrieval off", "baseline": "baseline"}


def candidate_texts(built_corpus: str) -> Iterator[tuple[str, str]]:
    """(name, text) of the documents to grow the database with, in a fixed order: the standard library's packages
    that `built_corpus` (`python-stdlib:a,b`) left out, then every `.py` file of this venv's site-packages."""
    built = set(built_corpus.partition(":")[2].split(","))
    for doc in iter_documents("python-stdlib"):
        if doc.name.split("/")[0].removesuffix(".py") not in built:
            yield f"stdlib/{doc.name}", doc.text
    site = Path(sysconfig.get_paths()["purelib"])
    for file in sorted(site.rglob("*.py")):
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # not UTF-8 text: the corpus reader would refuse it too
        if text.strip():
            yield f"site-packages/{file.relative_to(site).as_posix()}", text


class NearDuplicates:
    """The demo's hygiene filter against the test files: 13-gram MinHash Jaccard similarity."""

    def __init__(self, test_texts: dict[str, str], threshold: float):
        self.sign, self.threshold = MinHash(), threshold
        self.names = list(test_texts)
        self.signatures = np.stack([self.sign(text) for text in test_texts.values()])  # (n_test, P)

    def match(self, text: str) -> tuple[str, float]:
        """(the most similar test file, its estimated Jaccard similarity)."""
        similarity = (self.signatures == self.sign(text)).mean(axis=1)  # (n_test,)
        best = int(similarity.argmax())
        return self.names[best], float(similarity[best])


def take_documents(candidates: Iterator[tuple[str, str]], n_chunks: int, chunk_len: int, tokenizer,
                   filter_: NearDuplicates) -> tuple[dict[str, str], dict[str, str], list[dict], int]:
    """Documents from `candidates` until they hold >= n_chunks chunks: (clean {name: text}, near-duplicates
    {name: text}, the filter's closest matches (each document's most similar test file, the 5 highest, at or
    above the threshold or not), the clean documents' chunks). Near-duplicates do not count."""
    clean, duplicates, found, chunks = {}, {}, [], 0
    for name, text in candidates:
        test_name, similarity = filter_.match(text)
        found = sorted([*found, {"document": name, "test_file": test_name, "jaccard": round(similarity, 3)}],
                       key=lambda f: -f["jaccard"])[:5]
        if similarity >= filter_.threshold:
            duplicates[name] = text
            continue
        clean[name] = text
        chunks += math.ceil(len(tokenizer.encode(text)) / chunk_len)
        if chunks >= n_chunks:
            break
    return clean, duplicates, found, chunks


def write_jsonl(path: Path, docs: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"name": name, "text": text}, ensure_ascii=False) + "\n" for name, text in docs.items())
    tmp.rename(path)  # a killed run never leaves a half-written corpus that a resumed addition would read
    return path


def grow(root: Path, corpus: Path, name: str, embedder) -> dict:
    """Add `corpus` as addition `name` (resuming it if unfinished, skipping it if done); its manifest entry, with
    the raw embedder's forward rate measured right after it on the chunks of the last full embedding block the
    addition wrote: the same texts in the same length-sorted batches as the addition embedded them (a smaller
    sample sorts into wider batches, pads more and runs ~2x slower, which would flatter the ratio)."""
    done = {a["name"]: a for a in open_workspace(root).additions if a.get("done")}
    if name not in done:
        start = time.perf_counter()
        add_documents(root, corpus, embedder, name=name, quiet=True)
        entry = next(a for a in open_workspace(root).additions if a["name"] == name)
        entry["wall_seconds"] = round(time.perf_counter() - start, 1)
    else:
        entry = done[name]
    ws = open_workspace(root)
    first, end = entry["range"]
    size = int(ws.manifest["settings"]["block_size"])
    lo = max(first, (end // size - 1) * size)  # the last block the addition filled (or its whole range)
    chunks = np.asarray(ws.chunks[lo:min(lo + size, end)])
    texts = workspace_tokenizer(ws).decode_batch([row[row != ws.pad_id] for row in chunks])
    return {**entry, "raw_chunks_per_s": round(raw_chunks_per_s(embedder, texts), 1)}


def query_rate(root: Path) -> tuple[int, float]:
    """(keys in the index, queries/s searching 10 neighbours for each test chunk's key)."""
    ws = open_workspace(root)
    info = ws.manifest["stages"]["index"]
    index = load_index(index_files(root, info), info.get("nprobe"))
    first, end = ws.split_range("test")
    keys = np.ascontiguousarray(ws.embeddings_at(np.arange(first, end)), dtype=np.float32)
    start = time.perf_counter()
    index.search(keys, 10)
    return int(index.ntotal), round(len(keys) / (time.perf_counter() - start), 1)


def score(root: Path, args, out_dir: Path) -> dict:
    """The test split scored with live retrieval from the database at `root`: bpb and bpb(alpha) of each row, and
    the share of test chunks with r(C) > alpha."""
    alpha = COPY_RUN / open_workspace(root).chunk_len
    result, _ = evaluate_checkpoint(args.ckpt, str(root), split="test", neighbors=(2,), random_control=True,
                                    baseline_ckpt=args.baseline_ckpt, alphas=(alpha,), neighbor_source="live",
                                    out_dir=str(out_dir), precision=args.precision, quiet=True)
    models = result["models"]
    return {"alpha": alpha, "copyable_share": 1 - result["kept_fraction"][alpha], "eval_seconds": result["seconds"],
            **{row: models[name]["bpb"] for row, name in ROWS.items()},
            **{f"{row}_alpha": models[name]["bpb_alpha"][alpha] for row, name in ROWS.items()},
            **{f"{row}_copyable": models[name]["bpb_above_alpha"][alpha] for row, name in ROWS.items()}}


def run_steps(args, out: Path) -> list[dict]:
    root = out / "workspace"
    if not root.exists():
        shutil.copytree(args.workspace, root.with_suffix(".tmp"))
        root.with_suffix(".tmp").rename(root)
    ws = open_workspace(root)
    steps_file = out / "steps.json"
    steps = json.loads(steps_file.read_text()) if steps_file.exists() else []
    tokenizer, M = workspace_tokenizer(ws), ws.chunk_len
    first, end = ws.split_range("train")
    planned = built_chunks = int(end - first)  # the database as built: the train split's chunks
    test_texts = {doc.name: tokenizer.decode(doc.tokens.tolist()) for doc in workspace_documents(ws, "test")}
    filter_ = NearDuplicates(test_texts, args.dedup_threshold)
    embedder = workspace_embedder(ws.manifest, "auto")
    candidates = candidate_texts(ws.manifest["settings"]["corpus"])
    duplicates: dict[str, str] = {}
    for factor in [1, *args.factors]:
        name = f"x{factor}"
        corpus = out / "additions" / f"{name}.jsonl"
        if factor > 1:  # the documents of this step (chosen again on a resume: the candidate order is fixed)
            clean, new_duplicates, found, chunks = take_documents(candidates, built_chunks * factor - planned, M,
                                                                  tokenizer, filter_)
            planned += chunks
            duplicates |= new_duplicates
            if not clean:
                log.info("no more text to add: stopping before x%d", factor)
                break
            if not corpus.exists():
                write_jsonl(corpus, clean)
        else:
            found = []
        done = next((s for s in steps if s["factor"] == factor), None)
        if done is not None:
            done["closest_matches"] = found  # (recomputed: the candidate order is fixed)
            continue
        added = [a["name"] for a in open_workspace(root).additions]  # a step is scored on its own database only
        later = added[added.index(name) + 1:] if name in added else added if factor == 1 else []
        if later:
            raise SystemExit(f"error: {root} has grown past x{factor} ({', '.join(added)}), which has no scores in "
                             f"{steps_file}: the database it was scored on is gone; start again with a new --out")
        step = {"factor": factor, "closest_matches": found}
        if factor > 1:
            entry = grow(root, corpus, name, embedder)
            rate = entry["stages"]["embeddings"]["chunks_per_s"]
            step |= {"added_documents": entry["documents"], "added_chunks": entry["chunks"],
                     "add_seconds": entry.get("wall_seconds", entry["seconds"]), "embedding_chunks_per_s": rate,
                     "raw_chunks_per_s": entry["raw_chunks_per_s"],
                     "embedding_ratio": round(rate / entry["raw_chunks_per_s"], 3),
                     "recall@2": entry["stages"]["index"]["recall"]}
        step["index_keys"], step["queries_per_s"] = query_rate(root)
        log.info("x%d: %d keys; scoring the test split", factor, step["index_keys"])
        step["left_out"] = score(root, args, out / "eval" / name)
        if duplicates:  # the same database with every near-duplicate found so far added too
            kept = out / "kept" / "workspace"
            shutil.rmtree(kept.parent, ignore_errors=True)
            shutil.copytree(root, kept)
            add_documents(kept, write_jsonl(out / "kept" / "near-duplicates.jsonl", duplicates), embedder,
                          name="near-duplicates", quiet=True)
            step["kept"] = score(kept, args, out / "eval" / f"{name}-kept")
            step["kept_documents"] = sorted(duplicates)
            shutil.rmtree(kept.parent)
        steps.append(step)
        steps_file.write_text(json.dumps(steps, indent=2) + "\n")
    return steps


def report(steps: list[dict]) -> str:
    lines = ["| database | keys | bpb ON | random | OFF | baseline | ON bpb(α) | OFF bpb(α) | r(C) > α "
             "| ON, near-dups kept | r(C) > α, kept | add s | embed ÷ raw | recall@2 | queries/s |", "|---" * 15 + "|"]
    for s in steps:
        r, kept = s["left_out"], s.get("kept")
        lines.append(
            f"| x{s['factor']} | {s['index_keys']:,} | {r['on']:.4f} | {r['random']:.4f} | {r['off']:.4f} | "
            f"{r['baseline']:.4f} | {r['on_alpha']:.4f} | {r['off_alpha']:.4f} | {r['copyable_share']:.1%} | "
            + (f"{kept['on']:.4f} | {kept['copyable_share']:.1%} | " if kept else "– | – | ")
            + (f"{s['add_seconds']:.0f} | {s['embedding_ratio']:.2f} | {s['recall@2']} | " if s["factor"] > 1
               else "– | – | – | ") + f"{s['queries_per_s']:,.0f} |")
    for s in steps[1:]:
        closest = "; ".join(f"{f['document']} ~ {f['test_file']} {f['jaccard']}" for f in s["closest_matches"][:3])
        lines.append(f"\nx{s['factor']}: near-duplicates kept out {len(s.get('kept_documents', []))} in all; the "
                     f"added documents closest to a test file (13-gram Jaccard): {closest}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="runs/demo/checkpoints/last.ckpt", help="the demo's RETRO checkpoint")
    p.add_argument("--baseline_ckpt", default="runs/demo-baseline/checkpoints/last.ckpt")
    p.add_argument("--workspace", default="workspaces/python-stdlib", help="copied, never changed")
    p.add_argument("--factors", type=int, nargs="+", default=[2, 4, 8, 16],
                   help="database sizes, in multiples of its chunks as built")
    p.add_argument("--dedup_threshold", type=float, default=0.8, help="13-gram Jaccard that makes a near-duplicate")
    p.add_argument("--out", default="runs/db-scaling")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--precision", choices=("bf16", "32"), default=fast_precision(resolve_device("auto")),
                   help="scoring (default: bf16 where the CPU has bf16 units, else 32); keys use the workspace's")
    args = p.parse_args()
    for path in (args.ckpt, args.baseline_ckpt, args.workspace):
        if not Path(path).exists():
            p.error(f"{path} not found: run `make demo` first, or pass --ckpt, --baseline_ckpt and --workspace")
    if sorted(set(args.factors)) != args.factors or args.factors[0] <= 1:
        p.error("--factors must be increasing and above 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    silence_upstream_notices()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    start, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = run_steps(args, out)
    sizes = [s["index_keys"] for s in steps]
    pick = lambda key, part="left_out": [s[part][key] for s in steps]  # noqa: E731
    curves = {"retrieval ON": pick("on"), "retrieval ON, bpb(α)": pick("on_alpha"), "random neighbours": pick("random")}
    if any("kept" in s for s in steps):  # (a step before the first near-duplicate: the same database)
        curves["retrieval ON, near-duplicates kept"] = [s.get("kept", s["left_out"])["on"] for s in steps]
    flat = {"retrieval off": pick("off"), "baseline": pick("baseline")}
    figure = save_figure(database_scaling_figure(sizes, curves, flat, share=pick("copyable_share")),
                         out / "db_scaling.png")
    table = report(steps)
    summary = {"benchmark": "db_scaling", "ckpt": args.ckpt, "baseline_ckpt": args.baseline_ckpt,
               "workspace": args.workspace, "precision": args.precision, "threads": args.threads,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "steps": steps, "seconds": round(time.time() - start, 1)}
    (out / "db_scaling.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + table + f"\n\nwrote {out / 'db_scaling.json'}, {figure}")
    print(json.dumps({k: v for k, v in summary.items() if k != "steps"} | {"sizes": sizes, "on": pick("on")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
