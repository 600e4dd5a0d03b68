"""Raw training-step speed and memory of RetroModel at the shared benchmark configuration.

vocab 30522, d_model 512, 8 heads x 64, d_ff 2048, 6 decoder layers, 2 encoder layers, chunk 64,
seq 512, 2 neighbours x 128 tokens, CCA in decoder layers 3 and 6 (1-based), encoder cross-attention
in its first layer, batch 4, AdamW (lr 3e-4, wd 0.01), 2 torch threads, 2 warm-up + 5 timed steps,
random token and neighbour ids.

Each precision runs in its own subprocess so that peak RSS is that precision's alone. Prints tokens/s
(median of the timed steps), peak RSS, model FLOPs per step (counted by torch's FlopCounterMode) and
MFU against a matmul peak measured in the same process; then the ratios against lucidrains/RETRO-pytorch
0.3.9 on this machine type (259-265 tokens/s, 4.2 GB peak RSS; targets fp32 >= 1.4x, bf16 >= 2.5x,
peak RSS <= 2.0 GB).

    python benchmarks/train_step.py            # both precisions
    python benchmarks/train_step.py --precision bf16 --steps 5
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from retro_lit.model import RetroConfig, RetroModel

BENCH = RetroConfig(vocab_size=30522, chunk_size=64, d_model=512, n_layer=6, n_head=8, head_dim=64, d_ff=2048,
                    cca_layers=(2, 5), enc_n_layer=2, enc_cross_layers=(0,))
BATCH, SEQ, K = 4, 512, 2
LUCIDRAINS_TOKENS_PER_S = 262.0  # midpoint of 259-265 tokens/s measured on this machine type
LUCIDRAINS_PEAK_RSS_GB = 4.2
# glibc keeps freed activation blocks in its heap (RSS stays at the high-water mark of fragmentation);
# a fixed mmap threshold returns large blocks to the OS on free. `retro-lit` sets the same at start-up.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)}


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Achievable dense matmul FLOP/s on this machine at this dtype (best of a few runs)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def train_step(model, opt, tokens, targets, neighbors, autocast):
    opt.zero_grad(set_to_none=True)
    with autocast():
        loss, _ = model.loss(tokens, targets, neighbors)  # fused head + cross-entropy, as RetroLM trains
    loss.backward()
    opt.step()
    return loss


def run_one(precision: str, warmup: int, steps: int) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = RetroModel.from_config(BENCH).train()
    opt = torch.optim.AdamW(model.param_groups(0.01), lr=3e-4, fused=True)
    tokens = torch.randint(0, BENCH.vocab_size, (BATCH, SEQ + 1))
    tokens, targets = tokens[:, :-1], tokens[:, 1:]
    neighbors = torch.randint(0, BENCH.vocab_size, (BATCH, SEQ // 64, K, 128))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    with FlopCounterMode(display=False) as counter:
        train_step(model, opt, tokens, targets, neighbors, autocast)
    flops = counter.get_total_flops()
    for _ in range(warmup - 1):
        train_step(model, opt, tokens, targets, neighbors, autocast)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = train_step(model, opt, tokens, targets, neighbors, autocast)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = matmul_peak(dtype)
    return {"precision": precision, "tokens_per_s": BATCH * SEQ / step_s, "step_s": step_s,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "model_gflop_per_step": flops / 1e9, "matmul_peak_gflops": peak / 1e9,
            "mfu": flops / step_s / peak, "loss": loss.item(), "params": model.num_params()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.precision, args.warmup, args.steps)))
        return
    results = []
    for precision in (["fp32", "bf16"] if args.precision == "both" else [args.precision]):
        out = subprocess.run([sys.executable, __file__, "--child", "--precision", precision,
                              "--warmup", str(args.warmup), "--steps", str(args.steps)],
                             check=True, capture_output=True, text=True, env=dict(os.environ, **MALLOC_ENV)).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    p = results[0]["params"]
    print(f"RetroModel train step, batch {BATCH} x seq {SEQ}, k {K}, 2 threads; params: decoder "
          f"{p['decoder'] / 1e6:.1f}M, encoder {p['encoder'] / 1e6:.1f}M, embedding+head {p['embedding'] / 1e6:.1f}M")
    print(f"{'precision':>9} {'tokens/s':>9} {'step s':>7} {'peak RSS GB':>11} {'GFLOP/step':>10} "
          f"{'matmul peak GFLOP/s':>19} {'MFU':>6} {'x lucidrains':>12}")
    for r in results:
        print(f"{r['precision']:>9} {r['tokens_per_s']:9.0f} {r['step_s']:7.2f} {r['peak_rss_gb']:11.2f} "
              f"{r['model_gflop_per_step']:10.0f} {r['matmul_peak_gflops']:19.0f} {r['mfu']:6.1%} "
              f"{r['tokens_per_s'] / LUCIDRAINS_TOKENS_PER_S:12.2f}")
    print("targets: fp32 >= 1.40x, bf16 >= 2.50x lucidrains tokens/s; peak RSS <= 2.0 GB "
          f"(lucidrains: {LUCIDRAINS_PEAK_RSS_GB} GB)")


if __name__ == "__main__":
    main()
