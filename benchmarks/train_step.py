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
    python benchmarks/train_step.py --compile    # also with model.compile (RetroLM compiles the encoder layers)
    python benchmarks/train_step.py --precision bf16 --allocators   # mimalloc vs glibc, the same run

With `--reference` it also runs lucidrains/RETRO-pytorch 0.3.9 at the same configuration, measured the same
way in the same run, and prints the ratios against that instead of the quoted figure. It needs the package,
which is not a dependency of retro_lit (its own imports pull in autofaiss etc., so only its model file is
loaded):

    pip install --no-deps retro-pytorch==0.3.9 einops
"""

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from retro_lit.malloc import SWITCH, allocator_env, fix_mmap_threshold
from retro_lit.model import RetroConfig, RetroModel

BENCH = RetroConfig(vocab_size=30522, chunk_size=64, d_model=512, n_layer=6, n_head=8, head_dim=64, d_ff=2048,
                    cca_layers=(2, 5), enc_n_layer=2, enc_cross_layers=(0,))
BATCH, SEQ, K = 4, 512, 2
LUCIDRAINS_TOKENS_PER_S = 262.0  # midpoint of 259-265 tokens/s measured on this machine type
LUCIDRAINS_PEAK_RSS_GB = 4.2


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


def lucidrains_model() -> torch.nn.Module:
    """lucidrains/RETRO-pytorch 0.3.9's RETRO at BENCH, loaded from its model file alone."""
    spec = importlib.util.find_spec("retro_pytorch")
    if spec is None:
        sys.exit("error: --reference needs `pip install --no-deps retro-pytorch==0.3.9 einops`")
    package = Path(spec.origin).parent
    sys.modules["retro_pytorch"] = types.ModuleType("retro_pytorch")
    sys.modules["retro_pytorch"].__path__ = [str(package)]
    sys.modules["retro_pytorch.retrieval"] = types.SimpleNamespace(BERT_VOCAB_SIZE=28996)  # all it needs
    spec = importlib.util.spec_from_file_location("retro_pytorch.retro_pytorch", package / "retro_pytorch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = BENCH
    return module.RETRO(num_tokens=c.vocab_size, max_seq_len=SEQ, enc_dim=c.d_model, enc_depth=c.enc_n_layer,
                        enc_cross_attn_layers=(1,), dec_depth=c.n_layer, dec_cross_attn_layers=(3, 6),
                        heads=c.n_head, dec_dim=c.d_model, dim_head=c.head_dim, chunk_size=c.chunk_size)


def run_one(precision: str, warmup: int, steps: int, model_name: str = "retro_lit") -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    tokens = torch.randint(1, BENCH.vocab_size, (BATCH, SEQ + 1))  # no 0: lucidrains masks pad id 0
    neighbors = torch.randint(1, BENCH.vocab_size, (BATCH, SEQ // 64, K, 128))
    if model_name.startswith("retro_lit"):
        model = RetroModel.from_config(BENCH).train()
        params = model.param_groups(0.01)

        def loss_fn():  # fused head + cross-entropy, as RetroLM trains
            return model.loss(tokens[:, :-1], tokens[:, 1:], neighbors)[0]
    else:
        model = lucidrains_model().train()
        params = model.parameters()

        def loss_fn():  # its own training path: logits + F.cross_entropy
            return model(tokens, neighbors, return_loss=True)

    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01, fused=True)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
            loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if model_name == "retro_lit+compile":  # what RetroLM(compile=True) does; after the eager FLOP count, since
        model.encoder.compile_layers()    # compiling under the counter's dispatch mode slowed every later step
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = matmul_peak(dtype)
    return {"model": model_name, "precision": precision, "tokens_per_s": BATCH * SEQ / step_s, "step_s": step_s,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "model_gflop_per_step": flops / 1e9, "matmul_peak_gflops": peak / 1e9,
            "mfu": flops / step_s / peak, "loss": loss.item(), "params": sum(p.numel() for p in model.parameters())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--reference", action="store_true", help="also run lucidrains/RETRO-pytorch 0.3.9 here")
    parser.add_argument("--compile", action="store_true", help="also run retro_lit with model.compile (its encoder layers)")
    parser.add_argument("--allocators", action="store_true",
                        help="also run retro_lit as `RETRO_LIT_ALLOCATOR=system retro-lit` does (glibc, fixed mmap threshold)")
    parser.add_argument("--child", choices=["retro_lit", "retro_lit+compile", "lucidrains", "retro_lit+glibc"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fix_mmap_threshold()  # what retro_lit.commands.main does first (a no-op under mimalloc)
        print(json.dumps(run_one(args.precision, args.warmup, args.steps, args.child.removesuffix("+glibc"))))
        return
    results = {}
    for precision in (["fp32", "bf16"] if args.precision == "both" else [args.precision]):
        names = (["retro_lit"] + ["retro_lit+glibc"] * args.allocators + ["retro_lit+compile"] * args.compile
                 + ["lucidrains"] * args.reference)
        for name in names:  # mimalloc, as `retro-lit` runs, but for +glibc: the allocator the process starts with
            env = os.environ | {SWITCH: "system"} if name.endswith("+glibc") else allocator_env()
            out = subprocess.run([sys.executable, __file__, "--child", name, "--precision", precision,
                                  "--warmup", str(args.warmup), "--steps", str(args.steps)],
                                 check=True, capture_output=True, text=True, env=env)
            results[name, precision] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"train step at the shared configuration, batch {BATCH} x seq {SEQ}, k {K}, 2 threads, "
          f"{next(iter(results.values()))['params'] / 1e6:.1f}M parameters")
    print(f"{'model':>17} {'precision':>9} {'tokens/s':>9} {'step s':>7} {'peak RSS GB':>11} {'GFLOP/step':>10} "
          f"{'matmul peak GFLOP/s':>19} {'MFU':>6} {'x lucidrains':>12}")
    for (name, precision), r in results.items():
        reference = results.get(("lucidrains", precision), {}).get("tokens_per_s", LUCIDRAINS_TOKENS_PER_S)
        print(f"{name:>17} {precision:>9} {r['tokens_per_s']:9.0f} {r['step_s']:7.2f} {r['peak_rss_gb']:11.2f} "
              f"{r['model_gflop_per_step']:10.0f} {r['matmul_peak_gflops']:19.0f} {r['mfu']:6.1%} "
              f"{r['tokens_per_s'] / reference:12.2f}")
    if args.allocators:
        for precision in {p for _, p in results}:
            ratio = results["retro_lit", precision]["tokens_per_s"] / results["retro_lit+glibc", precision]["tokens_per_s"]
            print(f"mimalloc / glibc (fixed mmap threshold), {precision}: {ratio:.2f}x tokens/s "
                  "(retro_lit.malloc keeps the re-execution only if bf16 >= 1.20x)")
    print("targets: fp32 >= 1.40x, bf16 >= 2.50x lucidrains tokens/s; peak RSS <= 2.0 GB (x lucidrains: against "
          + ("lucidrains measured in this run)" if args.reference else
             f"the quoted {LUCIDRAINS_TOKENS_PER_S:.0f} tokens/s, {LUCIDRAINS_PEAK_RSS_GB} GB)"))


if __name__ == "__main__":
    main()
