"""Chunk-embedding speed and retrieval agreement of the embedder's CPU precisions, in one process.

For N chunk texts of Debian's linux-doc-6.1 reST (24-word windows, ~32-40 BPE tokens, like the database's
chunks), each precision embeds them all (the raw forward: pre-tokenized, length-sorted batches of 128, after a
warm-up batch) and the chunks' top-2 neighbours among the same keys (exact L2 search, the chunk itself left
out) are compared with the fp32 keys':

- `32`: fp32, the reference;
- `bf16`: bf16 autocast (hardware on AVX512-BF16/AMX CPUs, emulated elsewhere);
- `int8`: dynamic int8 quantization of BERT's linear layers (torch.ao's `quantize_dynamic`, fbgemm/x86 kernels;
  deprecated in torch, so a candidate measured here, not an `--embedder_precision`).

    apt-get install -y linux-doc-6.1
    python benchmarks/embed_precision.py [--chunks 3000] [--threads 2]

Prints a table (chunks/s, x the bf16 raw forward, top-2 sets equal to fp32's, top-2 overlap) and one JSON line.
"""

import argparse
import json
import sys
import time
import warnings

import faiss
import numpy as np
import torch

from retro_lit.corpus import iter_documents
from retro_lit.embedder import BERTForChunkEmbeddings, native_cpu_bf16

WORDS = 24


def chunk_texts(n: int) -> list[str]:
    texts = []
    for doc in iter_documents("linux-doc"):
        words = doc.text.split()
        texts += [" ".join(words[i:i + WORDS]) for i in range(0, len(words) - WORDS + 1, WORDS)]
        if len(texts) >= n:
            return texts[:n]
    return texts


def embedder(precision: str) -> BERTForChunkEmbeddings:
    if precision == "int8":
        e = BERTForChunkEmbeddings(None, "cpu", dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic
            e.model = quantize_dynamic(e.model, {torch.nn.Linear}, dtype=torch.qint8)
        return e
    return BERTForChunkEmbeddings(None, "cpu", dtype=torch.bfloat16 if precision == "bf16" else torch.float32)


def top2(keys: np.ndarray) -> np.ndarray:
    """(n, 2) nearest other chunks by L2, in order."""
    index = faiss.IndexFlatL2(keys.shape[1])
    index.add(keys)
    _, ids = index.search(keys, 3)
    return np.array([row[row != i][:2] for i, row in enumerate(ids)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chunks", type=int, default=3000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", default="bf16,int8", help="compared with 32, which always runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    texts = chunk_texts(args.chunks)
    results, reference = {}, None
    for precision in ["32", *(p for p in args.precisions.split(",") if p != "32")]:  # 32 first: the reference
        e = embedder(precision)
        ids = e.tokenize(texts)
        e.forward(ids[:128])  # warm-up
        start = time.perf_counter()
        keys = e.forward(ids).numpy()
        results[precision] = {"chunks_per_s": len(ids) / (time.perf_counter() - start)}
        neighbors = top2(keys)
        reference = neighbors if reference is None else reference
        same = np.sort(neighbors, 1) == np.sort(reference, 1)
        results[precision] |= {"top2_equal": float(same.all(1).mean()), "top2_overlap": float(same.mean())}
        print(f"{precision}: {results[precision]['chunks_per_s']:.1f} chunks/s", file=sys.stderr, flush=True)
    bf16 = results.get("bf16", {}).get("chunks_per_s")
    print(f"{len(texts)} linux-doc chunks, {args.threads} threads, CPU bf16 units: {native_cpu_bf16()}\n")
    print("| precision | chunks/s | x bf16 | top-2 set = fp32's | top-2 overlap |\n|---|---|---|---|---|")
    for precision, r in results.items():
        ratio = f"{r['chunks_per_s'] / bf16:.2f}" if bf16 else "–"
        print(f"| {precision} | {r['chunks_per_s']:.1f} | {ratio} | {r['top2_equal']:.1%} | {r['top2_overlap']:.1%} |")
    print(json.dumps({"benchmark": "embed_precision", "chunks": len(texts), "threads": args.threads,
                      "native_cpu_bf16": native_cpu_bf16(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
