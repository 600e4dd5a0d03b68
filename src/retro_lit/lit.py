"""`RetroLM`: the LightningModule around `RetroModel`: loss, perplexity and bits-per-byte, optimizer and schedule.

Validation and test run with retrieval ON (the pre-computed neighbors), OFF (`neighbors=None`) or both,
logged as `val/loss`, `val/ppl`, `val/bpb` and `val/loss_no_retrieval`, `val/ppl_no_retrieval`,
`val/bpb_no_retrieval` (same for `test/`).

`RetroLM` keeps its config dataclasses as dicts in its hyperparameters, so that its checkpoints load weights-only
(`retro_lit.checkpoint`).
"""

import math
from dataclasses import asdict, replace
from functools import partial
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import Metric

from retro_lit.data import IGNORE_INDEX, RetroSample
from retro_lit.model import RetroConfig, RetroModel
from retro_lit.progress import ProgressLog
from retro_lit.retrofit import RetroFitConfig, RetroFitModel


class LanguageModelMetrics(Metric):
    """Sums of nats, target tokens and target bytes, reduced over processes: mean loss, perplexity and bpb.

    bits-per-byte = total nats / ln 2 / total UTF-8 bytes of the predicted tokens, so it compares across
    tokenizers; perplexity is per LM token.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("nats", "tokens", "bytes"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nats: torch.Tensor, targets: torch.Tensor, target_bytes: torch.Tensor) -> None:
        """nats: (B, T) per-token cross-entropy, 0 where ignored; targets and target_bytes: (B, T)."""
        self.nats += nats.detach().double().sum()
        self.tokens += (targets != IGNORE_INDEX).sum()
        self.bytes += target_bytes.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        loss = self.nats / self.tokens.clamp(min=1)
        return {
            "loss": loss.float(),
            "ppl": loss.exp().float(),
            "bpb": (self.nats / math.log(2) / self.bytes.clamp(min=1)).float(),
        }


def warmup_cosine(step: int, warmup_steps: int, max_steps: float, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_lr_ratio` at `max_steps` (held after)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not math.isfinite(max_steps):
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class RetroLM(L.LightningModule):
    """Trains and evaluates a `RetroModel` on `RetroSample` batches."""

    def __init__(
        self,
        config: RetroConfig,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        retrieval: bool = True,
        eval_retrieval: Literal["both", "on", "off"] = "both",
        retrofit: RetroFitConfig | None = None,
        compile: bool = False,
    ):
        """
        Args:
            config: The model architecture.
            optimizer: Optimizer class, called with nanoGPT-style parameter groups; its `lr` and `weight_decay`
                are replaced by `model.lr` and `model.weight_decay`.
            lr: Peak learning rate.
            weight_decay: Decoupled weight decay on matrices and embeddings (never on norms or biases).
            warmup_steps: Linear warm-up steps.
            max_steps: Step at which the cosine decay reaches `min_lr_ratio * lr`; None uses the Trainer's
                estimated total steps.
            min_lr_ratio: Final learning rate as a fraction of `lr` (the paper decays to 0.1x).
            retrieval: Train with retrieval (the neighbors); False trains the decoder alone (a baseline).
            eval_retrieval: Validate and test with retrieval `on`, `off`, or `both` (logged under two names).
            retrofit: RETRO-fit a frozen pretrained LM instead of training `config`'s model from scratch (only
                its CCA and encoder train); `config` then only carries the linked vocab_size and chunk_size.
            compile: `torch.compile` the neighbour encoder's layers (`NearestNeighborEncoder.compile_layers`):
                a bf16 CPU training step ~1.3x faster after a one-off compile; needs a C++ compiler on CPU.
        """
        super().__init__()
        if isinstance(config, dict):  # from a checkpoint saved outside the CLI
            config = RetroConfig(**config)
        if isinstance(retrofit, dict):
            retrofit = RetroFitConfig(**retrofit)
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError("model.warmup_steps must be >= 0 and model.min_lr_ratio in [0, 1]")
        if eval_retrieval not in ("both", "on", "off"):
            raise ValueError(f"model.eval_retrieval must be 'both', 'on' or 'off', got {eval_retrieval!r}")
        if retrofit is not None and not retrieval:
            raise ValueError("model.retrieval must be true with model.retrofit: only the CCA and encoder train")
        self.save_hyperparameters()
        # built in Python (not by the CLI), hparams would hold a dataclass and a class, which a weights-only
        # checkpoint load cannot read: keep plain data
        for name in ("config", "retrofit"):
            if isinstance(self.hparams.get(name), (RetroConfig, RetroFitConfig)):
                self.hparams[name] = asdict(self.hparams[name])
        if not isinstance(self.hparams.get("optimizer"), (dict, str, type(None))):
            self.hparams.pop("optimizer")
        self.optimizer = optimizer
        if retrofit is None:
            self.model = RetroModel.from_config(config)
        else:
            self.model = RetroFitModel.from_config(
                replace(retrofit, vocab_size=config.vocab_size, chunk_size=config.chunk_size)
            )
        if compile and self.model.encoder is not None:
            self.model.encoder.compile_layers()
        self.metrics = torch.nn.ModuleDict(
            {f"{stage}{suffix}": LanguageModelMetrics() for stage in ("val", "test") for suffix in ("", "_no_retrieval")}
        )

    def forward(self, input_ids: torch.Tensor, neighbors: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, neighbors)  # (B, T, V)

    def token_nats(self, batch: RetroSample, retrieval: bool) -> torch.Tensor:
        """Per-token cross-entropy in nats, (B, T), 0 where the target is ignored."""
        logits = self(batch.input_ids, batch.neighbors if retrieval else None)  # (B, T, V)
        nats = F.cross_entropy(
            logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        )  # (B*T,)
        return nats.view_as(batch.targets)  # (B, T)

    def training_step(self, batch: RetroSample, batch_idx: int) -> torch.Tensor:
        neighbors = batch.neighbors if self.hparams.retrieval else None
        loss, _ = self.model.loss(batch.input_ids, batch.targets, neighbors)  # fused head + CE, no (B, T, V) logits
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, stage: str, batch: RetroSample) -> None:
        modes = {"on": (True,), "off": (False,), "both": (True, False)}[self.hparams.eval_retrieval]
        for retrieval in modes:
            metric = self.metrics[stage if retrieval else f"{stage}_no_retrieval"]
            metric.update(self.token_nats(batch, retrieval), batch.targets, batch.target_bytes)

    def _log_eval(self, stage: str) -> None:
        for suffix in ("", "_no_retrieval"):
            metric = self.metrics[stage + suffix]
            if metric.update_count == 0:
                continue
            values = metric.compute()  # already reduced over processes
            self.log_dict({f"{stage}/{name}{suffix}": v for name, v in values.items()}, prog_bar=not suffix)
            metric.reset()

    def validation_step(self, batch: RetroSample, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch: RetroSample, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def predict_step(self, batch: RetroSample, batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-token nats (with retrieval unless `eval_retrieval` is `off`) and target bytes, both (B, T)."""
        retrieval = self.hparams.eval_retrieval != "off"
        return {"nats": self.token_nats(batch, retrieval), "target_bytes": batch.target_bytes}

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = self.optimizer(self.model.param_groups(hp.weight_decay), lr=hp.lr)
        max_steps = hp.max_steps if hp.max_steps is not None else self.trainer.estimated_stepping_batches
        schedule = partial(
            warmup_cosine, warmup_steps=hp.warmup_steps, max_steps=float(max_steps), min_lr_ratio=hp.min_lr_ratio
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ParameterSummary(L.Callback):
    """One line when a fit starts: the model's parameters, trainable and frozen. It stands in for Lightning's model
    summary table, which warns that bf16-mixed is not supported and prints a FLOPs column of zeros (it counts
    FLOPs only with an example input)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sizes = [(p.numel(), p.requires_grad) for p in pl_module.parameters()]
        total, trainable = sum(n for n, _ in sizes), sum(n for n, grad in sizes if grad)
        rank_zero_info(f"model: {type(getattr(pl_module, 'model', pl_module)).__name__}, {total / 1e6:.2f}M parameters "
                       f"({trainable / 1e6:.2f}M trainable, {(total - trainable) / 1e6:.2f}M frozen)")


class NeighborTableCallback(L.Callback):
    """With a `WandbLogger`: after each validation, a W&B table `val/neighbors` of a few validation chunks, their
    retrieved neighbors and distances, from the DataModule's `neighbor_table` (the model never reads data)."""

    def __init__(self, num_chunks: int = 4):
        self.num_chunks = num_chunks

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        table = getattr(trainer.datamodule, "neighbor_table", None)
        if not loggers or table is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        columns, rows = table(self.num_chunks)
        for logger in loggers:
            logger.log_table("val/neighbors", columns=columns, data=rows, step=trainer.global_step)


class LogProgressBar(ProgressBar):
    """Lightning's progress bar for a log file: `retro_lit.progress` lines (every ~10 % or ~30 s, with rate, ETA
    and the metrics the tqdm bar would show) for training steps and for validation, test and predict batches."""

    def __init__(self):
        super().__init__()
        self.enabled = True
        self.bar: ProgressLog | None = None
        self._train_bar: ProgressLog | None = None  # set aside while a validation inside fit runs

    def disable(self) -> None:  # Lightning calls this on every rank but 0
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _start(self, desc: str, unit: str, total: float, initial: int = 0) -> None:
        self.bar = ProgressLog(total=total, desc=desc, unit=unit, initial=initial, disable=not self.enabled)

    def _show_metrics(self, trainer: L.Trainer) -> None:
        metrics = trainer.progress_bar_metrics
        self.bar.set_postfix_str(", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))

    def _advance(self, trainer: L.Trainer, n: int = 1) -> None:
        self._show_metrics(trainer)
        self.bar.update(n)

    def _end(self, trainer: L.Trainer) -> None:
        self._show_metrics(trainer)  # as they are at the end: a validation's val/loss is logged after its last batch
        self.bar.close()
        self.bar = None

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self._start("train", "step", total, initial=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._advance(trainer, trainer.global_step - self.bar.n)  # optimizer steps (gradient accumulation)

    def on_train_end(self, trainer, pl_module) -> None:
        self._end(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._train_bar, self.bar = self.bar, None
            self._start("validate", "batch", sum(trainer.num_val_batches))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._advance(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._end(trainer)
            self.bar = self._train_bar  # back to the training line, mid-fit

    def on_test_start(self, trainer, pl_module) -> None:
        self._start("test", "batch", sum(trainer.num_test_batches))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._advance(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        self._end(trainer)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._start("predict", "batch", sum(trainer.num_predict_batches))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._advance(trainer)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._end(trainer)
