"""Generation speed with live retrieval at the demo model size (random weights), 2 torch threads.

Model: vocab 8192, d_model 384, 6 layers, 6 heads x 64, d_ff 1536, chunk 64, CCA in 0-based layers 2 and 5,
2-layer encoder, K = 2 neighbours x 128 tokens. Retrieval: the real all-MiniLM-L6-v2 embedder
(`BERTForChunkEmbeddings()`, bf16 autocast on CPU) on the chunk's text, a faiss `IndexFlatL2` over
`--db_chunks` random keys (E = 384), neighbour tokens from a random token table. The chunk text given to
MiniLM is made of words picked by the token ids, ~64 words, as long as real 64-token chunks.

Reports, for fp32 and bf16 autocast:
  * tokens/s of `generate` (prompt 64 tokens, `--new_tokens` sampled, retrieval live at each chunk);
  * the cost of one new token at position 2048 / at position 256 (median of 60 single-token steps after a
    prefill, none of them completing a chunk, the two positions interleaved); target <= 1.5;
  * retrieval per chunk: embed (MiniLM), search (faiss), encode (neighbour encoder + CCA projections).

    python benchmarks/generate.py
"""

import argparse
import json
import platform
import statistics
import time

import faiss
import numpy as np
import torch

from retro_lit.generate import generate
from retro_lit.model import RetroConfig, RetroModel

DEMO = RetroConfig(vocab_size=8192, chunk_size=64, d_model=384, n_layer=6, n_head=6, head_dim=64, d_ff=1536,
                   cca_layers=(2, 5), enc_n_layer=2, enc_cross_layers=(0,))
K, M = 2, 64
WORDS = ("the king queen castle sword night river storm crown love death honour battle letter ghost lord lady "
         "night morning speak hither thou thee thy doth hath shall").split()


class LiveRetriever:
    """embed (MiniLM) + search (faiss) + neighbour tokens; records the time of each part per call."""

    def __init__(self, embedder, index, db_tokens: np.ndarray):
        self.embedder, self.index, self.db_tokens = embedder, index, db_tokens
        self.times = {"embed": [], "search": []}

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        texts = [" ".join(WORDS[t % len(WORDS)] for t in row.tolist()) for row in chunk]
        t0 = time.perf_counter()
        keys = self.embedder(texts).numpy()  # (B, E)
        t1 = time.perf_counter()
        _, ids = self.index.search(keys, K)  # (B, K)
        t2 = time.perf_counter()
        self.times["embed"].append(t1 - t0)
        self.times["search"].append(t2 - t1)
        return torch.from_numpy(self.db_tokens[ids])  # (B, K, R)


def step_costs(model: RetroModel, positions: tuple[int, ...], dtype: torch.dtype, steps: int = 60) -> list[float]:
    """Median seconds of one cached single-token forward at each position (after a prefill of that many tokens).
    Steps at the different positions are interleaved, so that load from other processes hits them alike."""
    caches, tokens = [], torch.randint(0, DEMO.vocab_size, (1, max(positions) + M))
    for position in positions:
        assert position % M == 0  # prefill whole chunks, so the next M-1 steps complete none
        cache = model.new_cache(1, position + M, dtype)
        model(tokens[:, :position], torch.randint(0, DEMO.vocab_size, (1, position // M, K, 2 * M)), cache=cache)
        caches.append(cache)
    times = [[] for _ in positions]
    for step in range(steps):
        for j, (position, cache) in enumerate(zip(positions, caches)):
            if cache.length == position + M - 1:  # restart before the chunk would complete
                cache.length = position
            t0 = time.perf_counter()
            model(tokens[:, cache.length:cache.length + 1], None, cache=cache)
            times[j].append(time.perf_counter() - t0)
    return [statistics.median(t[3:]) for t in times]


def encode_cost(model: RetroModel, repeats: int = 20) -> float:
    """Median seconds to encode one chunk's K neighbours and project them for every CCA layer."""
    neighbors = torch.randint(0, DEMO.vocab_size, (1, 1, K, 2 * M))
    h = torch.randn(1, M, DEMO.d_model)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        memory, _ = model.run_encoder(neighbors, h)
        for i in model.ca_layers:
            model.blocks[i].cca.project(memory)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def run(precision: str, retriever: LiveRetriever, new_tokens: int) -> dict:
    torch.manual_seed(0)
    model = RetroModel.from_config(DEMO).eval()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        generate(model, torch.randint(0, DEMO.vocab_size, (1, 64)), retriever, 70, temperature=0.0)  # warm-up
        retriever.times = {"embed": [], "search": []}
        t0 = time.perf_counter()
        out = generate(model, torch.randint(0, DEMO.vocab_size, (1, 64)), retriever, new_tokens, temperature=1.0,
                       top_k=50, seed=0)
        seconds = time.perf_counter() - t0
        cost_256, cost_2048 = step_costs(model, (256, 2048), dtype)
        encode = encode_cost(model)
    assert out.shape[1] == 64 + new_tokens
    return {"precision": precision, "tokens_per_s": round(new_tokens / seconds, 1), "chunks_retrieved": len(retriever.times["embed"]),
            "ms_per_token_at_256": round(cost_256 * 1e3, 2), "ms_per_token_at_2048": round(cost_2048 * 1e3, 2),
            "cost_ratio_2048_over_256": round(cost_2048 / cost_256, 3),
            "retrieval_ms_per_chunk": {"embed": round(statistics.median(retriever.times["embed"]) * 1e3, 2),
                                       "search": round(statistics.median(retriever.times["search"]) * 1e3, 3),
                                       "encode": round(encode * 1e3, 2)}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new_tokens", type=int, default=512)
    parser.add_argument("--db_chunks", type=int, default=100_000)
    parser.add_argument("--precision", default="32,bf16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    from retro_lit.embedder import BERTForChunkEmbeddings

    embedder = BERTForChunkEmbeddings(device="cpu")
    rng = np.random.default_rng(0)
    index = faiss.IndexFlatL2(embedder.dim)
    index.add(rng.standard_normal((args.db_chunks, embedder.dim), dtype=np.float32))
    db_tokens = rng.integers(0, DEMO.vocab_size, (args.db_chunks, 2 * M))
    retriever = LiveRetriever(embedder, index, db_tokens)
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                      "torch": torch.__version__, "db_chunks": args.db_chunks}))
    for precision in args.precision.split(","):
        print(json.dumps(run(precision, retriever, args.new_tokens)), flush=True)


if __name__ == "__main__":
    main()
