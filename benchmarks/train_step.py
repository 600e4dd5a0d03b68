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

With `--reference` it also runs two peers at the same configuration, measured the same way in the same run,
and prints the ratios against the faster of them instead of the quoted figure: lucidrains/RETRO-pytorch 0.3.9
and labml.ai's model (labml-nn 0.5.1, the seed's own; its `ca_layers` are 0-based, as ours). Neither is a
dependency of retro_lit, and only their model files are loaded (their packages' imports pull in autofaiss,
torchtext, ...; labml-nn's declared dependencies would swap torch for a CUDA build, hence --no-deps):

    pip install --no-deps retro-pytorch==0.3.9 einops labml-nn==0.5.1

`--rounds N` (default 3) interleaves the processes (ours, theirs, ours, theirs, ...) N times and reports each
row's median over the rounds, so one slow or lucky process does not make the ratio. `--profile` profiles one
more step of each process and prints where it goes (dense matmuls and their GFLOP/s against the peak, SDPA's
kernels, everything else); the floor, retro_lit at 100 % MFU, is printed in every run with a peer.
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
import torch.nn.functional as F
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


REFERENCES = ("lucidrains", "labml")
INSTALL = "pip install --no-deps retro-pytorch==0.3.9 einops labml-nn==0.5.1"


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # (finds a top-level package without importing it)
    if spec is None:
        sys.exit(f"error: --reference needs `{INSTALL}`")
    return Path(spec.origin).parent


def model_file(path: Path, name: str) -> types.ModuleType:
    """Execute one module file of an installed package without its package's __init__ (and its imports)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lucidrains_model() -> torch.nn.Module:
    """lucidrains/RETRO-pytorch 0.3.9's RETRO at BENCH, loaded from its model file alone."""
    package = package_dir("retro_pytorch")
    sys.modules["retro_pytorch"] = types.ModuleType("retro_pytorch")
    sys.modules["retro_pytorch"].__path__ = [str(package)]
    sys.modules["retro_pytorch.retrieval"] = types.SimpleNamespace(BERT_VOCAB_SIZE=28996)  # all it needs
    module = model_file(package / "retro_pytorch.py", "retro_pytorch.retro_pytorch")
    c = BENCH
    return module.RETRO(num_tokens=c.vocab_size, max_seq_len=SEQ, enc_dim=c.d_model, enc_depth=c.enc_n_layer,
                        enc_cross_attn_layers=(1,), dec_depth=c.n_layer, dec_cross_attn_layers=(3, 6),
                        heads=c.n_head, dec_dim=c.d_model, dim_head=c.head_dim, chunk_size=c.chunk_size)


def labml_model() -> torch.nn.Module:
    """labml.ai's RetroModel (labml-nn 0.5.1) at BENCH, loaded from its model file alone; 0-based layer sets."""
    path = package_dir("labml_nn") / "transformers" / "retro" / "model.py"
    sys.modules["labml"] = types.ModuleType("labml")
    sys.modules["labml.logger"] = types.SimpleNamespace(inspect=print)  # all it needs (its self-test prints)
    module = model_file(path, "labml_retro_model")
    c = BENCH
    encoder = module.NearestNeighborEncoder(c.chunk_size, c.enc_n_layer, set(c.enc_cross_layers), c.d_model,
                                            c.n_head, c.head_dim, c.d_ff)
    return module.RetroModel(c.vocab_size, c.d_model, c.n_layer, set(c.cca_layers), c.chunk_size, c.n_head,
                             c.head_dim, c.d_ff, encoder=encoder)


MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addbmm"}  # aten ops that are dense matmuls (linear layers lower to them)


def category(op: str) -> str:
    """`matmul`, `attention` (SDPA's fused kernels) or `other`, for an aten op name (`aten::mm`, `aten.mm`)."""
    name = op.replace("::", ".").removeprefix("aten.")
    if name in MATMULS:
        return "matmul"
    return "attention" if "scaled_dot_product" in name or "flash_attention" in name else "other"


def profile(step, flop_counts: dict) -> dict:
    """One more step under torch.profiler: seconds of each op category (self time of the ops, so every op is
    counted once) and the GFLOP of each, from the FLOP counter's per-op counts of the first step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    seconds = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    top = []
    for event in prof.key_averages():
        seconds[category(event.key)] += event.self_cpu_time_total / 1e6
        top.append((event.self_cpu_time_total / 1e6, event.key))
    gflop = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for op, count in flop_counts.items():
        gflop[category(str(op))] += count / 1e9
    return {"seconds": seconds, "gflop": gflop, "top_ops": sorted(top, reverse=True)[:8]}


def run_one(precision: str, warmup: int, steps: int, model_name: str = "retro_lit", with_profile: bool = False) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    tokens = torch.randint(1, BENCH.vocab_size, (BATCH, SEQ + 1))  # no 0: lucidrains masks pad id 0
    neighbors = torch.randint(1, BENCH.vocab_size, (BATCH, SEQ // 64, K, 128))
    if model_name.startswith("retro_lit"):
        model = RetroModel.from_config(BENCH).train()
        params = model.param_groups(0.01)

        def loss_fn():  # fused head + cross-entropy, as RetroLM trains
            return model.loss(tokens[:, :-1], tokens[:, 1:], neighbors)[0]
    elif model_name == "lucidrains":
        model = lucidrains_model().train()
        params = model.parameters()

        def loss_fn():  # its own training path: logits + F.cross_entropy
            return model(tokens, neighbors, return_loss=True)
    else:
        model = labml_model().train()
        params = model.parameters()

        def loss_fn():  # as its train.py: logits, then cross-entropy
            logits = model(tokens[:, :-1], neighbors)  # (B, T, V)
            return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

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
    extra = {"profile": profile(step, counter.get_flop_counts()["Global"])} if with_profile else {}
    return extra | {"model": model_name, "precision": precision, "tokens_per_s": BATCH * SEQ / step_s, "step_s": step_s,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "model_gflop_per_step": flops / 1e9, "matmul_peak_gflops": peak / 1e9,
            "mfu": flops / step_s / peak, "loss": loss.item(), "params": sum(p.numel() for p in model.parameters())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--reference", action="store_true",
                        help="also run lucidrains/RETRO-pytorch 0.3.9 and labml.ai's model here")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each row is their median")
    parser.add_argument("--compile", action="store_true", help="also run retro_lit with model.compile (its encoder layers)")
    parser.add_argument("--allocators", action="store_true",
                        help="also run retro_lit as `RETRO_LIT_ALLOCATOR=system retro-lit` does (glibc, fixed mmap threshold)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step of each process: time and GFLOP/s of matmuls, attention, the rest")
    parser.add_argument("--child", choices=["retro_lit", "retro_lit+compile", "retro_lit+glibc", *REFERENCES],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fix_mmap_threshold()  # what retro_lit.commands.main does first (a no-op under mimalloc)
        print(json.dumps(run_one(args.precision, args.warmup, args.steps, args.child.removesuffix("+glibc"),
                                 args.profile)))
        return
    runs = {}  # (name, precision) -> one result per round
    names = (["retro_lit"] + ["retro_lit+glibc"] * args.allocators + ["retro_lit+compile"] * args.compile
             + list(REFERENCES) * args.reference)
    for precision in (["fp32", "bf16"] if args.precision == "both" else [args.precision]):
        for _ in range(args.rounds):
            for name in names:  # mimalloc, as `retro-lit` runs, but for +glibc: the allocator the process starts with
                env = os.environ | {SWITCH: "system"} if name.endswith("+glibc") else allocator_env()
                out = subprocess.run([sys.executable, __file__, "--child", name, "--precision", precision,
                                      "--warmup", str(args.warmup), "--steps", str(args.steps)]
                                     + ["--profile"] * args.profile,
                                     check=True, capture_output=True, text=True, env=env)
                runs.setdefault((name, precision), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {key: median_run(rs) for key, rs in runs.items()}
    print(f"train step at the shared configuration, batch {BATCH} x seq {SEQ}, k {K}, 2 threads, "
          f"median of {args.rounds} interleaved rounds, {next(iter(results.values()))['params'] / 1e6:.1f}M parameters")
    print(f"{'model':>17} {'precision':>9} {'tokens/s':>9} {'rounds':>17} {'step s':>7} {'peak RSS GB':>11} "
          f"{'GFLOP/step':>10} {'matmul peak GFLOP/s':>19} {'MFU':>6} {'x faster peer':>13}")
    for (name, precision), r in results.items():
        reference = faster_peer(results, precision) or LUCIDRAINS_TOKENS_PER_S
        spread = "/".join(f"{x['tokens_per_s']:.0f}" for x in runs[name, precision])
        print(f"{name:>17} {precision:>9} {r['tokens_per_s']:9.0f} {spread:>17} {r['step_s']:7.2f} "
              f"{r['peak_rss_gb']:11.2f} {r['model_gflop_per_step']:10.0f} {r['matmul_peak_gflops']:19.0f} "
              f"{r['mfu']:6.1%} {r['tokens_per_s'] / reference:13.2f}")
    for (name, precision), r in results.items():  # the arithmetic floor: every FLOP at the measured matmul peak
        peer = faster_peer(results, precision)
        if name == "retro_lit" and peer:
            ceiling = BATCH * SEQ * r["matmul_peak_gflops"] / r["model_gflop_per_step"]
            print(f"{precision}: at 100 % MFU retro_lit would run {ceiling:.0f} tokens/s = {ceiling / peer:.2f}x "
                  f"the faster peer (measured {r['tokens_per_s'] / peer:.2f}x)")
    if args.profile:
        print_profiles(results)
    if args.allocators:
        for precision in {p for _, p in results}:
            ratio = results["retro_lit", precision]["tokens_per_s"] / results["retro_lit+glibc", precision]["tokens_per_s"]
            print(f"mimalloc / glibc (fixed mmap threshold), {precision}: {ratio:.2f}x tokens/s "
                  "(retro_lit.malloc keeps the re-execution only if bf16 >= 1.20x)")
    print("targets: fp32 >= 1.3x, bf16 >= 2.0x the faster peer's tokens/s, bf16 MFU >= 80 %, peak RSS <= 2.0 GB "
          + ("(x faster peer: the faster of lucidrains and labml in this run)" if args.reference else
             f"(x faster peer: against lucidrains' quoted {LUCIDRAINS_TOKENS_PER_S:.0f} tokens/s)"))
    print(json.dumps({f"{name}/{precision}": r for (name, precision), r in results.items()}))


def print_profiles(results: dict):
    """Where each median run's profiled step goes: per op category, seconds, share, GFLOP and GFLOP/s (x the
    matmul peak). (The floor, every counted FLOP at the peak, is the 100 % MFU line printed before.)"""
    print("profile of one more step per median run (self time of ops under torch.profiler, whose overhead "
          "makes the step a little longer)")
    for (name, precision), r in results.items():
        prof, peak = r["profile"], r["matmul_peak_gflops"]
        total = sum(prof["seconds"].values())
        cells = []
        for cat in ("matmul", "attention", "other"):
            s, g = prof["seconds"][cat], prof["gflop"][cat]
            rate = f", {g / s:.0f} GFLOP/s = {g / s / peak:.0%} of peak" if g and s else ""
            cells.append(f"{cat} {s:.2f} s ({s / total:.0%}; {g:.0f} GFLOP{rate})")
        print(f"  {name} {precision}: {total:.2f} s = " + "; ".join(cells))
        print("    top ops: " + ", ".join(f"{key} {s:.2f} s" for s, key in prof["top_ops"]))


def faster_peer(results: dict, precision: str) -> float | None:
    """tokens/s of the faster reference measured at `precision` in this run, None if none ran."""
    return max((results[ref, precision]["tokens_per_s"] for ref in REFERENCES if (ref, precision) in results),
               default=None)


def median_run(rounds: list[dict]) -> dict:
    """The round with the median tokens/s (its other figures with it); peak RSS is the rounds' largest."""
    ranked = sorted(rounds, key=lambda r: r["tokens_per_s"])
    return ranked[(len(ranked) - 1) // 2] | {"peak_rss_gb": max(r["peak_rss_gb"] for r in rounds)}


if __name__ == "__main__":
    main()
