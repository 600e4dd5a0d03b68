"""Lightning-path training speed vs the raw model step, at the benchmark configuration, from real memmapped data.

The configuration of `configs/bench.yaml` (and `benchmarks/train_step.py`): d_model 512, 8 heads x 64, d_ff 2048,
6 decoder layers, CCA in layers 3 and 6 (1-based), a 2-layer encoder with cross-attention in its first layer,
chunk 64, seq 512, 2 neighbours x 128 tokens, batch 4, AdamW (lr 3e-4, wd 0.01), 2 torch threads. The data is
a workspace built from the Shakespeare corpus (`bpe:30522`, so the vocabulary matches the raw benchmark) with a
random 1-layer BERT as the key embedder (keys do not change the timing).

For each precision (bf16 autocast / `bf16-mixed`, and fp32 / `32-true`), `Trainer.fit` of `RetroLM` on that
DataModule (loader with its default workers, CSV logging every step, the warm-up + cosine scheduler; no progress
bar, checkpointing or validation) runs with a callback that, after each Lightning step, runs one raw step of a
second, identical `RetroModel`: `model.loss` (fused head + cross-entropy, as `RetroLM` trains) + backward +
fused `AdamW.step` (as the shipped configs) on a batch from the same
loader held in memory. A Lightning step is the wall time from the end of the previous raw step to the end of
this training batch, so data loading and every Trainer hook are inside it and the raw step is not. Interleaving
step by step keeps outside load (this box is shared) the same for both paths. Prints tokens/s (median step) of
each and the ratio Lightning / raw (target >= 0.9).

    python benchmarks/lightning_step.py [--steps 5] [--warmup 2] [--precision bf16,fp32]
"""

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from transformers import AutoTokenizer, BertConfig, BertModel

from retro_lit.data import RetroDataModule
from retro_lit.embedder import default_model_path
from retro_lit.lit import RetroLM
from retro_lit.model import RetroConfig, RetroModel

BENCH = dict(d_model=512, n_layer=6, n_head=8, head_dim=64, d_ff=2048, cca_layers=(2, 5), enc_n_layer=2,
             enc_cross_layers=(0,))
BATCH, SEQ, CHUNK, K, TOKENIZER = 4, 512, 64, 2, "bpe:30522"
LR, WD = 3e-4, 0.01


def random_bert(folder: Path) -> str:
    """A random 1-layer BERT (hidden 64) with the MiniLM tokenizer, saved as a local embedder folder."""
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        tokenizer = AutoTokenizer.from_pretrained(default_model_path())
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=256)
        BertModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def datamodule(workspace: Path) -> RetroDataModule:
    dm = RetroDataModule(str(workspace / "ws"), corpus="shakespeare", tokenizer=TOKENIZER, chunk_size=CHUNK,
                         seq_len=SEQ, num_neighbors=K, embedder=random_bert(workspace / "bert"), index="Flat",
                         batch_size=BATCH)
    dm.prepare_data()
    return dm


class InterleavedRawSteps(L.Callback):
    """After each Lightning training step, one timed raw step of an identical model on an in-memory batch."""

    def __init__(self, config: RetroConfig, batches: list, bf16: bool):
        torch.manual_seed(0)
        self.model = RetroModel.from_config(config).train()
        self.optimizer = torch.optim.AdamW(self.model.param_groups(WD), lr=LR, fused=True)
        self.batches, self.bf16 = batches, bf16
        self.raw: list[float] = []
        self.lightning: list[float] = []
        self.last_end: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self.last_end is not None:
            self.lightning.append(now - self.last_end)
        self.raw.append(self.raw_step(self.batches[batch_idx % len(self.batches)]))
        self.last_end = time.perf_counter()

    def raw_step(self, batch) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss, _ = self.model.loss(batch.input_ids, batch.targets, batch.neighbors)  # fused head + CE
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def run(dm: RetroDataModule, config: RetroConfig, bf16: bool, n: int, log_dir: str) -> tuple[list[float], list[float]]:
    """Seconds per raw step and per Lightning step, n + 1 of each (the first Lightning step is not timed)."""
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    timer = InterleavedRawSteps(config, [next(loader) for _ in range(n + 1)], bf16)
    torch.manual_seed(0)
    module = RetroLM(config, partial(torch.optim.AdamW, fused=True), lr=LR, weight_decay=WD, warmup_steps=2, max_steps=1000)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed" if bf16 else "32-true", max_steps=n + 1,
                        limit_val_batches=0, logger=CSVLogger(log_dir), log_every_n_steps=1, callbacks=[timer],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    return timer.raw, timer.lightning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--precision", default="bf16,fp32", help="comma-separated: bf16, fp32")
    parser.add_argument("--workspace", default="workspaces/bench-lightning", help="built once, then reused")
    args = parser.parse_args()
    torch.set_num_threads(2)
    L.seed_everything(0, verbose=False)
    dm = datamodule(Path(args.workspace))
    config = RetroConfig(vocab_size=dm.vocab_size, chunk_size=CHUNK, **BENCH)
    n = args.warmup + args.steps
    print(f"bench config, vocab {dm.vocab_size}, batch {BATCH} x {SEQ} tokens, {torch.get_num_threads()} threads, "
          f"{args.warmup} warm-up + {args.steps} timed steps, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as log_dir:
        for precision in args.precision.split(","):
            bf16 = precision == "bf16"
            raw, lit = run(dm, config, bf16, n, log_dir)
            raw, lit = raw[args.warmup + 1 :], lit[args.warmup :]  # the same steps: warmup + 2 ... n + 1
            raw_tps = BATCH * SEQ / statistics.median(raw)
            lit_tps = BATCH * SEQ / statistics.median(lit)
            print(f"{precision:>5}: raw step {raw_tps:8.1f} tokens/s | Lightning Trainer.fit {lit_tps:8.1f} tokens/s | "
                  f"ratio {lit_tps / raw_tps:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
