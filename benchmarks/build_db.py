"""Benchmark the retrieval-database build on Debian's linux-doc-6.1 reST (distinct text, no repeats).

    apt-get install -y linux-doc-6.1
    python benchmarks/build_db.py            # ~4M- and ~1M-token builds, each in its own process
    python benchmarks/build_db.py --processes 2   # 1-process vs 2-process build of one ~100k-token subset

Reports, and writes under `## build_db` in benchmarks/README.md:
- end-to-end build chunks/s / raw embedder forward chunks/s (same process, same chunks' distribution);
- peak RSS of the 4M-token build / the 1M-token build, measured before the index stage;
- the auto index's recall@2 vs exact search and the neighbour queries/s.

With `--processes N` it instead builds one subset twice, in one process with 2 torch threads and as an
N-process gloo build (`retro_lit.distributed`, 1 thread per rank on 2 cores), and writes the time ratio
under `## build_db --processes`.
"""

import argparse
import datetime
import json
import logging
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from retro_lit.build import build_summary, build_workspace
from retro_lit.corpus import iter_documents
from retro_lit.distributed import Placement, build_workspace_distributed
from retro_lit.embedder import BERTForChunkEmbeddings
from retro_lit.malloc import allocator_env
from retro_lit.tokenizer import workspace_tokenizer
from retro_lit.workspace import open_workspace, read_manifest

log = logging.getLogger("build_db")
CHARS_PER_TOKEN = 4.0  # rough, for picking the subsets; the real token counts are reported
RAW_SAMPLE = 4096


def write_subset(folder: Path, n_tokens: int, seed: int) -> int:
    """Write a seeded random subset of linux-doc documents, ~n_tokens, one file per document."""
    docs = list(iter_documents("linux-doc"))
    random.Random(seed).shuffle(docs)
    folder.mkdir(parents=True)
    chars = 0
    for i, doc in enumerate(docs):
        if chars >= n_tokens * CHARS_PER_TOKEN:
            break
        (folder / f"{i:05d}.rst").write_text(doc.text, encoding="utf-8")
        chars += len(doc.text)
    return chars


def child(corpus: str, workspace: str, measure_raw: bool) -> dict:
    """One build in this process: peak RSS before the index, end-to-end time, raw forward speed."""
    torch.set_num_threads(2)
    embedder = BERTForChunkEmbeddings(None, "cpu")
    start = time.perf_counter()
    build_workspace(workspace, corpus, embedder=embedder, until="embeddings", quiet=True)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    build_workspace(workspace, corpus, embedder=embedder, quiet=True)
    seconds = time.perf_counter() - start
    result = build_summary(workspace, 2, 2048) | {
        "peak_rss_mb_before_index": rss_mb,
        "build_seconds": seconds,
    }
    result["build_chunks_per_s"] = result["chunks"] / seconds
    if measure_raw:
        ws = open_workspace(workspace)
        n = min(RAW_SAMPLE, len(ws.chunks))
        rows = np.sort(np.random.default_rng(0).choice(len(ws.chunks), n, replace=False))
        texts = workspace_tokenizer(ws).decode_batch([r[r != ws.pad_id].tolist() for r in ws.chunks[rows]])
        token_ids = embedder.tokenize(texts)
        embedder.forward(token_ids[:256])  # warm-up
        t = time.perf_counter()
        embedder.forward(token_ids)
        result["raw_forward_chunks_per_s"] = n / (time.perf_counter() - t)
    return result


def child_processes(corpus: str, workspace: str, processes: int, block_size: int) -> dict:
    """One build of the whole workspace: in this process (2 threads) or over `processes` gloo ranks."""
    load_before = os.getloadavg()
    start = time.perf_counter()
    if processes == 1:
        torch.set_num_threads(2)
        build_workspace(workspace, corpus, device="cpu", block_size=block_size, quiet=True)
    else:
        placement = Placement("cpu", processes, 1, "ddp")
        build_workspace_distributed(workspace, corpus, placement=placement, block_size=block_size, quiet=True)
    seconds = time.perf_counter() - start
    manifest = read_manifest(workspace)
    return build_summary(workspace, 2, 2048) | {
        "build_seconds": seconds,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "blocks": manifest["stages"]["embeddings"]["blocks"],
    }


def run_child(corpus: Path, workspace: Path, measure_raw: bool, extra: tuple[str, ...] = ()) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--corpus",
        str(corpus),
        "--workspace",
        str(workspace),
        *extra,
    ]
    out = subprocess.run(
        cmd + (["--measure_raw"] if measure_raw else []), check=True, stdout=subprocess.PIPE, text=True,
        env=allocator_env(streaming=True),  # the allocator `retro-lit build-db` runs with (retro_lit.malloc)
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_processes(args) -> None:
    """1-process vs N-process build of one subset; writes `## build_db --processes`."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_subset(tmp / "corpus", args.tokens, seed=0)
        runs = {}
        for n in (args.processes, 1) if args.reverse else (1, args.processes):
            extra = ("--processes", str(n), "--block_size", str(args.block_size))
            runs[n] = run_child(tmp / "corpus", tmp / f"ws_{n}", measure_raw=False, extra=extra)
            log.info("%d process(es): %s", n, runs[n])
        same = all(
            np.array_equal(
                np.load(tmp / "ws_1" / "neighbors" / "k2_t2048" / f"{split}.npy"),
                np.load(tmp / f"ws_{args.processes}" / "neighbors" / "k2_t2048" / f"{split}.npy"),
            )
            for split in ("train", "val", "test")
        )
    one, many = runs[1], runs[args.processes]
    ratio = many["build_seconds"] / one["build_seconds"]
    loads = [f"{x:.1f}" for r in (one, many) for x in (r["load_before"][0], r["load_after"][0])]

    def stages(r):
        return ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items())

    text = f"""## build_db --processes

`python benchmarks/build_db.py --processes {args.processes} --tokens {args.tokens} --block_size {args.block_size}{" --reverse" if args.reverse else ""}` — {datetime.date.today()},
{platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only (no GPU in this run),
all-MiniLM-L6-v2 (bf16 autocast), `bpe:8192`, M=64, K=2, T=2048, auto index. The same linux-doc subset
({one["documents"]} docs, {one["tokens"]:,} tokens, {one["chunks"]:,} chunks, {one["blocks"]} blocks of {args.block_size}) is built
once in one process with `torch.set_num_threads(2)` and once as a {args.processes}-process gloo build
(`retro_lit.distributed`, 1 torch/faiss thread per rank), each from scratch in its own interpreter.

| figure | 1 process × 2 threads | {args.processes} processes × 1 thread |
|---|---|---|
| end-to-end build, s (incl. process start) | {one["build_seconds"]:.1f} | {many["build_seconds"]:.1f} |
| per stage | {stages(one)} | {stages(many)} |
| embedding chunks/s | {one["embedding_chunks_per_s"]:.1f} | {many["embedding_chunks_per_s"]:.1f} |
| neighbour queries/s | {one["neighbor_queries_per_s"]:.0f} | {many["neighbor_queries_per_s"]:.0f} |

**{args.processes}-process time ÷ 1-process time = {ratio:.3f}** (target ≤ 1.0); neighbour files identical: {same}.
The box is shared with colleagues' jobs: 1-minute load average {loads[0]} → {loads[1]} during the
1-process build and {loads[2]} → {loads[3]} during the {args.processes}-process build, on {os.cpu_count()} cores, so both
times are several times an idle box's and the ratio carries that noise.
"""
    log.info("%s", text)
    write_readme(Path(args.readme), text, "## build_db --processes\n")


def write_readme(path: Path, text: str, heading: str = "## build_db\n") -> None:
    """Replace (or append) the `heading` section, keeping everyone else's sections."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    head, sep, rest = old.partition(heading)
    tail = rest[rest.find("\n## ") + 1 :] if sep and "\n## " in rest else ""
    path.write_text(
        head.rstrip() + "\n\n" + text.rstrip() + "\n" + ("\n" + tail if tail else ""), encoding="utf-8"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4_200_000, help="target tokens of the large build")
    parser.add_argument(
        "--small_tokens", type=int, default=1_050_000, help="target tokens of the small build"
    )
    parser.add_argument("--readme", default=str(Path(__file__).with_name("README.md")))
    parser.add_argument(
        "--processes", type=int, default=None, help="compare a 1-process and an N-process build instead"
    )
    parser.add_argument("--reverse", action="store_true", help="with --processes: the N-process build first")
    parser.add_argument("--block_size", type=int, default=128, help="chunks per block with --processes")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure_raw", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--workspace", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.processes:
        result = child_processes(args.corpus, args.workspace, args.processes, args.block_size)
        sys.stdout.write(json.dumps(result) + "\n")
        return
    if args.child:
        sys.stdout.write(json.dumps(child(args.corpus, args.workspace, args.measure_raw)) + "\n")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.processes:
        compare_processes(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_subset(tmp / "small", args.small_tokens, seed=0)
        write_subset(tmp / "large", args.tokens, seed=0)
        small = run_child(tmp / "small", tmp / "ws_small", measure_raw=False)
        log.info("small build: %s", small)
        large = run_child(tmp / "large", tmp / "ws_large", measure_raw=True)
        log.info("large build: %s", large)
    ratio = large["build_chunks_per_s"] / large["raw_forward_chunks_per_s"]
    rss = large["peak_rss_mb_before_index"] / small["peak_rss_mb_before_index"]
    per_stage = ", ".join(f"{k} {v:.0f} s" for k, v in large["seconds"].items())
    text = f"""## build_db

`python benchmarks/build_db.py` — {datetime.date.today()}, {platform.node()}, {platform.processor() or platform.machine()},
`torch.set_num_threads(2)`, CPU only, all-MiniLM-L6-v2 (bf16 autocast), `bpe:8192`, M=64, K=2, T=2048.
Corpus: seeded random subsets of Debian `linux-doc-6.1` reST (one document per file, no repeats).

| figure | value | target |
|---|---|---|
| large build | {large["documents"]} docs, {large["tokens"]:,} tokens, {large["chunks"]:,} chunks, {large["build_seconds"]:.0f} s | ≥ 4M tokens |
| end-to-end build chunks/s ÷ raw forward chunks/s | {large["build_chunks_per_s"]:.1f} ÷ {large["raw_forward_chunks_per_s"]:.1f} = **{ratio:.3f}** | ≥ 0.85 |
| peak RSS before the index, large ÷ small ({small["tokens"]:,} tokens) | {large["peak_rss_mb_before_index"]:.0f} MB ÷ {small["peak_rss_mb_before_index"]:.0f} MB = **{rss:.3f}** | ≤ 1.1 |
| auto index (large) | `{large["index"]}`, recall@2 vs exact **{large["recall@2"]}** | ≥ 0.95 |
| neighbour queries/s (large, all splits) | **{large["neighbor_queries_per_s"]:.0f}** | ≥ 2,000 |

Time per stage (large): {per_stage}. Size on disk: {large["size_mb"]} MB.
Absolute speeds move with other load on the machine; the ratio is
measured within one process.
"""
    log.info("%s", text)
    write_readme(Path(args.readme), text)


if __name__ == "__main__":
    main()
