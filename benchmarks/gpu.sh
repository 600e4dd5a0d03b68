#!/usr/bin/env bash
# The GPU paths in one short run, one JSON line on stdout (progress on stderr):
#   embedding chunks/s   all-MiniLM-L6-v2 (the default embedder) on CUDA, bf16, 64-token chunks of text
#   faiss queries/s      OPQ32,IVF4096,PQ32 over 1M random 384-d keys on the GPU(s), k = 2, nprobe 32
#                        (null, with the reason, when faiss has no GPU support: pip install faiss-gpu-cu12)
#   training tokens/s    one bf16-autocast step of RetroModel at the shared benchmark configuration
#                        (benchmarks/train_step.py) and at configs/paper-172m.yaml (seq 2048, batch 8), fused AdamW
# Run it from the repository root in an environment with retro_lit installed (`make setup`, then a CUDA torch):
#   bash benchmarks/gpu.sh                  # PYTHON=... to pick the interpreter; RETRO_GPU_QUICK=1 for a smoke run
# Copy the line into benchmarks/README.md with the machine and the date.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" - "$@" <<'EOF'
import json, os, statistics, sys, time

import numpy as np
import torch

from retro_lit.embedder import BERTForChunkEmbeddings
from retro_lit.model import RetroConfig, RetroModel

if not torch.cuda.is_available():
    sys.exit("error: benchmarks/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
quick = os.environ.get("RETRO_GPU_QUICK") == "1"
dev = torch.device("cuda")
out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(0),
       "gpus": torch.cuda.device_count(), "torch": torch.__version__}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def cuda_time(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- embedding ------------------------------------------------------------------------------------------------
rng = np.random.default_rng(0)
words = "the of and to in is that for it as with was on be by at this from or an are which not have but".split()
texts = [" ".join(rng.choice(words, 48)) for _ in range(4096 if quick else 65536)]  # ~64 BERT tokens each
bert = BERTForChunkEmbeddings(None, "cuda", batch_size=1024)
ids = bert.tokenize(texts)
bert.forward(ids[:2048])  # warm-up: kernels, allocator
torch.cuda.synchronize()
t0 = time.perf_counter()
bert.forward(ids)
torch.cuda.synchronize()
out["embed_chunks_per_s"] = round(len(ids) / (time.perf_counter() - t0))
log(f"embedding: {out['embed_chunks_per_s']} chunks/s ({bert.dtype})")
del bert

# --- faiss ----------------------------------------------------------------------------------------------------
import faiss  # noqa: E402

n_keys = 100_000 if quick else 1_000_000
if not hasattr(faiss, "StandardGpuResources"):
    out["faiss_gpu_queries_per_s"] = None
    out["faiss_gpu"] = "faiss has no GPU support here (faiss-cpu); pip install faiss-gpu-cu12"
else:
    keys = rng.standard_normal((n_keys, 384), dtype=np.float32)
    cpu_index = faiss.index_factory(384, "OPQ32,IVF4096,PQ32")
    cpu_index.train(keys[rng.choice(n_keys, min(n_keys, 262_144), replace=False)])
    cpu_index.add(keys)
    options = faiss.GpuMultipleClonerOptions()
    options.shard, options.useFloat16 = True, True
    index = faiss.index_cpu_to_all_gpus(cpu_index, co=options)
    faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", 32)
    queries = keys[:65536] + 0.01 * rng.standard_normal((65536, 384), dtype=np.float32)
    index.search(queries[:4096], 2)
    t0 = time.perf_counter()
    index.search(queries, 2)
    out["faiss_gpu_queries_per_s"] = round(len(queries) / (time.perf_counter() - t0))
    out["faiss_keys"] = n_keys
    log(f"faiss: {out['faiss_gpu_queries_per_s']} queries/s over {n_keys} keys")

# --- training -------------------------------------------------------------------------------------------------
SHARED = dict(vocab_size=30522, chunk_size=64, d_model=512, n_layer=6, n_head=8, head_dim=64, d_ff=2048,
              cca_layers=(2, 5), enc_n_layer=2, enc_cross_layers=(0,))
PAPER_172M = dict(vocab_size=32768, chunk_size=64, d_model=896, n_layer=12, n_head=16, head_dim=64, d_ff=3584,
                  cca_layers=(5, 8, 11), enc_n_layer=2, enc_cross_layers=(0,))
for name, fields, batch, seq in (("shared", SHARED, 4, 512), ("paper_172m", PAPER_172M, 8, 2048)):
    torch.manual_seed(0)
    config = RetroConfig(**fields)
    model = RetroModel.from_config(config).to(dev).train()
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=2e-4, fused=True)
    tokens = torch.randint(1, config.vocab_size, (batch, seq + 1), device=dev)
    neighbors = torch.randint(1, config.vocab_size, (batch, seq // 64, 2, 128), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(tokens[:, :-1], tokens[:, 1:], neighbors)[0]
        loss.backward()
        opt.step()

    torch.cuda.reset_peak_memory_stats()
    step_s = cuda_time(step, 3, 3 if quick else 10)
    out[f"train_{name}_tokens_per_s"] = round(batch * seq / step_s)
    out[f"train_{name}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    log(f"training {name}: {out[f'train_{name}_tokens_per_s']} tokens/s, batch {batch} x {seq}")
    del model, opt

print(json.dumps(out))
EOF
