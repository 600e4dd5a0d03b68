"""The `retro-lit` command: LightningCLI's `fit`, `validate`, `test`, `predict` for `RetroLM` on a
`RetroDataModule`, plus `build-db`, `generate`, `evaluate`, `diagnose` and `demo`, which live in their own modules.

    retro-lit fit --config configs/tiny.yaml
    retro-lit fit --config configs/tiny.yaml --ckpt_path last          # resume
    retro-lit validate --config configs/tiny.yaml --ckpt_path runs/tiny/checkpoints/last.ckpt
    retro-lit fit --config configs/demo.yaml --trainer configs/trainer/gpu.yaml
    retro-lit fit --config configs/tiny.yaml --print_config=comments,skip_null
"""

import logging
import os
import sys
import warnings
from importlib import import_module
from pathlib import Path
from unittest import mock

import yaml
from jsonargparse import ArgumentParser, set_parsing_settings
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from retro_lit.data import RetroDataModule
from retro_lit.lit import LogProgressBar, NeighborTableCallback, RetroLM
from retro_lit.malloc import fix_mmap_threshold
from retro_lit.workspace import RetroError

# name -> (module, function(argv) -> exit code, one-line help); imported only when run
EXTRA_COMMANDS = {
    "build-db": ("retro_lit.distributed", "build_db_main", "Build or resume a retrieval database (workspace)."),
    "generate": ("retro_lit.generate", "generate_main", "Sample text with live retrieval from a checkpoint."),
    "evaluate": ("retro_lit.evaluate", "evaluate_main", "Bits-per-byte with retrieval on/off and bpb(alpha)."),
    "diagnose": ("retro_lit.diagnose", "diagnose_main", "Does retrieval pay: copyable neighbours, CCA norms."),
    "demo": ("retro_lit.demo", "demo_main", "demo on the Python stdlib: database, RETRO and a baseline, compared."),
}


class UserError(Exception):
    """A mistake in the command line or config: reported as one `error:` line with exit status 2."""


class WandbSaveConfigCallback(SaveConfigCallback):
    """Writes `config.yaml` to the log dir (overwriting) and, with a `WandbLogger`, logs it as the run config."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_unset=False))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams({"config": config})


class RetroCLI(LightningCLI):
    """LightningCLI for `RetroLM` and `RetroDataModule`, with the vocabulary and chunk size linked from data to model.

    `--checkpoint.*` configures the always-present `ModelCheckpoint` (`save_last` on; its folder defaults to
    `<trainer.default_root_dir>/checkpoints`, so `fit --ckpt_path last` finds the previous run's `last.ckpt`).
    Unless the config says otherwise, the Trainer logs to CSV in `default_root_dir` and shows progress as
    Lightning's tqdm bar on a terminal, else as `LogProgressBar` lines (a redrawn bar in a log is one endless line).
    """

    def __init__(self, *args, **kwargs):
        set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings become --help
        kwargs.setdefault("model_class", RetroLM)
        kwargs.setdefault("datamodule_class", RetroDataModule)
        kwargs.setdefault("save_config_callback", WandbSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("trainer_defaults", {"callbacks": [NeighborTableCallback()]})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.link_arguments("data.chunk_size", "model.config.chunk_size")
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        # list the non-Lightning commands in `retro-lit --help`; `main` runs them before this parser sees them
        for name, (_, _, help_line) in EXTRA_COMMANDS.items():
            parser._subcommands_action.add_subcommand(name, ArgumentParser(description=help_line), help=help_line)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.checkpoint.dirpath is None:
            root = config.trainer.default_root_dir or os.getcwd()
            config.checkpoint.dirpath = str(Path(root) / "checkpoints")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, RetroError) as e:  # config validation (`RetroConfig.__post_init__` etc.)
            raise UserError(str(e)) from e

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):  # Lightning's own default, named: no notice about tensorboard
            kwargs.setdefault("logger", CSVLogger(config.get("default_root_dir") or os.getcwd()))
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        # (Lightning refuses a progress bar callback with enable_progress_bar false, and a second one)
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            bar = TQDMProgressBar() if sys.stderr.isatty() else LogProgressBar()
            kwargs.setdefault("callbacks", [*callbacks, bar])
        return super().instantiate_trainer(**kwargs)


def default_wandb_mode() -> None:
    """Offline W&B unless an API key is configured (environment or `wandb login`'s netrc entry)."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"


def not_litlogger_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip: For seamless cloud logging")


def silence_upstream_notices() -> None:
    """Hide the third-party notices of a first run that a user can do nothing about, each by message and module
    (so every other warning, ours or theirs, still shows)."""
    # Lightning 2.6's CLI calls three jsonargparse APIs deprecated in 4.49, and jsonargparse prefaces the first
    jsonargparse_apis = r"\s*(skip_none parameter|``ArgumentParser.add_instantiator``|``instantiate_classes``) was "
    for message in (jsonargparse_apis, r"\s*By default only one JsonargparseDeprecationWarning"):
        warnings.filterwarnings("ignore", message, DeprecationWarning, module=r"lightning\.pytorch\.cli")
    # Lightning's pytree helper still builds torch's LeafSpec, which torch 2.13 deprecates
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
                            module=r"lightning\.pytorch\.utilities\._pytree")
    # every Trainer without Lightning's cloud logger advertises it (an info line, not a warning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(not_litlogger_tip)


def main(argv: list[str] | None = None) -> int:
    """Console entry point `retro-lit`; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    fix_mmap_threshold()  # (a no-op in `retro-lit` itself: retro_lit.__main__ chose its allocator at start-up)
    default_wandb_mode()
    silence_upstream_notices()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("retro_lit").setLevel(logging.INFO)
    if args and args[0] in EXTRA_COMMANDS:
        module, function, _ = EXTRA_COMMANDS[args[0]]
        # the command has its arguments; LightningCLI(args=...) inside it (the demo's fit) expects no other
        with mock.patch.object(sys, "argv", sys.argv[:1]):
            return int(getattr(import_module(module), function)(args[1:]) or 0)
    try:
        RetroCLI(args=argv)  # None: LightningCLI reads sys.argv itself
    except (UserError, RetroError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
